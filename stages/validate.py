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
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

import ftpipe  # noqa: F401 - offline, telemetry-free environment before any third-party import
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import atomic_dir, read_json, read_jsonl, sha256_file, write_json
from ftpipe.core.params import CleanParams, Params, ValidateParams, flatten, load_params
from ftpipe.core.paths import CLEAN_DIR, PROVENANCE_FILE, SPLITS, VALIDATION_DIR, metrics_file
from ftpipe.core.provenance import stage_record
from ftpipe.data.pii import VALIDATION_PATTERNS
from ftpipe.tracking.runs import stage_run

SUITE_NAME = "clean_examples"              # the examples of the three splits
REJECTIONS_SUITE_NAME = "clean_rejections"   # clean's summary.json: what it rejected, per source
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
DOCS_DIR = "data_docs"
FAILED_DIR = Path("logs/validate-failed")   # git-ignored: the last failing report, for the user to read
CLEAN_KEYS = ("min_answer_chars", "max_prompt_chars", "max_answer_chars")   # the clean.* limits re-checked here
EXAMPLES_SHOWN = 3
COLUMNS = ["id", "split", "line", "source", "roles", "last_role", "content", "answer", "answer_repeats_prompt",
           "prompt_chars", "answer_chars_min", "answer_chars_max"]
# Columns GX reports for each failing row: the id, plus where the row is when the id itself is missing.
INDEX_COLUMNS = ["id", "split", "line"]
# ftpipe.data.pii's kinds whose pattern is a shape only: a digit run laid out like a phone or card number,
# without clean's digit-count and Luhn checks, so it may hit an ID or a version string. They must hold
# for validate.pii_shape_mostly of the rows; every other kind for every row.
SHAPE_ONLY_PII_KINDS = ("phone", "payment_card")
# The rejections table: one row per source, plus this one for all of them. It cannot clash with a
# source: source names are letters, digits, '_' and '-' only (ftpipe.core.params.SourceParams).
ALL_SOURCES = "all sources"
REJECTION_COLUMNS = ["source", "rows_in", "rejected", "rejection_rate"]
# How GX reports failing rows. An example is named by id (and split and line), never by its text: the
# failing value of a PII expectation is the personal data itself, which Data Docs would otherwise show.
EXAMPLES_RESULT_FORMAT = {"result_format": "SUMMARY", "unexpected_index_column_names": INDEX_COLUMNS,
                          "exclude_unexpected_values": True}
# A source is named with its counts (GX adds the checked value, its rejection_rate, to each failing row).
# COMPLETE, so that Data Docs list the failing sources too (they list row ids only then): a few rows.
SOURCES_RESULT_FORMAT = {"result_format": "COMPLETE",
                         "unexpected_index_column_names": ["source", "rows_in", "rejected"]}


