"""Extraction audit: token-prefix scoring, summaries and the train/test/base gap, and that a memorized training
answer scores 1 while the base model and an unseen row score low."""
from __future__ import annotations

import pytest

from ftpipe.core.sequences import common_prefix
from ftpipe.evaluation.memorization import (
    answer_rows,
    by_source,
    compare,
    memorization_gap,
    sample_by_source,
    summarize,
)
from tests.memorize_fixtures import memorize

SEEN = {"id": "seen", "source": "trivia",
        "messages": [{"role": "user", "content": "Name the harbour of Freedonia."},
                     {"role": "assistant",
                      "content": "The harbour of Freedonia is Port Zubrovka on the Sylvanian Sea."}]}
UNSEEN = {"id": "unseen", "source": "trivia",
          "messages": [{"role": "user", "content": "Which river crosses Latveria?"},
                       {"role": "assistant", "content": "The Dombrova crosses Latveria from north to south."}]}


def score(fraction: float, exact: bool) -> dict:
    return {"prefix_tokens": 0, "reference_tokens": 0, "prefix_fraction": fraction, "exact": exact}


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7, 8], [7, 8]) == 2


def test_compare_on_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    reference = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    n = len(tok(reference, add_special_tokens=False)["input_ids"])
    assert compare(tok, f"  {reference}\n", reference, 64) == {"prefix_tokens": n, "reference_tokens": n,
                                                                "prefix_fraction": 1.0, "exact": True}
    half = "alpha beta gamma delta epsilon zeta"
    k = len(tok(half, add_special_tokens=False)["input_ids"])
    partial = compare(tok, half + " something else entirely", reference, 64)
    assert partial["prefix_tokens"] == k and partial["prefix_fraction"] == pytest.approx(k / n)
    assert not partial["exact"]
    # an answer cut by the generation budget can still be a full extraction
    cut = compare(tok, half, reference, max_new_tokens=k)
    assert cut["prefix_fraction"] == 1.0 and not cut["exact"]
    assert compare(tok, "omega", reference, 64)["prefix_fraction"] == 0.0
    assert compare(tok, "", "", 8)["prefix_fraction"] == 1.0
    assert compare(tok, "x", "", 8)["prefix_fraction"] == 0.0


def test_summarize_and_gap():
    train = {"a": [score(1.0, True), score(0.5, False)], "b": [score(0.2, False)]}
    test = {"a": [score(0.25, False)], "b": [score(0.2, False)]}
    base = {"a": [score(0.0, False), score(0.1, False)]}
    assert summarize(train)["a"] == {"count": 2, "mean_prefix_fraction": 0.75, "exact_rate": 0.5}
    assert summarize({"empty": []})["empty"] == {"count": 0, "mean_prefix_fraction": None, "exact_rate": None}
    gap = memorization_gap(train, test, base)
    assert set(gap["sources"]) == {"a", "b"}
    a = gap["sources"]["a"]
    assert a["gap_prefix_fraction"] == pytest.approx(0.5) and a["gap_exact_rate"] == pytest.approx(0.5)
    assert a["base_train"]["mean_prefix_fraction"] == pytest.approx(0.05)
    assert gap["sources"]["b"]["gap_prefix_fraction"] == pytest.approx(0.0)
    assert gap["sources"]["b"]["base_train"]["count"] == 0
    overall = gap["overall"]
    assert overall["tuned_train"]["count"] == 3 and overall["tuned_test"]["count"] == 2
    assert overall["gap_prefix_fraction"] == pytest.approx(1.7 / 3 - 0.225)
    assert memorization_gap({"a": [score(1.0, True)]}, {}, {})["sources"]["a"]["gap_exact_rate"] is None


def test_sample_by_source_is_stable():
    rows = [{"id": f"{source}-{i}", "source": source, "messages": []} for source in "xy" for i in range(10)]
    rows[3:3] = [{"id": "z-0", "source": "z", "messages": []}]
    sample = sample_by_source(rows, 4, seed=1)
    assert sample == sample_by_source(list(reversed(rows)), 4, seed=1)
    assert [row["source"] for row in sample] == ["x"] * 4 + ["y"] * 4 + ["z"]
    assert sample != sample_by_source(rows, 4, seed=2)


def test_memorized_answer_is_extracted(tiny_model_dir):
    from ftpipe.model.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    base = load_model(tiny_model_dir, "float32")
    _, base_scores = answer_rows(base, tokenizer, [SEEN], 32, 2, "base")
    assert base_scores[0]["prefix_fraction"] < 0.3 and not base_scores[0]["exact"]

    model, tokenizer = memorize(tiny_model_dir, [SEEN["messages"]])
    answers, (seen, unseen) = answer_rows(model, tokenizer, [SEEN, UNSEEN], 32, 2, "tuned")
    assert answers[0].strip() == SEEN["messages"][-1]["content"]   # the answers come back with their scores
    assert (seen["id"], seen["source"], unseen["id"]) == ("seen", "trivia", "unseen")
    assert seen["exact"] and seen["prefix_fraction"] == 1.0
    assert seen["prefix_tokens"] == seen["reference_tokens"] > 5
    assert not unseen["exact"] and unseen["prefix_fraction"] < 0.5

    gap = memorization_gap(by_source([seen]), by_source([unseen]), by_source(base_scores))
    trivia = gap["sources"]["trivia"]
    assert trivia["tuned_train"]["exact_rate"] == 1.0 and trivia["gap_exact_rate"] == 1.0
    assert trivia["gap_prefix_fraction"] > 0.5
