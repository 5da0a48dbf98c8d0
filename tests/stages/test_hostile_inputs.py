"""Hostile input through ingest + clean: every file is repaired or rejected row by row, never a crash,
and only a file that cannot be read at all is a PipelineError. For every file, the rows in equal the
rows kept plus the rows quarantined in rejected.jsonl (with source, row number and reason).

The small files live in tests/fixtures/hostile/; the huge (30 MB) and deeply nested records and the
Hugging Face dataset folder are generated at run time instead of being committed."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_jsonl
from ftpipe.core.params import CleanParams, SourceParams
from ftpipe.data.readers import MAX_NESTING, MAX_RECORD_BYTES
from stages.clean import clean_sources
from stages.ingest import ingest_source

HOSTILE = Path(__file__).resolve().parents[1] / "fixtures" / "hostile"
# Tiny held-out fractions: nearly every kept row lands in train, so no file can empty the train split.
PARAMS = CleanParams(min_answer_chars=10, max_prompt_chars=1000, max_answer_chars=1000,
                     placeholder_answers=["n/a", "none", "todo"], split_salt="h1",
                     validation_fraction=0.01, test_fraction=0.01, pii_action="redact",
                     near_duplicate_threshold=0.7, decontamination_threshold=0.8)
ANSWER = "A clear answer of enough length."
ANCHOR = [{"instruction": f"Anchor question {i}?", "output": f"Anchor answer {i}, long enough."} for i in range(3)]


def run_pipeline(tmp_path: Path, source_path: Path, params: CleanParams = PARAMS
                 ) -> tuple[dict, dict, list[dict], dict, dict]:
    """ingest `source_path` (plus a small anchor source), then clean. Returns (provenance entry, the
    hostile source's summary, its rejected rows, its kept rows by source row, the whole summary)."""
    out = tmp_path / "raw"
    out.mkdir()
    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR), encoding="utf-8")
    entries = [ingest_source(SourceParams(name="hostile", type="file", path=str(source_path)), out, keep_pii=False),
               ingest_source(SourceParams(name="anchor", type="file", path=str(anchor)), out, keep_pii=False)]
    (out / "provenance.json").write_text(json.dumps({"stage": "ingest", "sources": entries}), encoding="utf-8")
    splits, rejected, summary = clean_sources(out, params)
    kept = {row["source_row"]: row for rows in splits.values() for row in rows if row["source"] == "hostile"}
    return entries[0], summary["sources"]["hostile"], [r for r in rejected if r["source"] == "hostile"], kept, summary


# (file in tests/fixtures/hostile, rows in, kept source rows, {row: reason}, formats, repaired counts)
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
    ("pii.jsonl", 7, {1, 2, 3, 4, 5, 6, 7}, {}, {"alpaca": 7}, {}),   # clean.pii_action: redact
    ("near_duplicates.jsonl", 5, {1, 4}, {2: "near_duplicate", 3: "duplicate", 5: "near_duplicate"},
     {"alpaca": 5}, {}),
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


# The values planted in tests/fixtures/hostile/pii.jsonl: none may survive anywhere clean writes.
PII_VALUES = ["jane.doe@example.com", "(555) 123-4567", "10.20.30.40", "2001:db8:85a3::8a2e:370:7334",
              "4111 1111 1111 1111", "AKIAIOSFODNN7EXAMPLE", "q8Zt3LmN0pRx7VbW2kYs", "MIIEowIBAAKCAQEA7bq9r2Xq1Z"]
PII_FOUND = {"email": 1, "phone": 1, "ip_address": 2, "payment_card": 1, "api_key": 2, "private_key": 1}


