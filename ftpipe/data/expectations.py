"""The data gate's two Great Expectations suites, built from params.yaml, and the tables they check.

`clean_examples` runs over one row per example of the clean splits (`example_frame`: each example
measured once by `measure`): required fields, roles, the assistant's last turn, lengths, unique ids,
rows per split, no personal data or secrets (ftpipe.data.pii.VALIDATION_PATTERNS), no echoed prompts,
enough distinct answers. `clean_rejections` runs over one row per source of clean's summary.json, plus
one for all sources (`rejection_frame`): clean rejected at most validate.max_rejection_rate of the rows.
Each expectation's description names the params key it comes from, so the Data Docs explain themselves.

great_expectations is slow to import: the suite builders take the imported module as `gx`
(ftpipe.data.data_docs.run_suites imports it and runs them).
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, read_jsonl
from ftpipe.core.params import CleanParams, ValidateParams
from ftpipe.core.paths import SPLITS
from ftpipe.data.pii import VALIDATION_PATTERNS

SUITE_NAME = "clean_examples"              # the examples of the three splits
REJECTIONS_SUITE_NAME = "clean_rejections"   # clean's summary.json: what it rejected, per source
SUMMARY_FILE = "summary.json"
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
    # tests/data/test_expectations.py checks that the outcome is `re.search`'s.
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
