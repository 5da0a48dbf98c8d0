"""Stage `validate`: the GX suite passes good clean splits and names every problem in bad ones.

GX takes seconds to import, so each scenario runs the suite once (module-scoped fixtures)
and the tests read what that run wrote.
"""
import json
from pathlib import Path

import pytest

from ftpipe.errors import PipelineError
from ftpipe.params import CleanParams, ValidateParams
from stages.validate import SUITE_NAME, measure, validate_clean

PARAMS = ValidateParams(min_train_rows=4, min_validation_rows=2, min_test_rows=2,
                        allowed_roles=["system", "user", "assistant"])
CLEAN = CleanParams(min_answer_chars=10, max_prompt_chars=200, max_answer_chars=80, placeholder_answers=["n/a"],
                    split_salt="t", validation_fraction=0.1, test_fraction=0.1)
ANSWER = "A clear answer of enough length."
N_EXPECTATIONS = 12   # 9 row checks + one row count per split


def example(row_id: str, roles=("user", "assistant"), answer: str = ANSWER) -> dict:
    messages = [{"role": role, "content": answer if role == "assistant" else f"Question {row_id}?"}
                for role in roles]
    return {"id": row_id, "source": "unit", "source_row": 1, "format": "chat", "messages": messages}


def write_splits(clean_dir: Path, splits: dict[str, list[dict]]) -> Path:
    clean_dir.mkdir(parents=True)
    for split, rows in splits.items():
        (clean_dir / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return clean_dir


def good_splits() -> dict[str, list[dict]]:
    return {"train": [example(f"tr{i}") for i in range(4)] + [example("tr-sys", roles=("system", "user", "assistant"))],
            "validation": [example(f"va{i}") for i in range(2)],
            "test": [example(f"te{i}") for i in range(2)]}


@pytest.fixture(scope="module")
def passed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pass")
    failed_dir = root / "logs" / "validate-failed"
    failed_dir.mkdir(parents=True)
    (failed_dir / "results.json").write_text("{}")   # a stale report from an earlier failure
    out_dir = root / "out"
    out_dir.mkdir()
    metrics = validate_clean(write_splits(root / "clean", good_splits()), PARAMS, CLEAN, out_dir, failed_dir)
    return out_dir, metrics, failed_dir


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail")
    splits = good_splits()
    splits["train"] += [example("dup-1"), example("user-last", roles=("user", "assistant", "user")),
                        example("too-long", answer="x" * 81), example("robot", roles=("robot", "assistant"))]
    splits["validation"].append(example("dup-1"))   # the same id in two splits
    splits["test"] = splits["test"][:1]             # below min_test_rows = 2
    out_dir = root / "out"
    out_dir.mkdir()
    with pytest.raises(PipelineError) as error:
        validate_clean(write_splits(root / "clean", splits), PARAMS, CLEAN, out_dir, root / "failed")
    return str(error.value), root / "failed"


def test_good_data_passes_every_expectation(passed):
    out_dir, metrics, _ = passed
    report = json.loads((out_dir / "results.json").read_text())
    assert report["success"] is True and report["suite"] == SUITE_NAME
    assert report["rows"] == {"train": 5, "validation": 2, "test": 2}
    assert len(report["expectations"]) == N_EXPECTATIONS
    assert all(entry["success"] for entry in report["expectations"])
    counts = {entry["kwargs"]["row_condition"]["parameter"]: entry["observed_value"]
              for entry in report["expectations"] if entry["type"] == "expect_table_row_count_to_be_between"}
    assert counts == report["rows"]
    assert metrics == {"expectations": N_EXPECTATIONS, "failed": 0, "rows": 9}


def test_good_data_gets_a_data_docs_site(passed):
    out_dir, _, _ = passed
    index = out_dir / "data_docs" / "index.html"
    assert index.is_file() and SUITE_NAME in index.read_text(encoding="utf-8")
    pages = list((out_dir / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 1 and "clean.max_answer_chars = 80" in pages[0].read_text(encoding="utf-8")


def test_success_removes_a_stale_failure_report(passed):
    assert not passed[2].exists()


def test_bad_data_names_each_failed_expectation_and_row(failed):
    message, _ = failed
    assert "5 of 12 data expectations failed" in message
    lines = {line.split(" (")[0].strip("- "): line for line in message.splitlines() if line.startswith("  - ")}
    assert set(lines) == {
        "expect_column_values_to_be_unique on column 'id'",
        "expect_column_values_to_be_in_set on column 'last_role'",
        "expect_column_values_to_be_between on column 'answer_chars_max'",
        "expect_column_values_to_match_regex on column 'roles'",
        "expect_table_row_count_to_be_between",
    }
    assert lines["expect_column_values_to_be_unique on column 'id'"].endswith("2 row(s) failed, e.g. dup-1")
    assert lines["expect_column_values_to_be_in_set on column 'last_role'"].endswith("e.g. user-last")
    assert lines["expect_column_values_to_be_between on column 'answer_chars_max'"].endswith("e.g. too-long")
    assert lines["expect_column_values_to_match_regex on column 'roles'"].endswith("e.g. robot")
    assert "test has at least validate.min_test_rows = 2 rows): observed 1" in message
    assert "Fix the data" in message and "params.yaml" in message


def test_bad_data_keeps_the_report_outside_the_published_folder(failed):
    message, failed_dir = failed
    assert f"{failed_dir}/" in message
    report = json.loads((failed_dir / "results.json").read_text())
    assert report["success"] is False
    assert sum(not entry["success"] for entry in report["expectations"]) == 5
    unique = next(e for e in report["expectations"] if e["type"] == "expect_column_values_to_be_unique")
    assert unique["unexpected_count"] == 2 and unique["example_ids"] == ["dup-1"]
    assert (failed_dir / "data_docs" / "index.html").is_file()


def test_missing_split_says_which_stage_to_run(tmp_path):
    clean_dir = write_splits(tmp_path / "clean", {"train": [example("a")], "validation": [example("b")]})
    with pytest.raises(PipelineError, match=r"test\.jsonl: not found.*dvc repro clean"):
        validate_clean(clean_dir, PARAMS, CLEAN, tmp_path / "out", tmp_path / "failed")


def test_measure_multi_turn_and_malformed_rows():
    row = {"id": "m", "source": "s", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Yes."}]}
    assert measure(row) == {"id": "m", "source": "s", "roles": "system,user,assistant,user,assistant",
                            "last_role": "assistant", "content": "Be brief.\nHi?\nHello there.\nMore?\nYes.",
                            "prompt_chars": 9 + 3 + 5, "answer_chars_min": 4, "answer_chars_max": 12}
    missing = measure({"id": "x", "messages": [{"role": "user", "content": None}, {"content": "A"}]})
    assert missing["content"] is None and missing["roles"] == "user," and missing["answer_chars_min"] == 0
    empty = measure({"id": "y"})
    assert empty["last_role"] == "" and empty["content"] is None and empty["source"] is None
