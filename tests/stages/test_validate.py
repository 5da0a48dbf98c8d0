"""Stage `validate`: the GX suites pass good clean data and name every problem in bad data; main() publishes
the report, the Data Docs and gate.json only when every expectation passed.

GX takes seconds to import, so each scenario runs the suites once (module-scoped fixtures)
and the tests read what that run wrote. The tables and suites are tested in tests/data/test_expectations.py
(whose example builders these tests use), the Data Docs in tests/data/test_data_docs.py, the wording of
results and failures in tests/data/test_gate_report.py.
"""
import json
import re
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, sha256_file
from ftpipe.core.paths import SPLITS
from ftpipe.data.expectations import ALL_SOURCES, REJECTIONS_SUITE_NAME, SUITE_NAME
from ftpipe.data.pii import VALIDATION_PATTERNS
from stages import validate
from stages.validate import validate_clean
from tests.conftest import REPO
from tests.data.test_expectations import (
    CLEAN,
    GOOD_SOURCES,
    N_EXAMPLE_EXPECTATIONS,
    NOT_PII,
    PARAMS,
    example,
    good_splits,
    pii_splits,
    write_splits,
)

N_EXPECTATIONS = N_EXAMPLE_EXPECTATIONS + 1   # + the rejection rate of clean_rejections


def run_failing(root: Path, splits: dict[str, list[dict]], sources=GOOD_SOURCES) -> tuple[str, Path]:
    """Validate data that must fail: (the PipelineError's message, the failure report's folder)."""
    out_dir = root / "out"
    out_dir.mkdir()
    with pytest.raises(PipelineError) as error:
        validate_clean(write_splits(root / "clean", splits, sources), PARAMS, CLEAN, out_dir, root / "failed")
    return str(error.value), root / "failed"


def failure_lines(message: str) -> list[str]:
    return [line for line in message.splitlines() if line.startswith("  - ")]


# A 16-digit number of card shape that fails Luhn: the shape-only payment_card pattern matches it
# (clean would not redact it). One such row in 13 is within pii_shape_mostly = 0.9.
CARD_SHAPED = "Order number 4111 1111 1111 1112 shipped."


@pytest.fixture(scope="module")
def passed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pass")
    failed_dir = root / "logs" / "validate-failed"
    failed_dir.mkdir(parents=True)
    (failed_dir / "results.json").write_text("{}")   # a stale report from an earlier failure
    out_dir = root / "out"
    out_dir.mkdir()
    splits = good_splits()
    splits["train"] += [example("not-pii", prompt=NOT_PII), example("card-shaped", prompt=CARD_SHAPED),
                        example("echo-ok", answer="Question echo-ok?"),   # 1 echo in 13: within 0.9
                        example("redacted-answer", answer="Mail [EMAIL] from [IP_ADDRESS] today.")]
    metrics = validate_clean(write_splits(root / "clean", splits), PARAMS, CLEAN, out_dir, failed_dir)
    return out_dir, metrics, failed_dir


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    splits = good_splits()
    splits["train"] += [example("dup-1"), example("user-last", roles=("user", "assistant", "user")),
                        example("too-long", answer="x" * 81), example("robot", roles=("robot", "assistant"))]
    splits["validation"].append(example("dup-1"))   # the same id (and answer) in two splits: 12 of 13 distinct
    splits["test"] = splits["test"][:1]             # below min_test_rows = 2
    return run_failing(tmp_path_factory.mktemp("fail"), splits)


@pytest.fixture(scope="module")
def pii(tmp_path_factory):
    return run_failing(tmp_path_factory.mktemp("pii"), pii_splits())


@pytest.fixture(scope="module")
def rejections(tmp_path_factory):
    """Good examples, but clean rejected half of one source: the one failing expectation of this run."""
    sources = {**GOOD_SOURCES, "scraped_forum": (10, 5)}
    return run_failing(tmp_path_factory.mktemp("rejections"), good_splits(), sources)


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    splits = good_splits()
    for row in splits["train"][:3]:   # 7 distinct answers in 9 examples: 0.78 < 0.9
        row["messages"][-1]["content"] = "Use the standard library for that."
    return run_failing(tmp_path_factory.mktemp("duplicated"), splits)


@pytest.fixture(scope="module")
def echoes(tmp_path_factory):
    splits = good_splits()
    splits["train"] += [example(f"echo-{i}", answer=f"Question echo-{i}?") for i in range(2)]   # 2 in 11: 0.82
    return run_failing(tmp_path_factory.mktemp("echoes"), splits)