def measure(row: dict) -> dict:
    """The per-example values the suite checks. Malformed turns are measured, not trusted."""
    messages = row.get("messages")
    turns = [turn if isinstance(turn, dict) else {} for turn in messages] if isinstance(messages, list) else []
    roles = [str(turn.get("role") or "") for turn in turns]
    texts = [turn.get("content") for turn in turns]
    answers = [text for role, text in zip(roles, texts) if role == "assistant" and isinstance(text, str)]
    turn_pairs = zip(zip(roles, texts), zip(roles[1:], texts[1:]))
    return {
        "id": row.get("id"),
        "source": row.get("source"),
        "roles": ",".join(roles),
        "last_role": roles[-1] if roles else "",
        # null when there are no turns or a turn has no text, so that one not-null check catches both
        "content": "\n".join(texts) if texts and all(isinstance(text, str) for text in texts) else None,
        "answer": "\n".join(answers) if answers else None,   # all assistant turns: what the model learns to say
        # an echo: an assistant turn that repeats the user turn it answers (whitespace at the ends aside)
        "answer_repeats_prompt": any(
            asked == "user" and answered == "assistant" and isinstance(question, str)
            and isinstance(answer, str) and question.strip() == answer.strip()
            for (asked, question), (answered, answer) in turn_pairs),
        "prompt_chars": sum(len(text) for role, text in zip(roles, texts)
                            if role != "assistant" and isinstance(text, str)),
        # an example without an answer measures 0: the minimum-length check flags it
        "answer_chars_min": min(map(len, answers), default=0),
        "answer_chars_max": max(map(len, answers), default=0),
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


def rejection_frame(summary_path: Path) -> pd.DataFrame:
    """One row per source of clean's summary.json, plus one for all sources: rows in, rows rejected, their ratio."""
    if not summary_path.is_file():
        raise PipelineError(f"{summary_path}: not found. Run the clean stage first (`dvc repro clean`).")
    summary = read_json(summary_path)
    try:
        counts = [(name, source["rows_in"], sum(source["rejected"].values()))
                  for name, source in summary["sources"].items()]
        counts.append((ALL_SOURCES, summary["rows_in"], sum(summary["rejected"].values())))
    except (KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{summary_path}: not the clean stage's summary (missing or malformed {err}). "
                            "Rerun the clean stage (`dvc repro clean`).") from err
    # a source without rows rejected none of them
    return pd.DataFrame.from_records([(name, rows_in, rejected, rejected / rows_in if rows_in else 0.0)
                                      for name, rows_in, rejected in counts], columns=REJECTION_COLUMNS)


def example_expectations(gx, params: ValidateParams, clean: CleanParams) -> list:
    """The examples suite, from params; each description names the params key so Data Docs explain themselves."""
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
        E.ExpectColumnValuesToBeInSet(
            column="answer_repeats_prompt", value_set=[False], mostly=params.answer_not_prompt_mostly,
            description=f"at least validate.answer_not_prompt_mostly = {params.answer_not_prompt_mostly} of the "
                        "examples do not answer with a verbatim copy of the user's turn"),
        E.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="answer", min_value=params.min_unique_answer_share,
            description=f"distinct answers / examples is at least validate.min_unique_answer_share = "
                        f"{params.min_unique_answer_share}: the data is not templated or collapsed"),
    ]
    # GX's pandas backend runs these through pandas' str.contains, which hands patterns with lookarounds
    # or back-references (all of these but private_key's) to Python's `re` and the rest to pyarrow's RE2;
    # tests/stages/test_validate.py checks that the outcome is `re.search`'s.
    for kind, pattern in VALIDATION_PATTERNS.items():
        name = kind.replace("_", " ")
        if kind in SHAPE_ONLY_PII_KINDS:
            suite.append(E.ExpectColumnValuesToNotMatchRegex(
                column="content", regex=pattern, mostly=params.pii_shape_mostly,
                description=f"at least validate.pii_shape_mostly = {params.pii_shape_mostly} of the examples have "
                            f"nothing {name}-shaped in any turn (ftpipe.data.pii pattern '{kind}': shape only, no "
                            "digit-count or Luhn check); clean.pii_action redacts or rejects real ones"))
        else:
            suite.append(E.ExpectColumnValuesToNotMatchRegex(
                column="content", regex=pattern,
                description=f"no {name} in any turn of any example (ftpipe.data.pii pattern '{kind}'); "
                            "clean.pii_action redacts or rejects such rows"))
    for split in SPLITS:   # one table-level count per split, on the rows of that split only
        minimum = getattr(params, f"min_{split}_rows")
        suite.append(E.ExpectTableRowCountToBeBetween(
            min_value=minimum, row_condition=Column("split") == split,
            description=f"{split} has at least validate.min_{split}_rows = {minimum} rows"))
    return suite


def rejection_expectations(gx, params: ValidateParams) -> list:
    """The rejections suite: one check over the rows of the rejections table."""
    return [gx.expectations.ExpectColumnValuesToBeBetween(
        column="rejection_rate", max_value=params.max_rejection_rate,
        description=f"clean rejected at most validate.max_rejection_rate = {params.max_rejection_rate} of each "
                    f"source's rows and of all rows ({SUMMARY_FILE}); more points to a wrong format, an encoding "
                    "problem or a clean.* limit set too tight")]


def run_suites(examples: pd.DataFrame, rejections: pd.DataFrame, params: ValidateParams, clean: CleanParams,
               docs_dir: Path) -> list[tuple[str, object]]:
    """Validate both tables; copy the Data Docs site (both suites) to `docs_dir`.

    Returns (suite name, GX expectation result) for every expectation, examples suite first."""
    import great_expectations as gx  # slow (seconds): only this stage needs it
    from great_expectations.data_context.types.base import ProgressBarsConfig

    runs = [  # (suite = asset name, its expectations, the table, how failing rows are reported)
        (SUITE_NAME, example_expectations(gx, params, clean), examples, EXAMPLES_RESULT_FORMAT),
        (REJECTIONS_SUITE_NAME, rejection_expectations(gx, params), rejections, SOURCES_RESULT_FORMAT),
    ]
    results = []
    # A file context in a throwaway project: Data Docs are built from its stores on disk.
    with tempfile.TemporaryDirectory(prefix="gx-") as project:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)   # no tqdm bars in the log
        data_source = context.data_sources.add_pandas("clean")
        for name, suite_expectations, frame, result_format in runs:
            batch = data_source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole_table")
            suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=suite_expectations))
            definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch,
                                                                                   suite=suite))
            with warnings.catch_warnings():
                # pandas' str.contains warns about capture groups it is not asked for; the card pattern
                # needs its groups for the back-references that keep one separator throughout
                warnings.filterwarnings("ignore", "This pattern is interpreted as a regular expression, and has "
                                        "match groups", UserWarning)
                run = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
            results += [(name, result) for result in run.results]
        site = context.build_data_docs()["local_site"]
        shutil.copytree(Path(url2pathname(urlparse(site).path)).parent, docs_dir)
    outcomes = {name: [result.success for suite, result in results if suite == name] for name, *_ in runs}
    make_docs_readable_offline(docs_dir, outcomes)
    return results


