"""How the data gate tells its results (ftpipe.data.gate_report): results.json entries from GX results, and
failure lines naming each expectation and a few rows by id, never by value. GX's results are stood in for
by plain objects with the fields it fills, so these tests need no GX run."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd

from ftpipe.data.expectations import REJECTIONS_SUITE_NAME, SUITE_NAME
from ftpipe.data.gate_report import (
    EXAMPLES_SHOWN,
    cite_example,
    cite_source,
    describe,
    failing_index_rows,
    most_repeated_answer,
    summarize,
)


def gx_result(success: bool, info: dict | None, type_="expect_column_values_to_be_unique", exception=None,
              **kwargs) -> SimpleNamespace:
    """What summarize reads of a GX ExpectationValidationResult."""
    config = SimpleNamespace(type=type_, description="a check", kwargs={"batch_id": "clean-whole_table", **kwargs})
    return SimpleNamespace(expectation_config=config, result=info, success=success,
                           exception_info={"raised_exception": exception is not None, "exception_message": exception})


def test_failing_index_rows_zips_gx_column_lists_into_rows():
    assert failing_index_rows({"partial_unexpected_index_list": [
        {"id": ["a", "b"], "split": ["train", "test"], "line": [1, 9]}]}) == [
        {"id": "a", "split": "train", "line": 1}, {"id": "b", "split": "test", "line": 9}]
    row = {"source": "forum", "rows_in": "10", "rejected": "5", "rejection_rate": 0.5}
    assert failing_index_rows({"partial_unexpected_index_list": [row]}) == [row]
    assert failing_index_rows({}) == [] and failing_index_rows({"partial_unexpected_index_list": None}) == []


def test_an_example_is_cited_by_id_or_where_it_is():
    assert cite_example({"id": "tr1", "split": "train", "line": 1}) == "tr1"
    for missing in (math.nan, None, ""):   # GX reports a missing id as NaN
        assert cite_example({"id": missing, "split": "test", "line": 7}) == "test.jsonl line 7"


def test_a_source_is_cited_with_its_counts_and_rate():
    assert cite_source({"source": "forum", "rows_in": "10", "rejected": "5", "rejection_rate": "0.5"}) == (
        "forum (5 of 10 rows rejected, 50.0%)")


def test_summarize_names_each_failing_row_once_and_drops_gx_internals():
    rows = ["dup", "dup", "a", "b", "c"]
    info = {"element_count": 13, "unexpected_count": 5,
            "partial_unexpected_index_list": [{"id": rows, "split": ["train"] * 5, "line": [1, 2, 3, 4, 5]}]}
    entry = summarize(SUITE_NAME, gx_result(False, info, column="id", mostly=0.9))
    assert entry == {"suite": SUITE_NAME, "type": "expect_column_values_to_be_unique", "column": "id",
                     "description": "a check", "kwargs": {"column": "id", "mostly": 0.9}, "success": False,
                     "unit": "example", "element_count": 13, "unexpected_count": 5, "observed_value": None,
                     "failing_rows": ["dup", "a", "b"][:EXAMPLES_SHOWN]}
    assert json.loads(json.dumps(entry)) == entry
    assert summarize(SUITE_NAME, gx_result(True, info, column="id"))["failing_rows"] == []   # within `mostly`
    sources = [{"source": f"s{i}", "rows_in": "10", "rejected": "5", "rejection_rate": 0.5} for i in range(5)]
    entry = summarize(REJECTIONS_SUITE_NAME, gx_result(False, {"partial_unexpected_index_list": sources}))
    assert entry["unit"] == "source" and len(entry["failing_rows"]) == 5   # every failing source is named


def test_summarize_keeps_the_error_of_an_expectation_that_could_not_run():
    entry = summarize(SUITE_NAME, gx_result(False, None, exception="column 'x' not found", column="x"))
    assert entry["error"] == "column 'x' not found" and entry["unexpected_count"] is None
    assert "error" not in summarize(SUITE_NAME, gx_result(True, {}))


def entry(**fields) -> dict:
    return {"type": "expect_column_values_to_be_unique", "column": "id", "description": "ids are unique",
            "unit": "example", "element_count": 13, "unexpected_count": 2, "observed_value": None,
            "failing_rows": ["dup-1"], **fields}


def test_describe_tells_what_failed_and_where():
    assert describe(entry()) == ("  - expect_column_values_to_be_unique on column 'id' (ids are unique): "
                                 "2 of 13 example(s) failed, e.g. dup-1")
    assert describe(entry(unexpected_count=1)).endswith(": 1 of 13 example(s) failed: dup-1")
    assert describe(entry(error="boom")).endswith("(ids are unique): could not run: boom")
    table = entry(type="expect_table_row_count_to_be_between", column=None, unexpected_count=None,
                  observed_value=1, failing_rows=[])
    assert describe(table) == "  - expect_table_row_count_to_be_between (ids are unique): observed 1"
    share = entry(column="answer", unexpected_count=None, observed_value=7 / 9, failing_rows=["tr0", "tr1"])
    assert describe(share).endswith("): observed 0.7778, e.g. one answer shared by tr0, tr1")


def test_most_repeated_answer_names_the_examples_sharing_it():
    frame = pd.DataFrame({"id": ["a", "b", "c", "d", "e", math.nan], "split": ["train"] * 6, "line": range(1, 7),
                          "answer": ["x", "y", "y", None, "y", "y"]})
    assert most_repeated_answer(frame) == ["b", "c", "e"][:EXAMPLES_SHOWN]
    assert most_repeated_answer(frame.assign(answer=None)) == []