def test_good_data_passes_every_expectation(passed):
    out_dir, metrics, _ = passed
    report = json.loads((out_dir / "results.json").read_text())
    assert report["success"] is True and report["suites"] == [SUITE_NAME, REJECTIONS_SUITE_NAME]
    assert report["rows"] == {"train": 9, "validation": 2, "test": 2}
    assert len(report["expectations"]) == N_EXPECTATIONS
    assert [entry["suite"] for entry in report["expectations"]].count(REJECTIONS_SUITE_NAME) == 1
    assert all(entry["success"] and "error" not in entry for entry in report["expectations"])
    counts = {entry["kwargs"]["row_condition"]["parameter"]: entry["observed_value"]
              for entry in report["expectations"] if entry["type"] == "expect_table_row_count_to_be_between"}
    assert counts == report["rows"]
    assert report["rejection_rates"] == {"unit": 0.1, "other": 0.05, ALL_SOURCES: round(11 / 120, 6)}
    assert metrics == {"expectations": N_EXPECTATIONS, "failed": 0, "rows": 13, "rejection_rate": round(11 / 120, 6)}


def test_good_data_tolerates_shape_only_pii_and_echoes_below_their_share(passed):
    entries = json.loads((passed[0] / "results.json").read_text())["expectations"]
    by_kind = {kind: entry for entry in entries for kind in VALIDATION_PATTERNS
               if f"ftpipe.data.pii pattern '{kind}'" in entry["description"]}
    assert {kind: entry["unexpected_count"] for kind, entry in by_kind.items()} == {
        kind: (1 if kind == "payment_card" else 0) for kind in VALIDATION_PATTERNS}   # card-shaped, 1 of 13
    assert by_kind["payment_card"]["kwargs"]["mostly"] == 0.9 and "mostly" not in by_kind["email"]["kwargs"]
    echo = next(entry for entry in entries if entry["column"] == "answer_repeats_prompt")
    assert echo["success"] and echo["unexpected_count"] == 1 and echo["kwargs"]["mostly"] == 0.9


def test_good_data_gets_a_data_docs_site(passed):
    out_dir, _, _ = passed
    index = out_dir / "data_docs" / "index.html"
    assert index.is_file() and SUITE_NAME in index.read_text(encoding="utf-8")
    pages = sorted((out_dir / "data_docs" / "validations").rglob("*.html"))
    assert [page.relative_to(out_dir / "data_docs" / "validations").parts[0] for page in pages] == [
        SUITE_NAME, REJECTIONS_SUITE_NAME]


def test_success_removes_a_stale_failure_report(passed):
    assert not passed[2].exists()


def test_bad_data_names_each_failed_expectation_and_row(failed):
    message, _ = failed
    assert f"5 of {N_EXPECTATIONS} data expectations failed" in message
    lines = {line.split(" (")[0].strip("- "): line for line in failure_lines(message)}
    assert set(lines) == {
        "expect_column_values_to_be_unique on column 'id'",
        "expect_column_values_to_be_in_set on column 'last_role'",
        "expect_column_values_to_be_between on column 'answer_chars_max'",
        "expect_column_values_to_match_regex on column 'roles'",
        "expect_table_row_count_to_be_between",
    }
    assert lines["expect_column_values_to_be_unique on column 'id'"].endswith("2 of 13 example(s) failed, e.g. dup-1")
    assert lines["expect_column_values_to_be_in_set on column 'last_role'"].endswith(
        "1 of 13 example(s) failed: user-last")
    assert lines["expect_column_values_to_be_between on column 'answer_chars_max'"].endswith(": too-long")
    assert lines["expect_column_values_to_match_regex on column 'roles'"].endswith(": robot")
    assert "test has at least validate.min_test_rows = 2 rows): observed 1" in message
    assert "Fix the data" in message and "params.yaml" in message


def test_bad_data_keeps_the_report_outside_the_published_folder(failed):
    message, failed_dir = failed
    assert f"{failed_dir}/" in message
    report = json.loads((failed_dir / "results.json").read_text())
    assert report["success"] is False
    assert sum(not entry["success"] for entry in report["expectations"]) == 5
    unique = next(e for e in report["expectations"] if e["type"] == "expect_column_values_to_be_unique")
    assert unique["unexpected_count"] == 2 and unique["failing_rows"] == ["dup-1"]
    assert (failed_dir / "data_docs" / "index.html").is_file()


def test_pii_fails_naming_each_kind_and_row(pii):
    message, _ = pii
    assert f"{len(VALIDATION_PATTERNS)} of {N_EXPECTATIONS} data expectations failed" in message
    lines = {re.search(r"ftpipe\.data\.pii pattern '(\w+)'", line).group(1): line for line in failure_lines(message)}
    assert lines.keys() == VALIDATION_PATTERNS.keys()
    assert lines["email"].endswith("2 of 22 example(s) failed: pii-email, pii-email-accented")
    assert lines["ip_address"].endswith("1 of 22 example(s) failed: pii-ip")
    assert lines["api_key"].endswith("2 of 22 example(s) failed: pii-key, pii-aws-key")
    assert lines["private_key"].endswith("1 of 22 example(s) failed: pii-private-key")
    # 19 of 22 rows without a phone number: below pii_shape_mostly = 0.9
    assert lines["phone"].endswith("3 of 22 example(s) failed: pii-phone, pii-phone-intl, pii-phone-dotted")
    assert lines["payment_card"].endswith("3 of 22 example(s) failed: pii-card, pii-card-dashed, pii-card-amex")
    assert "clean.pii_action redacts or rejects" in lines["email"]
    assert "validate.pii_shape_mostly = 0.9" in lines["phone"]
    assert "jane.doe" not in message and "a8f9Zq2LmN4pR7tX1vB3" not in message   # ids, never the data itself


