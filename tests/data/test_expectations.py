"""The data gate's tables and suites (ftpipe.data.expectations): each example measured once, clean's rejection
counts per source, and suites built from params whose PII checks find what Python's `re` finds.

The example builders and params here are also those of tests/stages/test_validate.py and
tests/data/test_data_docs.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.params import CleanParams, ValidateParams
from ftpipe.data.expectations import (
    ALL_SOURCES,
    COLUMNS,
    SHAPE_ONLY_PII_KINDS,
    example_expectations,
    example_frame,
    measure,
    rejection_expectations,
    rejection_frame,
)
from ftpipe.data.pii import VALIDATION_PATTERNS

# The shares are 0.9, not params.yaml's 0.99 and 0.999, so that a row or two in these ~10-row tables
# tips them: one offending row in 11 or more passes, two in 11 to 19 fail.
PARAMS = ValidateParams(min_train_rows=4, min_validation_rows=2, min_test_rows=2,
                        allowed_roles=["system", "user", "assistant"], max_rejection_rate=0.2,
                        pii_shape_mostly=0.9, answer_not_prompt_mostly=0.9, min_unique_answer_share=0.9)
CLEAN = CleanParams(min_answer_chars=10, max_prompt_chars=200, max_answer_chars=80, placeholder_answers=["n/a"],
                    split_salt="t", validation_fraction=0.1, test_fraction=0.1, pii_action="redact",
                    near_duplicate_threshold=0.7, decontamination_threshold=0.8)
# 9 row checks, the echo and unique-answer checks, one per PII kind, one row count per split
N_EXAMPLE_EXPECTATIONS = 9 + 2 + len(VALIDATION_PATTERNS) + 3
# clean's summary.json per source: (rows in, rows rejected); 10% and 5% are within max_rejection_rate
GOOD_SOURCES = {"unit": (100, 10), "other": (20, 1)}


def example(row_id: str, roles=("user", "assistant"), answer: str | None = None, prompt: str | None = None) -> dict:
    """A chat example; every answer differs (the unique-answer check) unless one is given."""
    answer = f"A clear answer about {row_id}, long enough." if answer is None else answer
    prompt = f"Question {row_id}?" if prompt is None else prompt
    messages = [{"role": role, "content": answer if role == "assistant" else prompt} for role in roles]
    return {"id": row_id, "source": "unit", "source_row": 1, "format": "chat", "messages": messages}


def summary(sources: dict[str, tuple[int, int]]) -> dict:
    """clean's summary.json for sources {name: (rows in, rows rejected)}, with two rejection reasons."""
    def reasons(rejected: int) -> dict:
        return {"answer_too_short": rejected - rejected // 2, "malformed_json": rejected // 2}
    return {"rows_in": sum(rows_in for rows_in, _ in sources.values()),
            "kept": {"train": 0, "validation": 0, "test": 0},
            "rejected": reasons(sum(rejected for _, rejected in sources.values())),
            "sources": {name: {"rows_in": rows_in, "kept": rows_in - rejected, "rejected": reasons(rejected),
                               "formats": {"chat": rows_in}, "repaired": {}}
                        for name, (rows_in, rejected) in sources.items()}}


def write_splits(clean_dir: Path, splits: dict[str, list[dict]], sources=GOOD_SOURCES) -> Path:
    """clean's output folder: the split files and summary.json."""
    clean_dir.mkdir(parents=True)
    for split, rows in splits.items():
        (clean_dir / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (clean_dir / "summary.json").write_text(json.dumps(summary(sources)), encoding="utf-8")
    return clean_dir


def good_splits() -> dict[str, list[dict]]:
    return {"train": [example(f"tr{i}") for i in range(4)] + [example("tr-sys", roles=("system", "user", "assistant"))],
            "validation": [example(f"va{i}") for i in range(2)],
            "test": [example(f"te{i}") for i in range(2)]}


# Text that is not personal data although it has digits, dots, '@' or key-like words: redaction
# placeholders, a version, a date, a hex literal, a slice, user@host without a domain, and a card-like
# number whose separators differ (ftpipe.data.pii's card pattern needs one separator throughout: a backref).
NOT_PII = ("Write to [EMAIL] or call [PHONE]; key [API_KEY], card [PAYMENT_CARD], host [IP_ADDRESS]. "
           "Python 3.11.7 from 2026-11-23, mask 0x7fffffff, x[::2], ssh user@host, ref 4111 1111-1111 1111.")
# Personal data and secrets, in the user's turn, the answer or a system turn: every turn is checked.
PII_ROWS = {
    "pii-email": {"prompt": "Mail me at jane.doe@example.com about it."},
    "pii-email-accented": {"answer": "Écrivez à jane.doe@example.com, s'il vous plaît."},   # non-ASCII text
    "pii-ip": {"prompt": "Why is the server at 10.0.0.5 down?"},
    "pii-key": {"prompt": 'My config says API_KEY = "a8f9Zq2LmN4pR7tX1vB3"; is it set?'},   # (?i:...) in the pattern
    "pii-aws-key": {"answer": "Use the key AKIAIOSFODNN7EXAMPLE for the bucket."},
    "pii-private-key": {"prompt": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x",
                        "roles": ("system", "user", "assistant")},
    "pii-phone": {"answer": "Call us at (555) 123-4567 any day."},
    "pii-phone-intl": {"prompt": "Is +44 20 7946 0958 the office?"},
    "pii-phone-dotted": {"answer": "Dial 555.123.4567 for the desk."},
    "pii-card": {"prompt": "Charge 4111 1111 1111 1111 for it."},
    "pii-card-dashed": {"answer": "Pay with card 5500-0000-0000-0004 now."},
    "pii-card-amex": {"prompt": "Is 3782 822463 10005 an Amex number?"},
}


def pii_splits() -> dict[str, list[dict]]:
    """The good splits plus every PII row and the not-PII row, in train."""
    splits = good_splits()
    splits["train"] += [example("not-pii", prompt=NOT_PII)]
    splits["train"] += [example(row_id, **row) for row_id, row in PII_ROWS.items()]
    return splits


def test_measure_multi_turn_and_malformed_rows():
    row = {"id": "m", "source": "s", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "More?"},
        {"role": "assistant", "content": " More? "}]}
    assert measure(row) == {"id": "m", "source": "s", "roles": "system,user,assistant,user,assistant",
                            "last_role": "assistant", "content": "Be brief.\nHi?\nHello there.\nMore?\n More? ",
                            "answer": "Hello there.\n More? ", "answer_repeats_prompt": True,
                            "prompt_chars": 9 + 3 + 5, "answer_chars_min": 7, "answer_chars_max": 12}
    missing = measure({"id": "x", "messages": [{"role": "user", "content": None}, {"content": "A"}]})
    assert missing["content"] is None and missing["roles"] == "user," and missing["answer_chars_min"] == 0
    assert missing["answer"] is None and missing["answer_repeats_prompt"] is False
    empty = measure({"id": "y"})
    assert empty["last_role"] == "" and empty["content"] is None and empty["source"] is None
    # the system prompt is not the question: an answer equal to it is no echo
    assert not measure(example("s", roles=("system", "assistant"), answer="Question s?"))["answer_repeats_prompt"]


