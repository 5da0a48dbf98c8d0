"""Stage `validate`: check the clean splits with a Great Expectations suite built from params.yaml.

    python -m stages.validate

Reads data/clean/{train,validation,test}.jsonl, measures each example once (roles, answer
and prompt lengths, ...) into one pandas row, and runs one GX suite over all rows: required
fields present, only validate.allowed_roles, the assistant speaks last, lengths within the
clean.* limits, ids unique across splits, enough rows in each split. Publishes
data/validation/results.json (one entry per expectation) and the GX Data Docs site
(data/validation/data_docs/index.html). If any expectation fails, nothing is published: the
stage stops naming each failure and keeps the report in logs/validate-failed/.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import ftpipe  # noqa: F401,I001 - offline, telemetry-free environment before any third-party import
import pandas as pd

from ftpipe.errors import PipelineError, run_stage
from ftpipe.io import atomic_dir, read_jsonl, sha256_file, write_json
from ftpipe.params import CleanParams, Params, ValidateParams, flatten, load_params
from ftpipe.paths import CLEAN_DIR, PROVENANCE_FILE, SPLITS, VALIDATION_DIR, metrics_file
from ftpipe.provenance import stage_record
from ftpipe.tracking import stage_run

SUITE_NAME = "clean_examples"
RESULTS_FILE = "results.json"
DOCS_DIR = "data_docs"
FAILED_DIR = Path("logs/validate-failed")   # git-ignored: the last failing report, for the user to read
CLEAN_KEYS = ("min_answer_chars", "max_prompt_chars", "max_answer_chars")   # the clean.* limits re-checked here
EXAMPLES_SHOWN = 3
COLUMNS = ["id", "split", "line", "source", "roles", "last_role", "content",
           "prompt_chars", "answer_chars_min", "answer_chars_max"]
# Columns GX reports for each failing row: the id, plus where the row is when the id itself is missing.
INDEX_COLUMNS = ["id", "split", "line"]


def measure(row: dict) -> dict:
    """The per-example values the suite checks. Malformed turns are measured, not trusted."""
    messages = row.get("messages")
    turns = [turn if isinstance(turn, dict) else {} for turn in messages] if isinstance(messages, list) else []
    roles = [str(turn.get("role") or "") for turn in turns]
    texts = [turn.get("content") for turn in turns]
    answers = [len(text) for role, text in zip(roles, texts) if role == "assistant" and isinstance(text, str)]
    return {
        "id": row.get("id"),
        "source": row.get("source"),
        "roles": ",".join(roles),
        "last_role": roles[-1] if roles else "",
        # null when there are no turns or a turn has no text, so that one not-null check catches both
        "content": "\n".join(texts) if texts and all(isinstance(text, str) for text in texts) else None,
        "prompt_chars": sum(len(text) for role, text in zip(roles, texts)
                            if role != "assistant" and isinstance(text, str)),
        # an example without an answer measures 0: the minimum-length check flags it
        "answer_chars_min": min(answers, default=0),
        "answer_chars_max": max(answers, default=0),
    }


def example_frame(clean_dir: Path) -> pd.DataFrame:
    """One row per example of the three splits; `line` locates it in its split file."""
    records = []
    for split in SPLITS:
        path = clean_dir / f"{split}.jsonl"
        if not path.is_file():
            raise PipelineError(f"{path}: not found. Run the clean stage first (`dvc repro clean`).")
        for line, row in enumerate(read_jsonl(path), start=1):
            records.append({"split": split, "line": line, **measure(row)})
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def expectations(gx, params: ValidateParams, clean: CleanParams) -> list:
    """The suite, from params; each description names the params key so Data Docs explain themselves."""
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    # GX has no "every item of a list is in a set": the roles are joined with "," and matched whole.
    role = "|".join(re.escape(name) for name in params.allowed_roles)
    suite = [
        E.ExpectColumnValuesToNotBeNull(column="id", description="every example has an id"),
        E.ExpectColumnValuesToNotBeNull(column="source", description="every example names its source"),
        E.ExpectColumnValuesToNotBeNull(column="content", description="every turn of messages has text content"),
        E.ExpectColumnValuesToBeUnique(
            column="id", description="ids are unique across train, validation and test: no example leaks "
                                     "between splits"),
        E.ExpectColumnValuesToMatchRegex(
            column="roles", regex=f"^(?:{role})(?:,(?:{role}))*$",
            description=f"every role is one of validate.allowed_roles: {', '.join(params.allowed_roles)}"),
        E.ExpectColumnValuesToBeInSet(
            column="last_role", value_set=["assistant"], description="the last turn is the assistant's answer"),
        E.ExpectColumnValuesToBeBetween(
            column="answer_chars_min", min_value=clean.min_answer_chars,
            description=f"every answer has at least clean.min_answer_chars = {clean.min_answer_chars} characters"),
        E.ExpectColumnValuesToBeBetween(
            column="answer_chars_max", max_value=clean.max_answer_chars,
            description=f"every answer has at most clean.max_answer_chars = {clean.max_answer_chars} characters"),
        E.ExpectColumnValuesToBeBetween(
            column="prompt_chars", max_value=clean.max_prompt_chars,
            description=f"the non-assistant turns have at most clean.max_prompt_chars = {clean.max_prompt_chars} "
                        "characters in all"),
    ]
    for split in SPLITS:   # one table-level count per split, on the rows of that split only
        minimum = getattr(params, f"min_{split}_rows")
        suite.append(E.ExpectTableRowCountToBeBetween(
            min_value=minimum, row_condition=Column("split") == split,
            description=f"{split} has at least validate.min_{split}_rows = {minimum} rows"))
    return suite


def run_suite(frame: pd.DataFrame, params: ValidateParams, clean: CleanParams, docs_dir: Path) -> list:
    """Validate `frame`; copy the Data Docs site to `docs_dir`. Returns GX's per-expectation results."""
    import great_expectations as gx   # slow (seconds): only this stage needs it
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # A file context in a throwaway project: Data Docs are built from its stores on disk.
    with tempfile.TemporaryDirectory(prefix="gx-") as project:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)   # no tqdm bars in the log
        batch = (context.data_sources.add_pandas("clean").add_dataframe_asset("examples")
                 .add_batch_definition_whole_dataframe("all_splits"))
        suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations(gx, params, clean)))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name="validate", data=batch,
                                                                               suite=suite))
        result = definition.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "SUMMARY", "unexpected_index_column_names": INDEX_COLUMNS})
        site = context.build_data_docs()["local_site"]
        shutil.copytree(Path(url2pathname(urlparse(site).path)).parent, docs_dir)
    return result.results


