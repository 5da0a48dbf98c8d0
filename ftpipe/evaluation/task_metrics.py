"""Task quality of one answer against its reference, and its means per data source.

Per example, `score_answer` gives:

- ``rougeL``: ROUGE-L F-measure from Google's reference implementation (rouge-score), no stemming;
- ``chrF``: character n-gram F-score from sacrebleu, scaled to 0..1;
- ``exact_match`` and ``token_f1``: the SQuAD measures (answers normalized: lowercase, no punctuation, no
  articles a/an/the, single spaces). They are written here, following the official SQuAD v1.1 script, because
  the `evaluate` library's ``squad`` metric downloads its script from the Hugging Face Hub at run time, and the
  pipeline runs offline.

`aggregate` averages per-example scores of the base and the tuned model, overall and per data source, with the
gain (tuned minus base) of each metric. `TASK_METRIC` is the metric the gates use unless told otherwise.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

METRICS = ("rougeL", "chrF", "exact_match", "token_f1")
TASK_METRIC = "rougeL"

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    # built once: the scorer compiles its tokenizer, and an evaluation scores thousands of answers
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@lru_cache(maxsize=1)
def _chrf() -> CHRF:
    return CHRF()


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized answers are equal (two empty answers are equal), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-overlap F1 of the normalized answers; 0 when either has no tokens."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not common:   # also covers an empty side: nothing overlaps
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def score_answer(prediction: str, reference: str) -> dict[str, float]:
    """Every metric in METRICS for one answer, each in 0..1."""
    if not prediction.strip() or not reference.strip():
        # ROUGE and chrF of an empty side are 0 by definition; say so rather than rely on each library's edge case
        both_empty = not prediction.strip() and not reference.strip()
        return {"rougeL": 0.0, "chrF": 0.0, "exact_match": float(both_empty), "token_f1": 0.0}
    return {
        "rougeL": float(_rouge().score(reference, prediction)["rougeL"].fmeasure),   # score(target, prediction)
        "chrF": _chrf().sentence_score(prediction, [reference]).score / 100,
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
    }


def _means(rows: list[dict], models: tuple[str, ...]) -> dict:
    """{"examples": n, model: {metric: mean} for each model, "gain": {metric: last model - first model}}."""
    result: dict = {"examples": len(rows)}
    for model in models:
        metrics = [metric for metric in METRICS if all(metric in row["scores"][model] for row in rows)]
        result[model] = {metric: sum(row["scores"][model][metric] for row in rows) / len(rows)
                         for metric in metrics} if rows else {}
    first, last = result[models[0]], result[models[-1]]
    result["gain"] = {metric: last[metric] - first[metric] for metric in first if metric in last}
    return result


def aggregate(rows: list[dict], models: tuple[str, ...] = ("base", "tuned")) -> dict:
    """Mean scores overall and per data source.

    rows: [{"source": name, "scores": {"base": {metric: v}, "tuned": {metric: v}}, ...}, ...].
    Returns {"overall": summary, "per_source": {source: summary}} with sources sorted by name, where summary is
    {"examples": n, "base": {metric: mean}, "tuned": {metric: mean}, "gain": {metric: tuned - base}}.
    """
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    return {"overall": _means(rows, tuple(models)),
            "per_source": {source: _means(by_source[source], tuple(models)) for source in sorted(by_source)}}