def test_example_frame_has_one_row_per_example_located_by_split_and_line(tmp_path):
    frame = example_frame(write_splits(tmp_path / "clean", good_splits()))
    assert list(frame.columns) == COLUMNS
    assert list(zip(frame["split"], frame["line"], frame["id"]))[4:7] == [
        ("train", 5, "tr-sys"), ("validation", 1, "va0"), ("validation", 2, "va1")]
    assert len(frame) == 9 and frame["roles"].iloc[4] == "system,user,assistant"


def test_missing_split_says_which_stage_to_run(tmp_path):
    clean_dir = write_splits(tmp_path / "clean", {"train": [example("a")], "validation": [example("b")]})
    with pytest.raises(PipelineError, match=r"test\.jsonl: not found.*dvc repro clean"):
        example_frame(clean_dir)


def test_rejection_frame_has_a_row_per_source_and_one_for_all(tmp_path):
    clean_dir = write_splits(tmp_path / "clean", good_splits(), {**GOOD_SOURCES, "empty": (0, 0)})
    frame = rejection_frame(clean_dir / "summary.json")
    assert frame.to_dict("records") == [
        {"source": "unit", "rows_in": 100, "rejected": 10, "rejection_rate": 0.1},
        {"source": "other", "rows_in": 20, "rejected": 1, "rejection_rate": 0.05},
        {"source": "empty", "rows_in": 0, "rejected": 0, "rejection_rate": 0.0},   # no rows: none rejected
        {"source": ALL_SOURCES, "rows_in": 120, "rejected": 11, "rejection_rate": 11 / 120}]