def row_ref(row: dict) -> str:
    """A failing row's id, or where it is when it has no usable id (GX reports a missing one as NaN)."""
    row_id = row.get("id")
    return row_id if isinstance(row_id, str) and row_id else f"{row.get('split')}.jsonl line {row.get('line')}"


def summarize(result) -> dict:
    """One JSON-safe entry of results.json from a GX expectation result."""
    config, info = result.expectation_config, result.result or {}
    kwargs = {key: value for key, value in config.kwargs.items() if key != "batch_id"}
    refs = [row_ref(row) for row in info.get("partial_unexpected_index_list") or []]
    entry = {
        "type": config.type,
        "column": kwargs.get("column"),
        "description": config.description,
        "kwargs": json.loads(json.dumps(kwargs, default=str)),
        "success": bool(result.success),
        "unexpected_count": info.get("unexpected_count"),   # None for table-level expectations
        "observed_value": info.get("observed_value"),
        "example_ids": list(dict.fromkeys(refs))[:EXAMPLES_SHOWN] if not result.success else [],
    }
    if (result.exception_info or {}).get("raised_exception"):
        entry["error"] = result.exception_info.get("exception_message")
    return entry


def describe(entry: dict) -> str:
    where = f" on column '{entry['column']}'" if entry["column"] else ""
    if entry.get("error"):
        found = f"could not run: {entry['error']}"
    elif entry["unexpected_count"] is not None:
        found = f"{entry['unexpected_count']} row(s) failed, e.g. {', '.join(entry['example_ids'])}"
    else:
        found = f"observed {entry['observed_value']}"
    return f"  - {entry['type']}{where} ({entry['description']}): {found}"


def validate_clean(clean_dir: Path, params: ValidateParams, clean: CleanParams, out_dir: Path,
                   failed_dir: Path = FAILED_DIR) -> dict:
    """Validate the clean splits; write results.json and data_docs/ into `out_dir`.

    Returns the stage's metrics. On any failed expectation, copies the report to `failed_dir`
    and raises PipelineError naming each failure; on success, removes a stale `failed_dir`.
    """
    frame = example_frame(clean_dir)
    entries = [summarize(result) for result in run_suite(frame, params, clean, out_dir / DOCS_DIR)]
    failed = [entry for entry in entries if not entry["success"]]
    rows = {split: int((frame["split"] == split).sum()) for split in SPLITS}
    write_json(out_dir / RESULTS_FILE, {"suite": SUITE_NAME, "success": not failed, "rows": rows,
                                        "expectations": entries})
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
    return {"expectations": len(entries), "failed": 0, "rows": len(frame)}


GATE_FILE = "gate.json"


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return {**flatten(params.validate, "validate"),
            **{f"clean.{key}": getattr(params.clean, key) for key in CLEAN_KEYS}}


def main() -> None:
    params = load_params()
    stage_params = tracked_params(params)
    with stage_run("validate", stage_params) as tracker:
        with atomic_dir(VALIDATION_DIR) as out_dir:
            metrics = validate_clean(CLEAN_DIR, params.validate, params.clean, out_dir)
            inputs = {f"{split}.jsonl": sha256_file(CLEAN_DIR / f"{split}.jsonl") for split in SPLITS}
            write_json(out_dir / PROVENANCE_FILE, stage_record("validate", stage_params, suite=SUITE_NAME,
                                                               inputs=inputs))
            # The gate tokenize depends on: only the hashes of the data that passed, so a changed
            # threshold that still passes leaves it byte-identical and reruns nothing downstream.
            write_json(out_dir / GATE_FILE, {"passed": True, "validated_sha256": inputs})
        write_json(metrics_file("validate"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(VALIDATION_DIR / RESULTS_FILE)   # not the 4 MB docs site: DVC keeps that
    print(f"validate: {metrics['rows']} rows passed {metrics['expectations']} expectations "
          f"-> {VALIDATION_DIR}/{DOCS_DIR}/index.html")


if __name__ == "__main__":
    run_stage(main)
