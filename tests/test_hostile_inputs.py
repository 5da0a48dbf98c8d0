"""Hostile input through ingest + clean: every file is repaired or rejected row by row, never a crash,
and only a file that cannot be read at all is a PipelineError. For every file, the rows in equal the
rows kept plus the rows quarantined in rejected.jsonl (with source, row number and reason).

The small files live in tests/data/hostile/; the huge (30 MB) and deeply nested records and the
Hugging Face dataset folder are generated at run time instead of being committed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftpipe.errors import PipelineError
from ftpipe.io import read_jsonl
from ftpipe.params import CleanParams, SourceParams
from stages.clean import clean_sources
from stages.ingest import MAX_NESTING, MAX_RECORD_BYTES, ingest_source

HOSTILE = Path(__file__).resolve().parent / "data" / "hostile"
# Tiny held-out fractions: nearly every kept row lands in train, so no file can empty the train split.
PARAMS = CleanParams(min_answer_chars=10, max_prompt_chars=1000, max_answer_chars=1000,
                     placeholder_answers=["n/a", "none", "todo"], split_salt="h1",
                     validation_fraction=0.01, test_fraction=0.01)
ANSWER = "A clear answer of enough length."
ANCHOR = [{"instruction": f"Anchor question {i}?", "output": f"Anchor answer {i}, long enough."} for i in range(3)]


def run_pipeline(tmp_path: Path, source_path: Path) -> tuple[dict, dict, list[dict], dict, dict]:
    """ingest `source_path` (plus a small anchor source), then clean. Returns (provenance entry, the
    hostile source's summary, its rejected rows, its kept rows by source row, the whole summary)."""
    out = tmp_path / "raw"
    out.mkdir()
    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR), encoding="utf-8")
    entries = [ingest_source(SourceParams(name="hostile", type="file", license="MIT", path=str(source_path)), out),
               ingest_source(SourceParams(name="anchor", type="file", license="MIT", path=str(anchor)), out)]
    (out / "provenance.json").write_text(json.dumps({"stage": "ingest", "sources": entries}), encoding="utf-8")
    splits, rejected, summary = clean_sources(out, PARAMS)
    kept = {row["source_row"]: row for rows in splits.values() for row in rows if row["source"] == "hostile"}
    return entries[0], summary["sources"]["hostile"], [r for r in rejected if r["source"] == "hostile"], kept, summary


# (file in tests/data/hostile, rows in, kept source rows, {row: reason}, formats, repaired counts)
CASES = [
    ("bom_crlf.jsonl", 2, {1, 2}, {}, {"alpaca": 2}, {}),
    ("invalid_utf8.jsonl", 2, {1, 2}, {}, {"alpaca": 2}, {"invalid_utf8": 1}),
    ("control_chars.jsonl", 3, {1, 2, 3}, {}, {"alpaca": 3}, {"control_chars": 2}),
    ("wrong_types.jsonl", 6, {6}, {1: "bad_field_type", 2: "bad_field_type", 3: "bad_field_type",
                                   4: "bad_field_type", 5: "bad_field_type"}, {"alpaca": 1}, {}),
    ("missing_fields.jsonl", 4, {4}, {1: "missing_field", 2: "missing_field", 3: "missing_field"}, {"alpaca": 1}, {}),
    ("mixed_formats.jsonl", 5, {1, 2, 3, 4}, {5: "no_assistant_turn"},
     {"alpaca": 1, "chat": 1, "sharegpt": 1, "prompt_completion": 1, "text": 1}, {}),
    ("malformed.jsonl", 5, {1, 6}, {2: "malformed_json", 3: "not_an_object", 4: "not_an_object"}, {"alpaca": 2}, {}),
    ("unknown_format.jsonl", 2, {2}, {1: "unknown_format"}, {"alpaca": 1}, {}),
    ("role_order.jsonl", 5, {5}, {1: "bad_role_order", 2: "last_turn_not_assistant", 3: "unknown_role",
                                  4: "bad_role_order"}, {"chat": 5}, {}),
    ("multiline.csv", 3, {1, 2}, {3: "placeholder_answer"}, {"alpaca": 3}, {}),
    ("data.tsv", 2, {1}, {2: "answer_too_short"}, {"prompt_completion": 2}, {}),
]


