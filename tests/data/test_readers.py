"""Reading user files (ftpipe.data.readers): every supported file type, byte-order marks, error rows."""
from __future__ import annotations

import csv
import json

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.data.readers import read_file_source
from tests.data_fixtures import alpaca, write_lines


def test_jsonl_skips_blank_lines_and_numbers_rows_by_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(alpaca(1)), "", "   ", json.dumps(alpaca(2)),
                                             json.dumps({"prompt": "p", "completion": "c", "n": [1, {"x": None}]})])
    assert list(read_file_source(path)) == [
        {"row": 1, "record": alpaca(1)},
        {"row": 4, "record": alpaca(2)},
        {"row": 5, "record": {"prompt": "p", "completion": "c", "n": [1, {"x": None}]}},
    ]


def test_ndjson_and_upper_case_extension_are_jsonl(tmp_path):
    for name in ("d.ndjson", "D.JSONL"):
        path = write_lines(tmp_path / name, [json.dumps(alpaca(1))])
        assert list(read_file_source(path)) == [{"row": 1, "record": alpaca(1)}]


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([alpaca(1), alpaca(2), alpaca(3)], indent=2), encoding="utf-8")
    assert list(read_file_source(path)) == [{"row": n, "record": alpaca(n)} for n in (1, 2, 3)]


def test_json_that_is_not_an_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(alpaca(1)), encoding="utf-8")
    with pytest.raises(PipelineError, match=r"must hold an array of objects.*name the file \.jsonl"):
        list(read_file_source(path))


def test_json_array_item_that_is_not_an_object_becomes_an_error_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([alpaca(1), "just a string"]), encoding="utf-8")
    assert list(read_file_source(path)) == [
        {"row": 1, "record": alpaca(1)},
        {"row": 2, "error": "not an object: got str", "text": "just a string"},
    ]


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]\n', encoding="utf-8")
    with pytest.raises(PipelineError, match=r"d\.json: line 3: malformed JSON"):
        list(read_file_source(path))


def test_csv_with_quoted_newlines_and_commas(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["List, then explain.", "", 'First line, with a comma.\nSecond line: "quoted", too.'])
        writer.writerow(["Second row?", "ctx", "Plain answer"])
    assert '"First line, with a comma.\nSecond line: ""quoted"", too."' in path.read_text(encoding="utf-8")
    assert list(read_file_source(path)) == [
        {"row": 1, "record": {"instruction": "List, then explain.", "input": "",
                              "output": 'First line, with a comma.\nSecond line: "quoted", too.'}},
        {"row": 2, "record": {"instruction": "Second row?", "input": "ctx", "output": "Plain answer"}},
    ]


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("prompt\tcompletion\nWhat, exactly?\tThis, with commas.\nTwo\tThree\n", encoding="utf-8")
    assert list(read_file_source(path)) == [
        {"row": 1, "record": {"prompt": "What, exactly?", "completion": "This, with commas."}},
        {"row": 2, "record": {"prompt": "Two", "completion": "Three"}},
    ]


def test_csv_with_byte_order_mark(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a BOM; it must not become part of the first column's name
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffinstruction,output\nHi?,Hello there.\n".encode("utf-8"))
    assert list(read_file_source(path)) == [{"row": 1, "record": {"instruction": "Hi?", "output": "Hello there."}}]


def test_jsonl_and_json_with_byte_order_mark(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(("\ufeff" + json.dumps(alpaca(1)) + "\n").encode("utf-8"))
    assert list(read_file_source(jsonl)) == [{"row": 1, "record": alpaca(1)}]
    array = tmp_path / "d.json"
    array.write_bytes(("\ufeff" + json.dumps([alpaca(1)])).encode("utf-8"))
    assert list(read_file_source(array)) == [{"row": 1, "record": alpaca(1)}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"instruction": ["A?", "B?", "C?"], "input": ["", None, "ctx"],
                      "output": ["Answer A.", "Answer B.", "Answer C."]})
    pq.write_table(table, path)
    assert list(read_file_source(path)) == [
        {"row": 1, "record": {"instruction": "A?", "input": "", "output": "Answer A."}},
        {"row": 2, "record": {"instruction": "B?", "input": None, "output": "Answer B."}},
        {"row": 3, "record": {"instruction": "C?", "input": "ctx", "output": "Answer C."}},
    ]


def test_parquet_with_chat_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    pq.write_table(pa.table({"messages": [messages]}), path)
    assert list(read_file_source(path)) == [{"row": 1, "record": {"messages": messages}}]


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(PipelineError) as error:
        list(read_file_source(path))
    message = str(error.value)
    assert str(path) in message and "unsupported file type '.xlsx'" in message
    assert ".jsonl" in message and ".csv" in message and ".parquet" in message


def test_malformed_json_line_becomes_an_error_row_and_reading_goes_on(tmp_path):
    bad = '{"instruction": "x", "output": }'
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(alpaca(1)), "", bad, json.dumps(alpaca(4))])
    assert list(read_file_source(path)) == [
        {"row": 1, "record": alpaca(1)},
        {"row": 3, "error": "malformed JSON: Expecting value at column 32", "text": bad},
        {"row": 4, "record": alpaca(4)},
    ]


def test_json_line_that_is_not_an_object_becomes_an_error_row(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(alpaca(1)), json.dumps(["a", "list"])])
    assert list(read_file_source(path))[1] == {"row": 2, "error": "not an object: got list", "text": '["a", "list"]'}


def test_error_row_keeps_at_most_200_characters_of_the_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"x": ' + "1" * 500])
    (row,) = read_file_source(path)
    assert row["error"].startswith("malformed JSON") and row["text"] == ('{"x": ' + "1" * 500)[:200]