def test_missing_or_foreign_summary_says_which_stage_to_run(tmp_path):
    clean_dir = write_splits(tmp_path / "clean", good_splits())
    (clean_dir / "summary.json").write_text(json.dumps({"rows_in": 3}))
    with pytest.raises(PipelineError, match=r"summary\.json: not the clean stage's summary.*'sources'.*dvc repro"):
        rejection_frame(clean_dir / "summary.json")
    (clean_dir / "summary.json").unlink()
    with pytest.raises(PipelineError, match=r"summary\.json: not found.*dvc repro clean"):
        rejection_frame(clean_dir / "summary.json")


def test_suites_are_built_from_params_and_name_their_keys():
    import great_expectations as gx

    examples = example_expectations(gx, PARAMS, CLEAN)
    assert len(examples) == N_EXAMPLE_EXPECTATIONS
    pii = {re.search(r"pattern '(\w+)'", e.description).group(1): e for e in examples if "ftpipe.data.pii" in
           (e.description or "")}
    assert pii.keys() == VALIDATION_PATTERNS.keys()
    assert {kind: e.mostly for kind, e in pii.items()} == {
        kind: (0.9 if kind in SHAPE_ONLY_PII_KINDS else 1) for kind in VALIDATION_PATTERNS}
    roles = next(e for e in examples if e.column == "roles")
    assert re.fullmatch(roles.regex, "system,user,assistant,user,assistant") and not re.fullmatch(
        roles.regex, "user,robot")
    assert "clean.max_answer_chars = 80" in next(e.description for e in examples if e.column == "answer_chars_max")
    (rejections,) = rejection_expectations(gx, PARAMS)
    assert rejections.column == "rejection_rate" and rejections.max_value == 0.2
    assert "validate.max_rejection_rate = 0.2" in rejections.description


def test_pii_checks_find_what_python_re_finds(tmp_path):
    """GX's pandas backend must apply ftpipe.data.pii's Python `re` patterns (lookbehinds, a backref, an
    inline (?i:...) flag) as `re.search` does: the same rows fail, no more, no fewer."""
    from ftpipe.data.data_docs import run_suites
    from ftpipe.data.gate_report import summarize

    splits = pii_splits()
    clean_dir = write_splits(tmp_path / "clean", splits)
    results = run_suites(example_frame(clean_dir), rejection_frame(clean_dir / "summary.json"), PARAMS, CLEAN,
                         tmp_path / "docs")
    contents = {row["id"]: "\n".join(turn["content"] for turn in row["messages"])
                for rows in splits.values() for row in rows}
    checked = set()
    for entry in (summarize(suite, result) for suite, result in results):
        kind = re.search(r"ftpipe\.data\.pii pattern '(\w+)'", entry["description"] or "")
        if kind:
            expected = [row_id for row_id, text in contents.items()
                        if re.search(VALIDATION_PATTERNS[kind.group(1)], text)]
            assert entry["unexpected_count"] == len(expected) and entry["failing_rows"] == expected, kind.group(1)
            assert "not-pii" not in entry["failing_rows"]
            checked.add(kind.group(1))
    assert checked == VALIDATION_PATTERNS.keys()
