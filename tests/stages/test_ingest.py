"""Stage `ingest`: every supported file type, the built-in stdlib source, provenance, and main()."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, read_jsonl, sha256_file
from ftpipe.core.params import SourceParams
from stages import ingest
from stages.ingest import ingest_source, read_file_source, stdlib_docstring_records
from tests.conftest import REPO, set_sources

QUESTION = re.compile(r"^What does `([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)` do\?$")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def alpaca(i: int) -> dict:
    return {"instruction": f"Question number {i}?", "output": f"The answer to question {i} is long enough."}


# --- read_file_source --------------------------------------------------------------------------

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


def test_invalid_utf8_is_replaced_and_counted(in_tmp_project):
    path = Path("data/sources/bad.jsonl")
    path.parent.mkdir(parents=True)
    path.write_bytes(json.dumps(alpaca(1)).encode() + b"\n" + b'{"instruction": "caf\xe9?", "output": "ok"}\n')
    Path("out").mkdir()
    entry = ingest_source(file_source("bad", str(path)), Path("out"), keep_pii=False)
    assert entry["repaired"] == {"invalid_utf8": 1} and entry["rows"] == 2
    assert read_jsonl(Path("out/bad.jsonl"))[1]["record"]["instruction"] == "caf\ufffd?"


# --- the built-in stdlib source ----------------------------------------------------------------

@pytest.fixture(scope="module")
def stdlib_rows() -> list[dict]:
    return list(stdlib_docstring_records())


def test_stdlib_records_are_many_alpaca_rows(stdlib_rows):
    assert len(stdlib_rows) > 500
    assert [row["row"] for row in stdlib_rows] == list(range(1, len(stdlib_rows) + 1))
    questions = [row["record"]["instruction"] for row in stdlib_rows]
    assert len(set(questions)) == len(questions)
    for row in stdlib_rows:
        record = row["record"]
        assert set(record) == {"instruction", "output"}
        assert QUESTION.match(record["instruction"]), record["instruction"]
        answer = record["output"]
        assert answer and answer == answer.strip()
        assert "\n" not in answer and "  " not in answer   # the first paragraph, whitespace collapsed
    assert "What does `json.dumps` do?" in questions
    assert "What does `collections.OrderedDict` do?" in questions


def test_stdlib_answer_is_the_first_paragraph_of_the_docstring(stdlib_rows):
    import json as json_module
    import textwrap

    by_question = {row["record"]["instruction"]: row["record"]["output"] for row in stdlib_rows}
    doc = textwrap.dedent(json_module.dumps.__doc__)
    first = " ".join(doc.strip().split("\n\n")[0].split())
    assert by_question["What does `json.dumps` do?"] == first
    assert len(first) < len(" ".join(doc.split()))   # the docstring has further paragraphs, not included


def test_stdlib_records_have_no_private_names_or_test_modules(stdlib_rows):
    names = [QUESTION.match(row["record"]["instruction"]).group(1) for row in stdlib_rows]
    for name in names:
        parts = name.split(".")
        assert not any(part.startswith("_") for part in parts), name
        assert not any(part in {"test", "tests", "idle_test", "idlelib", "tkinter", "lib2to3"}
                       for part in parts[:-1]), name
    modules = {name.rsplit(".", 1)[0] for name in names}
    assert "json" in modules and "unittest.mock" in modules
    assert not any(module.startswith(("test.", "unittest.test", "ctypes.test")) for module in modules)


def test_stdlib_records_respect_dunder_all(stdlib_rows):
    # json.__all__ lists dump, dumps, load, loads, JSONDecoder, JSONDecodeError, JSONEncoder only
    import json as json_module

    json_names = {QUESTION.match(row["record"]["instruction"]).group(1).split(".", 1)[1]
                  for row in stdlib_rows if row["record"]["instruction"].startswith("What does `json.")
                  and QUESTION.match(row["record"]["instruction"]).group(1).count(".") == 1}
    assert json_names and json_names <= set(json_module.__all__)


def test_stdlib_records_are_deterministic(stdlib_rows):
    assert list(stdlib_docstring_records()) == stdlib_rows


# --- ingest_source -----------------------------------------------------------------------------

def file_source(name: str, path: str, max_rows: int | None = None) -> SourceParams:
    return SourceParams(name=name, type="file", path=path, max_rows=max_rows)


def test_ingest_source_writes_rows_and_provenance(in_tmp_project, capsys):
    data = write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(i)) for i in range(1, 6)])
    out_dir = Path("out")
    out_dir.mkdir()
    entry = ingest_source(file_source("mine", "data/sources/mine.jsonl"), out_dir, keep_pii=False)
    assert entry["name"] == "mine" and "license" not in entry   # declared under compliance.sources
    assert entry["origin"] == {"kind": "file", "path": "data/sources/mine.jsonl", "sha256": sha256_file(data)}
    assert entry["rows"] == 5 and entry["file"] == "mine.jsonl"
    assert entry["sha256"] == sha256_file(out_dir / "mine.jsonl")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", entry["retrieved_at"])
    assert read_jsonl(out_dir / "mine.jsonl") == [{"row": i, "record": alpaca(i)} for i in range(1, 6)]
    assert "warning" not in capsys.readouterr().out


def test_ingest_source_honours_max_rows(in_tmp_project):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(i)) for i in range(1, 11)])
    out_dir = Path("out")
    out_dir.mkdir()
    entry = ingest_source(file_source("mine", "data/sources/mine.jsonl", max_rows=3), out_dir, keep_pii=False)
    assert entry["rows"] == 3
    assert [row["row"] for row in read_jsonl(out_dir / "mine.jsonl")] == [1, 2, 3]


def test_max_rows_counts_rows_not_line_numbers(in_tmp_project):
    # blank lines do not count: max_rows=3 keeps three rows (lines 1, 3 and 5) when the file has more
    lines = [json.dumps(alpaca(1)), "", json.dumps(alpaca(3)), "", json.dumps(alpaca(5)), json.dumps(alpaca(6))]
    write_lines(Path("data/sources/gappy.jsonl"), lines)
    out_dir = Path("out")
    out_dir.mkdir()
    entry = ingest_source(file_source("gappy", "data/sources/gappy.jsonl", max_rows=3), out_dir, keep_pii=False)
    assert entry["rows"] == 3
    assert [row["row"] for row in read_jsonl(out_dir / "gappy.jsonl")] == [1, 3, 5]


def test_ingest_source_stdlib_max_rows(in_tmp_project):
    out_dir = Path("out")
    out_dir.mkdir()
    source = SourceParams(name="docs", type="python_stdlib_docstrings", max_rows=7)
    entry = ingest_source(source, out_dir, keep_pii=False)
    assert entry["rows"] == 7 and entry["origin"]["kind"] == "python-stdlib"
    rows = read_jsonl(out_dir / "docs.jsonl")
    assert [row["row"] for row in rows] == list(range(1, 8))
    assert all(QUESTION.match(row["record"]["instruction"]) for row in rows)


def test_missing_file_names_the_source(in_tmp_project):
    Path("out").mkdir()
    with pytest.raises(PipelineError) as error:
        ingest_source(file_source("tickets", "data/sources/tickets.jsonl"), Path("out"), keep_pii=False)
    message = str(error.value)
    assert "ingest.sources 'tickets'" in message and "data/sources/tickets.jsonl does not exist" in message
    assert "data/sources/" in message


def test_file_outside_sources_folder_warns(in_tmp_project, capsys):
    write_lines(Path("elsewhere/d.jsonl"), [json.dumps(alpaca(1))])
    Path("out").mkdir()
    entry = ingest_source(file_source("d", "elsewhere/d.jsonl"), Path("out"), keep_pii=False)
    assert entry["rows"] == 1
    out = capsys.readouterr().out
    assert "warning: elsewhere/d.jsonl is outside data/sources/" in out and "dvc repro -f ingest" in out


# --- main() ------------------------------------------------------------------------------------

def write_params(sources: list[dict]) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    set_sources(data, sources)
    Path("params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_main_writes_raw_data_provenance_and_metrics(in_tmp_project, capsys):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(i)) for i in range(1, 5)])
    path = Path("data/sources/other.csv")
    path.write_text("prompt,completion\nP1?,Completion one is here.\nP2?,Completion two is here.\n", encoding="utf-8")
    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.jsonl"},
                  {"name": "other", "type": "file", "path": "data/sources/other.csv",
                   "max_rows": 1}])
    ingest.main()

    assert read_jsonl(Path("data/raw/mine.jsonl")) == [{"row": i, "record": alpaca(i)} for i in range(1, 5)]
    assert read_jsonl(Path("data/raw/other.jsonl")) == [
        {"row": 1, "record": {"prompt": "P1?", "completion": "Completion one is here."}}]
    assert sorted(p.name for p in Path("data/raw").iterdir()) == ["mine.jsonl", "other.jsonl", "provenance.json"]
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw", "sources"]   # no temp folder left

    provenance = read_json(Path("data/raw/provenance.json"))
    assert provenance["stage"] == "ingest"
    assert provenance["params"]["ingest.sources.0.name"] == "mine"
    assert provenance["params"]["ingest.sources.1.max_rows"] == 1
    assert {"git", "environment", "created_at"} <= set(provenance)
    sources = {s["name"]: s for s in provenance["sources"]}
    assert list(sources) == ["mine", "other"]
    assert sources["mine"]["rows"] == 4
    assert sources["mine"]["origin"] == {"kind": "file", "path": "data/sources/mine.jsonl",
                                         "sha256": sha256_file(Path("data/sources/mine.jsonl"))}
    assert sources["mine"]["sha256"] == sha256_file(Path("data/raw/mine.jsonl"))
    assert sources["other"]["rows"] == 1

    assert read_json(Path("metrics/ingest.json")) == {"rows_total": 5, "empty_sources": 0, "pii_rows_redacted": 0, "rows.mine": 4,
                                                      "rows.other": 1}
    out = capsys.readouterr().out
    assert "ingest: mine: 4 rows -> data/raw/mine.jsonl" in out


def test_main_failure_keeps_the_previous_raw_data(in_tmp_project):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(1))])
    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.jsonl"}])
    ingest.main()
    before = Path("data/raw/mine.jsonl").read_text(encoding="utf-8")

    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.json"}])
    Path("data/sources/mine.json").write_text(json.dumps(alpaca(1)), encoding="utf-8")   # not an array
    with pytest.raises(PipelineError, match=r"mine\.json: a \.json source must hold an array"):
        ingest.main()
    assert Path("data/raw/mine.jsonl").read_text(encoding="utf-8") == before
    assert read_json(Path("metrics/ingest.json")) == {"rows_total": 1, "empty_sources": 0, "pii_rows_redacted": 0,
                                                      "rows.mine": 1}
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw", "sources"]


@pytest.mark.parametrize("action", ["warn", "fail"])
def test_an_empty_source_is_named_with_a_warning_or_fails(in_tmp_project, capsys, action):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(1))])
    Path("data/sources/empty.jsonl").write_text("\n\n", encoding="utf-8")   # blank lines only: no record
    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.jsonl"},
                  {"name": "empty", "type": "file", "path": "data/sources/empty.jsonl"}])
    data = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    data["ingest"]["empty_source"] = action
    Path("params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    if action == "fail":
        with pytest.raises(PipelineError, match=r"ingest source 'empty' \(data/sources/empty.jsonl\) has no rows"):
            ingest.main()
        assert not Path("data/raw").exists()   # nothing published
        return
    ingest.main()
    assert "warning: ingest source 'empty' (data/sources/empty.jsonl) has no rows" in capsys.readouterr().err
    assert read_json(Path("metrics/ingest.json"))["empty_sources"] == 1


@pytest.mark.parametrize("keep", [False, True])
def test_raw_copies_keep_pii_only_when_params_say_so_and_clean_still_counts_it(in_tmp_project, keep):
    """data/raw (and so the DVC cache) holds no PII value unless ingest.keep_pii_in_raw; either way clean
    counts the rows that had some, and with clean.pii_action: reject drops them."""
    from ftpipe.core.params import load_params
    from stages.clean import clean_sources

    email, phone = "jane.doe@example.org", "+1 555 123 4567"
    records = [{"instruction": f"Write to {email}.", "output": f"Mail {email} or call {phone} today."},
               {"instruction": "Say hi.", "output": "Hello there, nice to meet you."}]
    write_lines(Path("data/sources/mail.jsonl"), [json.dumps(record) for record in records])
    Path("data/raw").mkdir(parents=True)
    entry = ingest_source(file_source("mail", "data/sources/mail.jsonl"), Path("data/raw"), keep_pii=keep)
    text = Path("data/raw/mail.jsonl").read_text(encoding="utf-8")
    assert (email in text and phone in text) == keep
    if keep:
        assert entry["pii_in_raw"] == "kept verbatim" and entry["pii_redacted"] == {"rows": 0, "found": {}}
    else:
        assert "[EMAIL]" in text and "[PHONE]" in text
        assert entry["pii_in_raw"] == "replaced by placeholders"
        assert entry["pii_redacted"] == {"rows": 1, "found": {"email": 2, "phone": 1}}
        assert read_jsonl(Path("data/raw/mail.jsonl"))[0]["pii"] == {"email": 2, "phone": 1}
    Path("data/raw/provenance.json").write_text(json.dumps({"sources": [entry]}), encoding="utf-8")

    write_params([{"name": "mail", "type": "file", "path": "data/sources/mail.jsonl"}])
    clean = load_params().clean
    for action in ("redact", "reject"):
        params = type(clean)(**{**clean.__dict__, "pii_action": action, "min_answer_chars": 5})
        splits, rejected, summary = clean_sources(Path("data/raw"), params)
        assert summary["sources"]["mail"]["pii"] == {"action": action, "rows": 1, "found": {"email": 2, "phone": 1}}
        kept = [row for rows in splits.values() for row in rows]
        assert all(email not in json.dumps(row) for row in kept + rejected)
        assert ([r["reason"] for r in rejected] == ["pii"]) == (action == "reject")
