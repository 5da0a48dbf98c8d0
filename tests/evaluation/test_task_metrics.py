"""ftpipe.evaluation.task_metrics: known scores per metric, the empty-answer rules, and means per data source."""
from __future__ import annotations

import pytest
import sacrebleu

from ftpipe.evaluation.task_metrics import METRICS, TASK_METRIC, aggregate, normalize_answer, score_answer


def test_identical_answers_score_one_on_every_metric():
    assert score_answer("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(
        {metric: 1.0 for metric in METRICS})
    assert TASK_METRIC in METRICS


def test_disjoint_answers_score_zero_rouge_and_f1():
    scores = score_answer("alpha beta gamma", "delta epsilon zeta")
    assert scores["rougeL"] == 0.0 and scores["exact_match"] == 0.0 and scores["token_f1"] == 0.0
    assert 0.0 <= scores["chrF"] < 0.2


def test_rouge_l_of_a_partial_match():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 tokens each way
    scores = score_answer("the cat sat on the mat", "the cat is on the mat")
    assert scores["rougeL"] == pytest.approx(5 / 6)
    # unequal lengths: LCS "a b" of 2 predicted and 4 reference tokens: P=1, R=1/2, F=2/3
    assert score_answer("a b", "a x b y")["rougeL"] == pytest.approx(2 / 3)


def test_chrf_is_sacrebleu_corpus_chrf_of_one_sentence_scaled_to_one():
    prediction, reference = "The quick brown fox jumps.", "A quick brown fox jumped over."
    chrf = score_answer(prediction, reference)["chrF"]
    assert 0.0 < chrf < 1.0
    assert chrf == pytest.approx(sacrebleu.corpus_chrf([prediction], [[reference]]).score / 100)


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert score_answer("the Eiffel Tower.", "Eiffel   tower")["exact_match"] == 1.0
    assert score_answer("An apple", "apple!")["exact_match"] == 1.0
    assert score_answer("apples", "an apple")["exact_match"] == 0.0
    assert score_answer("theory", "ory")["exact_match"] == 0.0   # only whole-word articles go


def test_token_f1_by_hand():
    # normalized: [cat, sat, on, mat] vs [cat, is, on, mat]: 3 common, P = R = 3/4
    assert score_answer("The cat sat on the mat", "a cat is on a mat")["token_f1"] == pytest.approx(0.75)
    # repeated tokens count at most as often as in the other answer: [paris, paris, paris] vs [paris, france]
    # common 1, P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert score_answer("Paris Paris Paris", "Paris, France")["token_f1"] == pytest.approx(0.4)


def test_empty_answers_score_zero_except_exact_match_of_two_empties():
    zero = {"rougeL": 0.0, "chrF": 0.0, "exact_match": 0.0, "token_f1": 0.0}
    assert score_answer("", "a reference") == zero
    assert score_answer("an answer", "  ") == zero
    assert score_answer("", "") == {**zero, "exact_match": 1.0}


def _row(source: str, base: float, tuned: float) -> dict:
    return {"source": source, "scores": {"base": {metric: base for metric in METRICS},
                                         "tuned": {metric: tuned for metric in METRICS}}}


def test_aggregate_finds_the_source_that_got_better_and_the_one_that_got_worse():
    rows = [_row("zeta_docs", 0.2, 0.6), _row("zeta_docs", 0.4, 0.8),      # improves by 0.4
            _row("alpha_chat", 0.9, 0.7), _row("alpha_chat", 0.7, 0.5),     # worse by 0.2
            _row("alpha_chat", 0.8, 0.6)]
    summary = aggregate(rows)
    assert list(summary["per_source"]) == ["alpha_chat", "zeta_docs"]   # sorted by name
    docs, chat = summary["per_source"]["zeta_docs"], summary["per_source"]["alpha_chat"]
    assert docs["examples"] == 2 and chat["examples"] == 3
    for metric in METRICS:
        assert docs["base"][metric] == pytest.approx(0.3) and docs["tuned"][metric] == pytest.approx(0.7)
        assert docs["gain"][metric] == pytest.approx(0.4) and docs["gain"][metric] > 0
        assert chat["base"][metric] == pytest.approx(0.8) and chat["tuned"][metric] == pytest.approx(0.6)
        assert chat["gain"][metric] == pytest.approx(-0.2) and chat["gain"][metric] < 0
    overall = summary["overall"]
    assert overall["examples"] == 5
    assert overall["base"][TASK_METRIC] == pytest.approx(3.0 / 5)
    assert overall["tuned"][TASK_METRIC] == pytest.approx(3.2 / 5)
    assert overall["gain"][TASK_METRIC] == pytest.approx(0.2 / 5)
    assert set(overall) == {"examples", "base", "tuned", "gain"}


def test_aggregate_of_real_scores_and_of_nothing():
    rows = [{"source": "s", "scores": {"base": score_answer("no idea", "Paris"),
                                       "tuned": score_answer("Paris.", "Paris")}}]
    summary = aggregate(rows)
    assert summary["overall"]["gain"]["exact_match"] == 1.0 and summary["per_source"]["s"]["tuned"]["rougeL"] == 1.0
    assert aggregate([]) == {"overall": {"examples": 0, "base": {}, "tuned": {}, "gain": {}}, "per_source": {}}