def test_pii_is_redacted_with_typed_placeholders_and_counted_by_kind(tmp_path):
    _, source, _, kept, summary = run_pipeline(tmp_path, HOSTILE / "pii.jsonl")
    answers = {row: kept[row]["messages"][1]["content"] for row in kept}
    assert answers[1] == "Write to [EMAIL] or call [PHONE] during office hours."
    assert answers[2] == "The wiki runs on [IP_ADDRESS], and on [IP_ADDRESS] for IPv6."
    assert answers[3] == "The card [PAYMENT_CARD] was charged on the first of the month."
    assert answers[5] == 'Your key id is [API_KEY] and the config says api_key = "[API_KEY]".'
    assert answers[6] == "Here it is:\n[PRIVATE_KEY]"
    # A 16-digit number that fails the Luhn check is not a card: kept as written.
    assert kept[4]["messages"][0]["content"] == "Is 4111 1111 1111 1112 a card number?"
    assert source["pii"] == {"action": "redact", "rows": 5, "found": PII_FOUND}
    assert summary["pii"] == {"action": "redact", "rows": 5, "found": PII_FOUND}   # the anchor source has none
    assert not any(value in json.dumps(summary) for value in PII_VALUES)


def test_pii_reject_quarantines_the_rows_without_the_values(tmp_path):
    params = dataclasses.replace(PARAMS, pii_action="reject")
    _, source, rejected, kept, summary = run_pipeline(tmp_path, HOSTILE / "pii.jsonl", params)
    assert set(kept) == {4, 7}
    assert {r["row"]: r["reason"] for r in rejected} == {1: "pii", 2: "pii", 3: "pii", 5: "pii", 6: "pii"}
    assert rejected[0]["detail"] == "contains email (1), phone (1)"
    assert rejected[0]["messages"][1]["content"] == "Write to [EMAIL] or call [PHONE] during office hours."
    assert rejected[0]["record"]["output"] == "Write to [EMAIL] or call [PHONE] during office hours."
    assert source["pii"] == {"action": "reject", "rows": 5, "found": PII_FOUND}
    assert source["rejected"] == {"pii": 5}
    quarantine = json.dumps(rejected) + json.dumps(summary)
    assert not any(value in quarantine for value in PII_VALUES)


def test_quarantined_rows_of_any_reason_hold_no_pii(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"instruction": "Mail?", "output": "a@b.co"}) + "\n"
                    + '{"instruction": "Broken, mail x.y@example.org", "output": \n', encoding="utf-8")
    _, _, rejected, _, _ = run_pipeline(tmp_path, path)
    assert [(r["row"], r["reason"]) for r in rejected] == [(1, "answer_too_short"), (2, "malformed_json")]
    assert rejected[0]["record"] == {"instruction": "Mail?", "output": "[EMAIL]"}
    assert "x.y@example.org" not in json.dumps(rejected) and "[EMAIL]" in rejected[1]["text"]


def test_near_duplicates_name_the_row_they_repeat(tmp_path):
    _, _, rejected, kept, _ = run_pipeline(tmp_path, HOSTILE / "near_duplicates.jsonl")
    details = {r["row"]: r["detail"] for r in rejected}
    assert details[2] == "Jaccard 0.75 with hostile row 1 (kept)"   # two words of 41 changed
    assert details[3] == "same content as hostile row 1"
    assert details[5] == "Jaccard 1.00 with hostile row 1 (kept)"   # only case and punctuation differ
    assert [m["content"] for m in rejected[1]["messages"]][0] == "Describe the river."


def test_a_lower_threshold_is_stricter_a_higher_one_looser(tmp_path):
    strict = dataclasses.replace(PARAMS, near_duplicate_threshold=0.75)
    _, _, rejected, _, _ = run_pipeline(tmp_path, HOSTILE / "near_duplicates.jsonl", strict)
    assert {r["row"] for r in rejected if r["reason"] == "near_duplicate"} == {2, 5}
    (tmp_path / "b").mkdir()
    loose = dataclasses.replace(PARAMS, near_duplicate_threshold=0.8)
    _, _, rejected, kept, _ = run_pipeline(tmp_path / "b", HOSTILE / "near_duplicates.jsonl", loose)
    assert {r["row"] for r in rejected if r["reason"] == "near_duplicate"} == {5} and 2 in kept