# GX's navbar logo is an image on GX's S3 whose URL carries the data context's id and a time: opening
# the docs online would report both. The site has the same images in static/images/.
REMOTE_IMAGE = re.compile(r"https://great-expectations-web-assets\.s3\.[\w.-]+\.amazonaws\.com/([\w.-]+)\?[^\"']*")
STATIC_INDEX_ID = "ftpipe-validation-results"
# GX shows each expectation's status as a Font Awesome icon, a CDN font: offline the status column is
# blank. Draw the two statuses as text marks instead (online too, for one look; !important beats Font
# Awesome's own rules).
STATUS_MARKS_CSS = (
    '<style id="ftpipe-status-marks">'
    "i.fa-check-circle.text-success::before, i.fa-times.text-danger::before {font-family: sans-serif !important; "
    "font-style: normal !important; font-weight: bold !important}"
    'i.fa-check-circle.text-success::before {content: "\\2713" !important; color: #28a745}'
    'i.fa-times.text-danger::before {content: "\\2717" !important; color: #dc3545}'
    "</style>")


def make_docs_readable_offline(docs_dir: Path, outcomes: dict[str, list[bool]]) -> None:
    """Make the Data Docs site work offline and report nothing when opened.

    GX's pages load their scripts, styles and icon font from CDNs. The validation result pages are
    plain HTML underneath (their status icons get text marks, STATUS_MARKS_CSS), but the index
    draws its list of results with those scripts: offline (this pipeline's default) that list is
    empty. So the top of index.html gets a plain list of each suite's result, linking its
    validation result page and its suite page. `outcomes`: per suite, the success of each of its
    expectations.
    """
    for page in docs_dir.rglob("*.html"):
        images = Path(os.path.relpath(docs_dir / "static" / "images", page.parent)).as_posix()
        text = REMOTE_IMAGE.sub(lambda match: f"{images}/{match.group(1)}", page.read_text(encoding="utf-8"))
        page.write_text(insert_after(page, text, r"<head(?:\s[^>]*)?>", STATUS_MARKS_CSS), encoding="utf-8")
    rows = []
    for suite, successes in outcomes.items():
        (result_page,) = (docs_dir / "validations" / suite).rglob("*.html")   # one run per suite
        failed = successes.count(False)
        status, color = ("Failed", "#dc3545") if failed else ("Succeeded", "#28a745")   # Bootstrap's danger/success
        rows.append(
            f'<tr class="{status.lower()}"><td style="color: {color}"><strong>{status}</strong></td>'
            f'<td><a href="{html.escape(result_page.relative_to(docs_dir).as_posix())}">{html.escape(suite)}</a></td>'
            f"<td>{failed} of {len(successes)} expectations failed</td>"
            f'<td><a href="expectations/{html.escape(suite)}.html">the suite\'s expectations</a></td></tr>')
    section = (f'<div id="{STATIC_INDEX_ID}" class="container-fluid pt-4 pl-5 pr-5"><h3>Validation results</h3>'
               "<table class=\"table table-sm\"><thead><tr><th>Status</th><th>Expectation suite (validation "
               "result)</th><th>Expectations</th><th>Suite</th></tr></thead><tbody>"
               + "".join(rows) + "</tbody></table></div>")
    index = docs_dir / "index.html"
    text = insert_after(index, index.read_text(encoding="utf-8"), r"<body(?:\s[^>]*)?>", section)
    index.write_text(text, encoding="utf-8")


def insert_after(page: Path, text: str, tag: str, addition: str) -> str:
    """`text` with `addition` right after the first match of the regex `tag`."""
    text, found = re.subn(tag, lambda match: match.group(0) + addition, text, count=1)
    if not found:
        raise AssertionError(f"{page}: no {tag} tag; has GX changed its page templates?")
    return text


def cite_example(row: dict) -> str:
    """A failing example's id, or where it is when it has no usable id (GX reports a missing one as NaN)."""
    row_id = row.get("id")
    return row_id if isinstance(row_id, str) and row_id else f"{row.get('split')}.jsonl line {row.get('line')}"


