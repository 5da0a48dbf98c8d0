"""Stage `validate`: check the clean data with Great Expectations suites built from params.yaml.

    python -m stages.validate

Reads data/clean/{train,validation,test}.jsonl, measures each example once (roles, answer
and prompt lengths, ...) into one pandas row, and runs the suite `clean_examples` over all
rows: required fields present, only validate.allowed_roles, the assistant speaks last,
lengths within the clean.* limits, ids unique across splits, enough rows in each split, no
personal data or secrets in any turn (ftpipe.data.pii.VALIDATION_PATTERNS), answers that do not
echo the prompt, enough distinct answers. Reads data/clean/summary.json into one row per
source, plus one for all sources, and runs the suite `clean_rejections` over them: clean
rejected at most validate.max_rejection_rate of the rows. Publishes
data/validation/results.json (one entry per expectation of both suites) and one GX Data Docs
site for both (data/validation/data_docs/index.html). If any expectation fails, nothing is
published: the stage stops naming each failure and keeps the report in logs/validate-failed/.

The tables and suites are ftpipe.data.expectations; running them and the offline Data Docs,
ftpipe.data.data_docs; how results and failures are told, ftpipe.data.gate_report.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment before any third-party import
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import sha256_file, write_json
from ftpipe.core.params import CleanParams, Params, ValidateParams, flatten
from ftpipe.core.paths import CLEAN_DIR, SPLITS, VALIDATION_DIR
from ftpipe.core.stage import Stage
from ftpipe.data.data_docs import run_suites
from ftpipe.data.expectations import ALL_SOURCES, SUMMARY_FILE, example_frame, rejection_frame
from ftpipe.data.gate_report import REPORTS, describe, most_repeated_answer, summarize

RESULTS_FILE = "results.json"
DOCS_DIR = "data_docs"
GATE_FILE = "gate.json"
FAILED_DIR = Path("logs/validate-failed")   # git-ignored: the last failing report, for the user to read
CLEAN_KEYS = ("min_answer_chars", "max_prompt_chars", "max_answer_chars")   # the clean.* limits re-checked here


def validate_clean(clean_dir: Path, params: ValidateParams, clean: CleanParams, out_dir: Path,
                   failed_dir: Path = FAILED_DIR) -> dict:
    """Validate the clean splits and clean's summary.json; write results.json and data_docs/ into `out_dir`.

    Returns the stage's metrics. On any failed expectation, copies the report to `failed_dir`
    and raises PipelineError naming each failure; on success, removes a stale `failed_dir`.
    """
    examples = example_frame(clean_dir)
    rejections = rejection_frame(clean_dir / SUMMARY_FILE)
    entries = [summarize(suite, result)
               for suite, result in run_suites(examples, rejections, params, clean, out_dir / DOCS_DIR)]
    for entry in entries:   # GX names no rows for a table-level share: name those behind it
        if entry["type"] == "expect_column_proportion_of_unique_values_to_be_between" and not entry["success"]:
            entry["failing_rows"] = most_repeated_answer(examples)
    failed = [entry for entry in entries if not entry["success"]]
    rows = {split: int((examples["split"] == split).sum()) for split in SPLITS}
    rejection_rates = {source: round(float(rate), 6)
                       for source, rate in zip(rejections["source"], rejections["rejection_rate"])}
    write_json(out_dir / RESULTS_FILE, {"suites": list(REPORTS), "success": not failed, "rows": rows,
                                        "rejection_rates": rejection_rates, "expectations": entries})
    if failed:
        shutil.rmtree(failed_dir, ignore_errors=True)
        shutil.copytree(out_dir, failed_dir)
        raise PipelineError(
            f"{clean_dir}: {len(failed)} of {len(entries)} data expectations failed:\n"
            + "\n".join(describe(entry) for entry in failed)
            + "\nFix the data (your sources, or the clean.* params that filter them), or the validate.*/clean.* "
            f"limit in params.yaml if it is wrong, then rerun `dvc repro`. Nothing was published to "
            f"{VALIDATION_DIR}/; the full report is in {failed_dir}/ ({RESULTS_FILE}, {DOCS_DIR}/index.html)."
        )
    shutil.rmtree(failed_dir, ignore_errors=True)   # an older failure report no longer applies
    return {"expectations": len(entries), "failed": 0, "rows": len(examples),
            "rejection_rate": rejection_rates[ALL_SOURCES]}


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return {**flatten(params.validate, "validate"),
            **{f"clean.{key}": getattr(params.clean, key) for key in CLEAN_KEYS}}


def main() -> None:
    with Stage("validate", tracked_params) as stage:
        with stage.output() as out_dir:
            metrics = validate_clean(CLEAN_DIR, stage.params.validate, stage.params.clean, out_dir)
            validated = {f"{split}.jsonl": sha256_file(CLEAN_DIR / f"{split}.jsonl") for split in SPLITS}
            stage.record["suites"] = list(REPORTS)
            stage.record["inputs"] = {**validated, SUMMARY_FILE: sha256_file(CLEAN_DIR / SUMMARY_FILE)}
            # The gate tokenize depends on: only the hashes of the training data that passed (not
            # summary.json's counts), so a changed threshold or summary that still passes leaves it
            # byte-identical and reruns nothing downstream.
            write_json(out_dir / GATE_FILE, {"passed": True, "validated_sha256": validated})
        stage.finish(metrics)
        stage.tracker.log_artifact(VALIDATION_DIR / RESULTS_FILE)   # not the 4 MB docs site: DVC keeps that
    print(f"validate: {metrics['rows']} rows passed {metrics['expectations']} expectations, clean rejected "
          f"{metrics['rejection_rate']:.1%} of its input -> {VALIDATION_DIR}/{DOCS_DIR}/index.html")


if __name__ == "__main__":
    run_stage(main)
