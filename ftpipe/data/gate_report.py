"""How the data gate tells its results: one JSON-safe entry of results.json per GX expectation result, and
one line of the failure message per failed expectation, naming it, how many rows failed and a few of them.

A failing example is named by its id (or its split file and line when it has none), a failing source by
its counts and rejection rate: never by a matched value, which for a PII check is the personal data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from ftpipe.data.expectations import REJECTIONS_SUITE_NAME, SUITE_NAME

EXAMPLES_SHOWN = 3   # failing examples named per expectation (GX keeps up to 20)


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
    """One line of the failure message for a failed entry of results.json: the expectation, what failed, where."""
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