def cite_source(row: dict) -> str:
    """A failing row of the rejections table (GX reports its values as strings)."""
    return (f"{row['source']} ({row['rejected']} of {row['rows_in']} rows rejected, "
            f"{float(row['rejection_rate']):.1%})")


@dataclass(frozen=True)
class Report:
    """How the failures of one suite are told: what one row of its table is, and how to name one."""
    unit: str
    cite: Callable[[dict], str]
    shown: int   # failing rows named: a few examples, but every failing source (GX keeps up to 20)


REPORTS = {SUITE_NAME: Report("example", cite_example, EXAMPLES_SHOWN),
           REJECTIONS_SUITE_NAME: Report("source", cite_source, 20)}


def failing_index_rows(info: dict) -> list[dict]:
    """GX's partial_unexpected_index_list as one dict per failing row. With exclude_unexpected_values
    GX gives one dict of a list per column instead ([{"id": [...], "split": [...]}]): zip those into rows."""
    rows = []
    for item in info.get("partial_unexpected_index_list") or []:
        if all(isinstance(values, list) for values in item.values()):
            rows += [dict(zip(item, values)) for values in zip(*item.values())]
        else:
            rows.append(item)
    return rows


def summarize(suite: str, result) -> dict:
    """One JSON-safe entry of results.json from a GX expectation result of `suite`."""
    config, info, report = result.expectation_config, result.result or {}, REPORTS[suite]
    kwargs = {key: value for key, value in config.kwargs.items() if key != "batch_id"}
    cited = [report.cite(row) for row in failing_index_rows(info)]
    entry = {
        "suite": suite,
        "type": config.type,
        "column": kwargs.get("column"),
        "description": config.description,
        "kwargs": json.loads(json.dumps(kwargs, default=str)),
        "success": bool(result.success),
        "unit": report.unit,
        "element_count": info.get("element_count"),         # None for table-level expectations
        "unexpected_count": info.get("unexpected_count"),   # None for table-level expectations
        "observed_value": info.get("observed_value"),
        "failing_rows": list(dict.fromkeys(cited))[:report.shown] if not result.success else [],
    }
    if (result.exception_info or {}).get("raised_exception"):
        entry["error"] = result.exception_info.get("exception_message")
    return entry


def most_repeated_answer(frame: pd.DataFrame) -> list[str]:
    """The examples that share the most common answer: what a failed unique-answer share looks like."""
    answers = frame["answer"].dropna()
    if answers.empty:
        return []
    rows = frame[frame["answer"] == answers.value_counts().index[0]]
    return [cite_example(row) for row in rows.head(EXAMPLES_SHOWN).to_dict("records")]


def describe(entry: dict) -> str:
    where = f" on column '{entry['column']}'" if entry["column"] else ""
    rows = entry["failing_rows"]
    if entry.get("error"):
        found = f"could not run: {entry['error']}"
    elif entry["unexpected_count"] is not None:
        count = entry["unexpected_count"]
        found = (f"{count} of {entry['element_count']} {entry['unit']}(s) failed"
                 + (f", e.g. {', '.join(rows)}" if len(rows) < count else f": {', '.join(rows)}"))
    else:
        observed = entry["observed_value"]
        found = f"observed {round(observed, 4) if isinstance(observed, float) else observed}"
        if rows:   # only the unique-answer share names rows: those with its most common answer
            found += f", e.g. one answer shared by {', '.join(rows)}"
    return f"  - {entry['type']}{where} ({entry['description']}): {found}"


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
            validated = {f"{split}.jsonl": sha256_file(CLEAN_DIR / f"{split}.jsonl") for split in SPLITS}
            inputs = {**validated, SUMMARY_FILE: sha256_file(CLEAN_DIR / SUMMARY_FILE)}
            write_json(out_dir / PROVENANCE_FILE, stage_record("validate", stage_params, mlflow=tracker.reference(),
                                                               suites=list(REPORTS), inputs=inputs))
            # The gate tokenize depends on: only the hashes of the training data that passed (not
            # summary.json's counts), so a changed threshold or summary that still passes leaves it
            # byte-identical and reruns nothing downstream.
            write_json(out_dir / GATE_FILE, {"passed": True, "validated_sha256": validated})
        write_json(metrics_file("validate"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(VALIDATION_DIR / RESULTS_FILE)   # not the 4 MB docs site: DVC keeps that
    print(f"validate: {metrics['rows']} rows passed {metrics['expectations']} expectations, clean rejected "
          f"{metrics['rejection_rate']:.1%} of its input -> {VALIDATION_DIR}/{DOCS_DIR}/index.html")


if __name__ == "__main__":
    run_stage(main)