def test_pii_values_stay_out_of_the_report(pii):
    _, failed_dir = pii
    site = "".join(page.read_text(encoding="utf-8") for page in (failed_dir / "data_docs").rglob("*.html"))
    report = (failed_dir / "results.json").read_text(encoding="utf-8")
    for secret in ("jane.doe@example.com", "a8f9Zq2LmN4pR7tX1vB3", "AKIAIOSFODNN7EXAMPLE", "(555) 123-4567"):
        assert secret not in site and secret not in report


def test_high_rejection_rate_fails_naming_the_source(rejections):
    message, failed_dir = rejections
    assert f"1 of {N_EXPECTATIONS} data expectations failed" in message
    (line,) = failure_lines(message)
    assert line.startswith("  - expect_column_values_to_be_between on column 'rejection_rate' (clean rejected at "
                           "most validate.max_rejection_rate = 0.2 of each source's rows and of all rows")
    assert line.endswith("1 of 4 source(s) failed: scraped_forum (5 of 10 rows rejected, 50.0%)")
    report = json.loads((failed_dir / "results.json").read_text())
    assert report["rejection_rates"]["scraped_forum"] == 0.5 and report["rejection_rates"][ALL_SOURCES] == 0.123077


def test_duplicated_answers_fail_the_unique_share(duplicated):
    message, _ = duplicated
    (line,) = failure_lines(message)
    assert "expect_column_proportion_of_unique_values_to_be_between on column 'answer'" in line
    assert "validate.min_unique_answer_share = 0.9" in line
    assert line.endswith("observed 0.7778, e.g. one answer shared by tr0, tr1, tr2")


def test_answers_that_echo_the_prompt_fail_above_their_share(echoes):
    message, _ = echoes
    (line,) = failure_lines(message)
    assert "on column 'answer_repeats_prompt' (at least validate.answer_not_prompt_mostly = 0.9" in line
    assert line.endswith("2 of 11 example(s) failed: echo-0, echo-1")




# --- main() ------------------------------------------------------------------------------------

def write_params(**validate_overrides) -> None:
    """params.yaml with row minimums these ~10-row splits meet; clean.* limits as in the project."""
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    data["validate"].update({"min_train_rows": 4, "min_validation_rows": 2, "min_test_rows": 2, **validate_overrides})
    Path("params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_main_publishes_the_report_the_docs_and_the_gate(in_tmp_project, capsys):
    from mlflow.tracking import MlflowClient

    from ftpipe.tracking.runs import tracking_uri

    write_params()
    clean_dir = write_splits(Path("data/clean"), good_splits())
    validate.main()

    out = Path("data/validation")
    assert sorted(p.name for p in out.iterdir()) == ["data_docs", "gate.json", "provenance.json", "results.json"]
    validated = {f"{split}.jsonl": sha256_file(clean_dir / f"{split}.jsonl") for split in SPLITS}
    assert read_json(out / "gate.json") == {"passed": True, "validated_sha256": validated}   # no summary.json
    provenance = read_json(out / "provenance.json")
    assert provenance["stage"] == "validate" and provenance["suites"] == [SUITE_NAME, REJECTIONS_SUITE_NAME]
    assert provenance["inputs"] == {**validated, "summary.json": sha256_file(clean_dir / "summary.json")}
    assert provenance["params"]["validate.min_train_rows"] == 4
    assert {key for key in provenance["params"] if key.startswith("clean.")} == {
        "clean.min_answer_chars", "clean.max_prompt_chars", "clean.max_answer_chars"}
    metrics = {"expectations": N_EXPECTATIONS, "failed": 0, "rows": 9, "rejection_rate": round(11 / 120, 6)}
    assert read_json(Path("metrics/validate.json")) == metrics
    client = MlflowClient(tracking_uri())
    run = client.get_run(provenance["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics == {key: float(value) for key, value in metrics.items()}
    assert "results.json" in [artifact.path for artifact in client.list_artifacts(run.info.run_id)]
    assert capsys.readouterr().out.endswith(
        f"validate: 9 rows passed {N_EXPECTATIONS} expectations, clean rejected 9.2% of its input -> "
        "data/validation/data_docs/index.html\n")


def test_main_failure_publishes_nothing(in_tmp_project):
    write_params(min_test_rows=3)
    write_splits(Path("data/clean"), good_splits())
    with pytest.raises(PipelineError, match=rf"1 of {N_EXPECTATIONS} data expectations failed(.|\n)*"
                                            r"Nothing was published to data/validation/"):
        validate.main()
    assert sorted(p.name for p in Path("data").iterdir()) == ["clean"]   # no temp folder left
    assert not Path("metrics/validate.json").exists()
    assert sorted(p.name for p in Path("logs/validate-failed").iterdir()) == ["data_docs", "results.json"]
