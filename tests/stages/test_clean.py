"""Stage `clean`: clean_sources end to end (counts that add up, rejected rows with their reasons, a split that
keeps rows where they were, near-duplicates and decontamination) and main(). The formats and the per-row rules
are tested in tests/data/test_formats.py and tests/data/test_rules.py."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, read_jsonl
from ftpipe.data.formats import RECORD_FORMATS, to_messages
from ftpipe.data.rules import assign_split, content_id
from stages import clean
from stages.clean import clean_sources
from tests.data_fixtures import ANSWER, CLEAN_PARAMS, assistant, user

REPO = Path(__file__).resolve().parents[2]
PARAMS = CLEAN_PARAMS


def qa(i: int, answer: str = ANSWER) -> dict:
    return {"instruction": f"Question number {i}?", "output": answer}


def write_raw(raw_dir: Path, sources: dict[str, list[dict]]) -> Path:
    """data/raw as ingest writes it: <name>.jsonl of {"row", "record"} plus provenance.json."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, records in sources.items():
        lines = [json.dumps({"row": n, "record": record}) + "\n" for n, record in enumerate(records, start=1)]
        (raw_dir / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
        entries.append({"name": name, "file": f"{name}.jsonl"})
    (raw_dir / "provenance.json").write_text(json.dumps({"stage": "ingest", "sources": entries}), encoding="utf-8")
    return raw_dir


def split_of(splits: dict[str, list]) -> dict[str, str]:
    return {row["id"]: split for split, rows in splits.items() for row in rows}


# --- clean_sources -----------------------------------------------------------------------------

@pytest.fixture
def mixed_raw(tmp_path) -> Path:
    first = [
        qa(1),                                                    # kept
        qa(2, "N/A"),                                             # placeholder
        qa(3, "short"),                                           # too short
        qa(4, "x" * 300),                                         # too long
        {"instruction": "p" * 150, "output": ANSWER},             # prompt too long
        {"messages": [user("Only a question?")]},                 # no assistant turn
        {"prompt": "Empty?", "completion": "   "},                # empty after normalization
        qa(1),                                                    # exact duplicate of row 1
        {"instruction": "Question number 1?  ", "output": ANSWER + "\r\n"},   # duplicate after normalization
        {"messages": [user("Hello there?"), assistant("General Kenobi, indeed.")]},   # kept
    ]
    second = [
        {"conversations": [{"from": "human", "value": "Question number 1?"}, {"from": "gpt", "value": ANSWER}]},
        {"prompt": "Capital of France?", "completion": "Paris is the capital of France."},
        {"conversations": [{"from": "human", "value": "Ping?"}, {"from": "gpt", "value": "Pong, from the gpt."}]},
    ]
    return write_raw(tmp_path / "raw", {"first": first, "second": second})


def test_clean_sources_counts_add_up(mixed_raw):
    splits, rejected, summary = clean_sources(mixed_raw, PARAMS)
    assert summary["sources"]["first"] == {
        "rows_in": 10, "kept": 2,
        "rejected": {"placeholder_answer": 1, "answer_too_short": 1, "answer_too_long": 1, "prompt_too_long": 1,
                     "no_assistant_turn": 1, "empty_answer": 1, "duplicate": 2},
        "formats": {"alpaca": 7, "chat": 2, "prompt_completion": 1},
        "repaired": {"control_chars": 0, "invalid_utf8": 0}, "pii": {"action": "redact", "rows": 0, "found": {}},
    }
    assert summary["sources"]["second"] == {"rows_in": 3, "kept": 2,
                                            "rejected": {"duplicate": 1},
                                            "formats": {"sharegpt": 2, "prompt_completion": 1},
                                            "repaired": {"control_chars": 0, "invalid_utf8": 0},
                                            "pii": {"action": "redact", "rows": 0, "found": {}}}
    for name, source in summary["sources"].items():
        assert source["rows_in"] == source["kept"] + sum(source["rejected"].values()), name
    assert summary["rows_in"] == 13
    assert summary["kept"] == {split: len(rows) for split, rows in splits.items()}
    assert set(summary["kept"]) == {"train", "validation", "test"}
    assert sum(summary["kept"].values()) == 4
    assert summary["rows_in"] == sum(summary["kept"].values()) + len(rejected)
    assert summary["rejected"] == dict(Counter(r["reason"] for r in rejected))
    assert summary["rejected"]["duplicate"] == 3


def test_every_rejected_row_says_where_it_came_from_and_why(mixed_raw):
    _, rejected, _ = clean_sources(mixed_raw, PARAMS)
    assert [(r["source"], r["row"], r["reason"]) for r in rejected] == [
        ("first", 2, "placeholder_answer"), ("first", 3, "answer_too_short"), ("first", 4, "answer_too_long"),
        ("first", 5, "prompt_too_long"), ("first", 6, "no_assistant_turn"), ("first", 7, "empty_answer"),
        ("first", 8, "duplicate"), ("first", 9, "duplicate"), ("second", 1, "duplicate"),
    ]
    by_row = {(r["source"], r["row"]): r for r in rejected}
    assert by_row[("first", 2)]["record"] == qa(2, "N/A")   # the original record, for inspection
    assert by_row[("first", 2)]["detail"] is None
    assert by_row[("first", 8)]["detail"] == "same content as first row 1"
    assert by_row[("second", 1)]["detail"] == "same content as first row 1"   # across sources and formats


def test_kept_rows_are_canonical_and_the_first_duplicate_wins(mixed_raw):
    splits, _, _ = clean_sources(mixed_raw, PARAMS)
    kept = {(row["source"], row["source_row"]): row for rows in splits.values() for row in rows}
    assert set(kept) == {("first", 1), ("first", 10), ("second", 2), ("second", 3)}
    row = kept[("first", 1)]
    assert row["format"] == "alpaca"
    assert row["messages"] == [user("Question number 1?"), assistant(ANSWER)]
    assert row["id"] == content_id(row["messages"]) and len(row["id"]) == 16
    assert kept[("second", 3)]["messages"] == [user("Ping?"), assistant("Pong, from the gpt.")]
    for split, rows in splits.items():
        for row in rows:
            assert set(row) == {"id", "source", "source_row", "format", "messages"}
            assert assign_split(row["id"], PARAMS) == split


def test_unknown_record_format_is_quarantined_with_the_keys_found(tmp_path):
    raw = write_raw(tmp_path / "raw", {"good": [qa(1)], "odd": [qa(2), qa(3), {"body": "free text", "id": 1}]})
    splits, rejected, summary = clean_sources(raw, PARAMS)
    assert [(r["source"], r["row"], r["reason"]) for r in rejected] == [("odd", 3, "unknown_format")]
    assert "keys: ['body', 'id']" in rejected[0]["detail"]
    assert all(fmt in rejected[0]["detail"] for fmt in RECORD_FORMATS)
    assert summary["sources"]["odd"]["rejected"] == {"unknown_format": 1}


def test_ingest_error_rows_are_quarantined_with_their_reason(tmp_path):
    raw = write_raw(tmp_path / "raw", {"src": [qa(1), qa(2)]})
    with open(raw / "src.jsonl", "a", encoding="utf-8") as handle:
        for row, error in [(3, "malformed JSON: Expecting value at column 5"), (4, "not an object: got list"),
                           (5, "record too large: 31457300 bytes (limit 1048576)"),
                           (6, "nested too deeply: more than 64 levels")]:
            handle.write(json.dumps({"row": row, "error": error, "text": "xyz"}) + "\n")
    splits, rejected, summary = clean_sources(raw, PARAMS)
    assert [(r["row"], r["reason"]) for r in rejected] == [
        (3, "malformed_json"), (4, "not_an_object"), (5, "record_too_large"), (6, "too_deeply_nested")]
    assert rejected[0]["detail"] == "malformed JSON: Expecting value at column 5" and rejected[0]["text"] == "xyz"
    source = summary["sources"]["src"]
    assert source["rows_in"] == 6 == source["kept"] + sum(source["rejected"].values())


def test_text_records_are_counted_as_format_text_and_rejected(tmp_path):
    raw = write_raw(tmp_path / "raw", {"src": [qa(1), {"text": "Free text to pretrain on, not to chat."}]})
    _, rejected, summary = clean_sources(raw, PARAMS)
    assert [(r["row"], r["reason"]) for r in rejected] == [(2, "no_assistant_turn")]
    assert summary["sources"]["src"]["formats"] == {"alpaca": 1, "text": 1}


def test_control_characters_are_removed_and_counted(tmp_path):
    rows = [qa(1, ANSWER + "\x00\x07"), qa(2), qa(3, "A\x1bclean answer, long enough.")]
    raw = write_raw(tmp_path / "raw", {"src": rows})
    splits, rejected, summary = clean_sources(raw, PARAMS)
    assert rejected == []
    assert summary["sources"]["src"]["repaired"] == {"control_chars": 2, "invalid_utf8": 0}
    answers = {row["source_row"]: row["messages"][-1]["content"] for rows in splits.values() for row in rows}
    assert answers == {1: ANSWER, 2: ANSWER, 3: "Aclean answer, long enough."}


def test_all_rows_rejected_is_an_error(tmp_path):
    raw = write_raw(tmp_path / "raw", {"bad": [qa(1, "n/a"), qa(2, "tiny"), qa(3, "")]})
    with pytest.raises(PipelineError) as error:
        clean_sources(raw, PARAMS)
    message = str(error.value)
    assert message.startswith("no training rows left after cleaning (3 rows in")
    assert "placeholder_answer" in message and "answer_too_short" in message and "clean.*" in message


def test_missing_raw_provenance_says_to_run_ingest_first(tmp_path):
    with pytest.raises(PipelineError, match=r"provenance\.json: file not found.*dvc repro"):
        clean_sources(tmp_path / "raw", PARAMS)


def test_broken_raw_line_names_file_and_line(tmp_path):
    raw = write_raw(tmp_path / "raw", {"src": [qa(1), qa(2)]})
    with open(raw / "src.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"row": 3, "record": \n')
    with pytest.raises(PipelineError, match=r"src\.jsonl: line 3: invalid JSON"):
        clean_sources(raw, PARAMS)


# --- the deterministic split -------------------------------------------------------------------

def many(count: int, start: int = 0) -> list[dict]:
    return [qa(i, f"Answer {i} with enough characters.") for i in range(start, start + count)]


def test_existing_rows_keep_their_split_when_rows_are_added(tmp_path):
    before, _, _ = clean_sources(write_raw(tmp_path / "a", {"src": many(300)}), PARAMS)
    # new rows appended, others inserted before the old ones, plus a whole new source
    grown = {"src": many(100, start=1000) + many(300) + many(100, start=2000), "extra": many(50, start=5000)}
    after, _, summary = clean_sources(write_raw(tmp_path / "b", grown), PARAMS)
    old, new = split_of(before), split_of(after)
    assert len(old) == 300 and len(new) == 550 and summary["rows_in"] == 550
    assert {row_id: new[row_id] for row_id in old} == old
    assert len(set(old.values())) == 3   # the check covers rows of every split


def test_changing_the_salt_changes_some_splits(tmp_path):
    raw = write_raw(tmp_path / "raw", {"src": many(300)})
    first = split_of(clean_sources(raw, PARAMS)[0])
    again = split_of(clean_sources(raw, PARAMS)[0])
    salted = split_of(clean_sources(raw, dataclasses.replace(PARAMS, split_salt="s2"))[0])
    assert again == first
    assert set(salted) == set(first)
    moved = sum(salted[row_id] != first[row_id] for row_id in first)
    assert 50 < moved < 250   # about 1 - (0.7² + 0.1² + 0.2²) = 46% of the rows move


def test_split_fractions_roughly_match(tmp_path):
    splits, rejected, _ = clean_sources(write_raw(tmp_path / "raw", {"src": many(2000)}), PARAMS)
    assert rejected == []
    counts = {split: len(rows) for split, rows in splits.items()}
    assert sum(counts.values()) == 2000
    assert abs(counts["validation"] - 200) < 50    # 0.1 of 2000, sd ~13
    assert abs(counts["test"] - 400) < 60          # 0.2 of 2000, sd ~18
    assert abs(counts["train"] - 1400) < 70


# --- main() ------------------------------------------------------------------------------------

def write_params(**clean_overrides) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    data["clean"].update(clean_overrides)
    Path("params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_main_end_to_end(in_tmp_project, capsys):
    write_params(validation_fraction=0.2, test_fraction=0.2)
    good = [qa(i, f"Answer number {i}, long enough to keep.") for i in range(60)]
    write_raw(Path("data/raw"), {"docs": good + [qa(0, "Answer number 0, long enough to keep."), qa(99, "n/a")],
                                 "chat": [{"messages": [user("Hello?"), assistant("Hi, nice to meet you!")]}]})
    clean.main()

    out = Path("data/clean")
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "rejected.jsonl", "summary.json",
                                                    "test.jsonl", "train.jsonl", "validation.jsonl"]
    splits = {split: read_jsonl(out / f"{split}.jsonl") for split in ("train", "validation", "test")}
    for split, rows in splits.items():
        assert rows, split
        assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)   # stable file content
        assert all(assign_split(row["id"], dataclasses.replace(PARAMS, validation_fraction=0.2,
                                                               test_fraction=0.2, split_salt="v1")) == split
                   for row in rows)
    ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(ids) == len(set(ids)) == 61

    rejected = read_jsonl(out / "rejected.jsonl")
    assert [(r["source"], r["row"], r["reason"]) for r in rejected] == [("docs", 61, "duplicate"),
                                                                       ("docs", 62, "placeholder_answer")]
    summary = read_json(out / "summary.json")
    assert summary["rows_in"] == 63
    assert summary["kept"] == {split: len(rows) for split, rows in splits.items()}
    assert summary["rejected"] == {"duplicate": 1, "placeholder_answer": 1}
    assert summary["sources"]["chat"] == {"rows_in": 1, "kept": 1, "rejected": {}, "formats": {"chat": 1},
                                          "repaired": {"control_chars": 0, "invalid_utf8": 0},
                                          "pii": {"action": "redact", "rows": 0, "found": {}}}
    provenance = read_json(out / "provenance.json")
    assert provenance["stage"] == "clean" and provenance["params"]["clean.split_salt"] == "v1"
    assert provenance["params"]["clean.validation_fraction"] == 0.2

    metrics = read_json(Path("metrics/clean.json"))
    assert metrics == {"rows_in": 63, "rejected": 2, "rows_train": len(splits["train"]),
                       "rows_validation": len(splits["validation"]), "rows_test": len(splits["test"]),
                       "near_duplicates": 0, "decontaminated": 0, "pii_rows": 0, "sources_all_rejected": 0}
    assert sorted(p.name for p in Path("data").iterdir()) == ["clean", "raw"]   # no temp folder left
    assert "clean: 63 rows in" in capsys.readouterr().out


def test_main_failure_publishes_nothing(in_tmp_project):
    write_params()
    write_raw(Path("data/raw"), {"docs": [qa(1, "n/a")]})
    with pytest.raises(PipelineError, match="no training rows left"):
        clean.main()
    assert not Path("data/clean").exists() and not Path("metrics/clean.json").exists()
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw"]


# --- near-duplicates and decontamination ---------------------------------------------------------

def _lands_in(split: str, make) -> dict:
    """The first record make(i) whose content the split hash puts in `split`."""
    for i in range(1000):
        record = make(i)
        _, messages = to_messages(record)
        if assign_split(content_id(messages), PARAMS) == split:
            return record
    raise AssertionError(f"no record lands in {split}")


def test_a_training_row_with_an_evaluation_prompt_is_dropped(tmp_path):
    question = "Which planet in the solar system has the largest number of confirmed moons today?"
    test_row = _lands_in("test", lambda i: {"instruction": question,
                                            "output": f"Saturn, with well over {100 + i} moons."})
    # The same question with another answer, and with one word changed: both would teach the test answer.
    leak = _lands_in("train", lambda i: {"instruction": question, "output": f"It is Saturn; answer variant {i}."})
    near = _lands_in("train", lambda i: {"instruction": question.replace("today", "now"),
                                         "output": f"Probably Saturn, says variant {i}."})
    others = [qa(i, f"Answer number {i}, long enough to keep.") for i in range(20)]
    raw = write_raw(tmp_path / "raw", {"docs": others + [test_row, leak, near]})
    splits, rejected, summary = clean_sources(raw, PARAMS)
    test_id = content_id(to_messages(test_row)[1])
    assert test_id in {row["id"] for row in splits["test"]}                    # the evaluation set is kept
    assert [(r["row"], r["reason"]) for r in rejected] == [(22, "contaminates_evaluation"),
                                                           (23, "contaminates_evaluation")]
    assert rejected[0]["detail"] == f"prompt Jaccard 1.00 with the test example {test_id} (docs row 21)"
    assert rejected[1]["detail"].startswith("prompt Jaccard 0.8")                 # 12 of 14 shingles shared
    assert summary["sources"]["docs"]["rejected"] == {"contaminates_evaluation": 2}
    prompts = {row["messages"][0]["content"] for row in splits["train"]}
    assert question not in prompts


def test_no_evaluation_example_is_a_near_duplicate_of_a_training_example(tmp_path):
    """Property over a noisy corpus: after clean, no validation/test prompt or conversation is within
    the thresholds of any training row (checked by brute force, not with the MinHash index)."""
    import random

    from ftpipe.data.near_dup import shingles

    rng = random.Random(7)
    words = [f"w{i}" for i in range(60)]
    base = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)]
    records = []
    for i in range(300):
        text = rng.choice(base).split()
        for _ in range(rng.randrange(3)):
            text[rng.randrange(len(text))] = rng.choice(words)
        records.append({"instruction": " ".join(text), "output": f"Answer {i}: " + " ".join(rng.sample(words, 8))})
    splits, _, _ = clean_sources(write_raw(tmp_path / "raw", {"noisy": records}), PARAMS)

    def jaccard(a: str, b: str) -> float:
        x, y = shingles(a), shingles(b)
        return len(x & y) / len(x | y)

    def full(row):
        return "\n".join(m["content"] for m in row["messages"])

    assert splits["train"] and splits["test"]
    for held_out in splits["validation"] + splits["test"]:
        for train in splits["train"]:
            assert jaccard(held_out["messages"][0]["content"], train["messages"][0]["content"]) < 0.8
            assert jaccard(full(held_out), full(train)) < 0.7


def test_a_source_whose_rows_are_all_rejected_is_named(in_tmp_project, capsys):
    write_params(validation_fraction=0.2, test_fraction=0.2)
    good = [qa(i, f"Answer number {i}, long enough to keep.") for i in range(60)]
    write_raw(Path("data/raw"), {"docs": good, "junk": [qa(100 + i, "n/a") for i in range(3)]})
    clean.main()
    err = capsys.readouterr().err
    assert "warning: clean: every row of source 'junk' was rejected (3 rows: placeholder_answer 3)" in err
    assert "'docs'" not in err
    assert read_json(Path("metrics/clean.json"))["sources_all_rejected"] == 1