@pytest.mark.parametrize("name, rows_in, kept_rows, reasons, formats, repaired", CASES, ids=[c[0] for c in CASES])
def test_hostile_file(tmp_path, name, rows_in, kept_rows, reasons, formats, repaired):
    entry, source, rejected, kept, summary = run_pipeline(tmp_path, HOSTILE / name)
    assert entry["rows"] == rows_in
    assert source["rows_in"] == rows_in == source["kept"] + sum(source["rejected"].values())   # nothing lost
    assert summary["rows_in"] == sum(summary["kept"].values()) + sum(summary["rejected"].values())
    assert set(kept) == kept_rows
    assert {r["row"]: r["reason"] for r in rejected} == reasons
    assert all(r["detail"] for r in rejected if r["reason"] not in ("no_assistant_turn", "placeholder_answer",
                                                                    "answer_too_short"))
    assert source["formats"] == formats
    expected_repairs = {"control_chars": 0, "invalid_utf8": 0, **repaired}
    assert source["repaired"] == expected_repairs
    assert entry["repaired"] == {"invalid_utf8": expected_repairs["invalid_utf8"]}


def test_repaired_text_is_clean(tmp_path):
    _, _, _, kept, _ = run_pipeline(tmp_path, HOSTILE / "control_chars.jsonl")
    assert kept[1]["messages"][1]["content"] == "An answer with a NUL and a bell inside."
    assert kept[2]["messages"][1]["content"] == "Raw NUL  and escape  bytes, repaired."
    (tmp_path / "b").mkdir()
    _, _, _, kept, _ = run_pipeline(tmp_path / "b", HOSTILE / "invalid_utf8.jsonl")
    assert kept[2]["messages"][0]["content"] == "Caf\ufffd au lait\ufffd?"


def test_bom_and_crlf_leave_no_trace(tmp_path):
    _, _, _, kept, _ = run_pipeline(tmp_path, HOSTILE / "bom_crlf.jsonl")
    assert kept[1]["messages"][0]["content"] == "BOM first line?"
    assert kept[2]["messages"][1]["content"] == "An answer\nover two lines."


def test_csv_quoted_multiline_fields_are_one_row(tmp_path):
    _, _, _, kept, _ = run_pipeline(tmp_path, HOSTILE / "multiline.csv")
    assert kept[1]["messages"][1]["content"] == 'First line, with a comma.\nSecond line: "quoted", too.'
    assert kept[2]["messages"][0]["content"] == "Multi-line\ninstruction?\n\nsome\ncontext"
    assert kept[2]["messages"][1]["content"] == "A multi-line\n\nanswer, normalized."


def test_malformed_rows_keep_their_line_and_text(tmp_path):
    _, _, rejected, _, _ = run_pipeline(tmp_path, HOSTILE / "malformed.jsonl")
    first = rejected[0]
    assert first["row"] == 2 and first["detail"].startswith("malformed JSON: Expecting ',' delimiter at column")
    assert first["text"] == '{"instruction": "Broken line?", "output": "missing the closing brace"'
    assert first["record"] is None
    assert rejected[1]["detail"] == "not an object: got list" and rejected[1]["text"] == "[1, 2, 3]"


def test_unknown_format_names_the_keys(tmp_path):
    _, _, rejected, _, _ = run_pipeline(tmp_path, HOSTILE / "unknown_format.jsonl")
    assert "keys: ['answer', 'question', 'source']" in rejected[0]["detail"]


