"""Extraction audit: does the tuned model repeat its training answers verbatim?

Each conversation is prompted with all its turns but the last (the chat template's generation prompt added), answered
greedily, and the answer compared with the reference on tokens: the longest common prefix, as a fraction of the
reference (capped at the generation budget, so an answer longer than max_new_tokens can still score 1), and exact
equality of the two texts (whitespace stripped).

A high score on training rows alone proves little: formulaic answers are predictable. Memorization is the gap between
the tuned model on its training rows and the tuned model on held-out test rows of the same source, with the base model
on the training rows as the floor (memorization_gap). Generation is the cost, so audit a fixed sample of rows per
source (sample_by_source).
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from ftpipe.core.sequences import common_prefix
from ftpipe.model.modeling import generate, render_chats


def compare(tokenizer, generated: str, reference: str, max_new_tokens: int) -> dict:
    """One score: {prefix_tokens, reference_tokens, prefix_fraction, exact} (see the module docstring). Both texts are
    stripped and tokenized without special tokens; an empty reference scores 1 only when the answer is empty too."""
    generated, reference = generated.strip(), reference.strip()
    gen_ids = tokenizer(generated, add_special_tokens=False)["input_ids"]
    ref_ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    prefix = common_prefix(gen_ids, ref_ids)
    budget = min(len(ref_ids), max_new_tokens)
    exact = generated == reference
    fraction = min(prefix, budget) / budget if budget else float(exact)
    return {"prefix_tokens": prefix, "reference_tokens": len(ref_ids), "prefix_fraction": fraction, "exact": exact}


def extraction_scores(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int,
                      batch_size: int, desc: str) -> list[dict]:
    """compare() of the greedy answer to each conversation's turns but the last against its last turn, in order."""
    if not conversations:
        return []
    prompts = render_chats(tokenizer, [list(messages)[:-1] for messages in conversations], add_generation_prompt=True)
    answers, _ = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
    return [compare(tokenizer, answer, messages[-1]["content"], max_new_tokens)
            for answer, messages in zip(answers, conversations)]


def sample_by_source(rows: Sequence[dict], per_source: int, seed: int) -> list[dict]:
    """At most `per_source` rows of each source, chosen by `seed` among the rows in id order (stable whatever the
    input order); returned sorted by (source, id)."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["source"]].append(row)
    rng = random.Random(seed)
    kept: list[dict] = []
    for source in sorted(grouped):
        ordered = sorted(grouped[source], key=lambda row: row["id"])
        kept += sorted(rng.sample(ordered, min(per_source, len(ordered))), key=lambda row: row["id"])
    return kept


def scores_by_source(model, tokenizer, rows: Sequence[dict], max_new_tokens: int, batch_size: int,
                     desc: str) -> dict[str, list[dict]]:
    """extraction_scores of chat rows ({id, source, messages}), grouped by source; each score carries its row's id."""
    rows = list(rows)
    scores = extraction_scores(model, tokenizer, [row["messages"] for row in rows], max_new_tokens, batch_size, desc)
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row, score in zip(rows, scores):
        grouped[row["source"]].append({"id": row["id"], **score})
    return dict(grouped)


def summarize(scores_by_group: dict[str, list[dict]]) -> dict[str, dict]:
    """{group: {count, mean_prefix_fraction, exact_rate}}; the means are None for an empty group."""
    summary = {}
    for group, scores in scores_by_group.items():
        n = len(scores)
        summary[group] = {"count": n,
                          "mean_prefix_fraction": sum(s["prefix_fraction"] for s in scores) / n if n else None,
                          "exact_rate": sum(bool(s["exact"]) for s in scores) / n if n else None}
    return summary


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def memorization_gap(tuned_train: dict[str, list[dict]], tuned_test: dict[str, list[dict]],
                     base_train: dict[str, list[dict]]) -> dict[str, dict]:
    """Tuned-on-train against tuned-on-test and base-on-train, per source and over all rows pooled:

    {"sources": {source: {"tuned_train": summary, "tuned_test": summary, "base_train": summary,
                          "gap_prefix_fraction": tuned_train - tuned_test, "gap_exact_rate": tuned_train - tuned_test}},
     "overall": the same over all rows pooled}

    Each argument is scores grouped by source (scores_by_source); a summary is summarize()'s entry (count 0 and None
    means when a source has no rows there; the gaps are None then)."""
    sources = sorted(set(tuned_train) | set(tuned_test) | set(base_train))

    def pooled(grouped: dict[str, list[dict]]) -> list[dict]:
        return [score for scores in grouped.values() for score in scores]

    def entry(train: list[dict], test: list[dict], base: list[dict]) -> dict:
        summary = summarize({"tuned_train": train, "tuned_test": test, "base_train": base})
        return {**summary,
                "gap_prefix_fraction": _difference(summary["tuned_train"]["mean_prefix_fraction"],
                                                   summary["tuned_test"]["mean_prefix_fraction"]),
                "gap_exact_rate": _difference(summary["tuned_train"]["exact_rate"],
                                              summary["tuned_test"]["exact_rate"])}

    return {"sources": {source: entry(tuned_train.get(source, []), tuned_test.get(source, []),
                                      base_train.get(source, [])) for source in sources},
            "overall": entry(pooled(tuned_train), pooled(tuned_test), pooled(base_train))}