def test_huge_record_is_rejected_without_being_loaded(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = json.dumps({"instruction": "Huge?", "output": "x" * (30 * 1024 * 1024)})
    path.write_text(json.dumps({"instruction": "Small?", "output": ANSWER}) + "\n" + huge + "\n"
                    + json.dumps({"instruction": "After?", "output": ANSWER}) + "\n", encoding="utf-8")
    entry, source, rejected, kept, _ = run_pipeline(tmp_path, path)
    assert set(kept) == {1, 3} and source["rows_in"] == 3
    assert [(r["row"], r["reason"]) for r in rejected] == [(2, "record_too_large")]
    assert rejected[0]["detail"] == f"record too large: {len(huge)} bytes (limit {MAX_RECORD_BYTES})"
    assert rejected[0]["text"] == huge[:200]
    assert (tmp_path / "raw" / "hostile.jsonl").stat().st_size < 10_000   # never copied into data/raw


def test_huge_csv_field_is_rejected(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text(f"instruction,output\nSmall?,{ANSWER}\nHuge?,\"{'y' * (2 * MAX_RECORD_BYTES)}\"\n"
                    f"After?,{ANSWER}\n", encoding="utf-8")
    _, source, rejected, kept, _ = run_pipeline(tmp_path, path)
    assert set(kept) == {1, 3} and source["rows_in"] == 3
    assert [(r["row"], r["reason"]) for r in rejected] == [(2, "record_too_large")]


def test_deeply_nested_record_is_rejected(tmp_path):
    path = tmp_path / "nested.jsonl"
    nested = '{"instruction": "Nested?", "output": ' + "[" * 1000 + "]" * 1000 + "}"
    deeper = "[" * 100_000 + "]" * 100_000   # past the JSON parser's own recursion limit
    path.write_text(nested + "\n" + deeper + "\n" + json.dumps({"instruction": "Flat?", "output": ANSWER}) + "\n",
                    encoding="utf-8")
    _, source, rejected, kept, _ = run_pipeline(tmp_path, path)
    assert set(kept) == {3} and source["rows_in"] == 3
    assert [(r["row"], r["reason"]) for r in rejected] == [(1, "too_deeply_nested"), (2, "too_deeply_nested")]
    assert rejected[0]["detail"] == f"nested too deeply: more than {MAX_NESTING} levels"


def test_hugging_face_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "hf_dataset"
    datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "From a HF dataset?"}, {"role": "assistant", "content": ANSWER}]},
        {"messages": [{"role": "user", "content": "Second HF row?"}, {"role": "assistant", "content": "n/a"}]},
    ]).save_to_disk(str(folder))
    entry, source, rejected, kept, _ = run_pipeline(tmp_path, folder)
    assert entry["rows"] == 2 and len(entry["origin"]["sha256"]) == 64
    assert set(kept) == {1} and [(r["row"], r["reason"]) for r in rejected] == [(2, "placeholder_answer")]
    assert source["formats"] == {"chat": 2}


@pytest.mark.parametrize("name, message", [
    ("not_array.json", r"not_array\.json: a \.json source must hold an array of objects"),
    ("broken_array.json", r"broken_array\.json: line 3: malformed JSON .*convert the file to JSONL"),
    ("spreadsheet.xlsx", r"spreadsheet\.xlsx: unsupported file type '\.xlsx'; use one of"),
    ("missing.jsonl", r"file .*missing\.jsonl does not exist\. Put your data under data/sources/"),
])
def test_unreadable_files_are_clear_errors(tmp_path, name, message):
    with pytest.raises(PipelineError, match=message):
        run_pipeline(tmp_path, HOSTILE / name)


def test_folder_that_is_not_a_dataset_is_a_clear_error(tmp_path):
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    shutil.copy(HOSTILE / "bom_crlf.jsonl", folder)
    with pytest.raises(PipelineError, match=r"just_a_folder: a folder, but not a Hugging Face dataset"):
        run_pipeline(tmp_path, folder)


def test_raw_error_rows_have_the_documented_shape(tmp_path):
    run_pipeline(tmp_path, HOSTILE / "malformed.jsonl")
    rows = read_jsonl(tmp_path / "raw" / "hostile.jsonl")
    assert [set(row) for row in rows] == [{"row", "record"}, {"row", "error", "text"}, {"row", "error", "text"},
                                          {"row", "error", "text"}, {"row", "record"}]
