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


def answer_rows(model, tokenizer, rows: Sequence[dict], max_new_tokens: int, batch_size: int,
                desc: str) -> tuple[list[str], list[dict]]:
    """The greedy answers to chat rows ({id, source, messages}: every turn but the last is the prompt), and each
    answer's compare() with the row's last turn, tagged with the row's id and source; both in the rows' order."""
    rows = list(rows)
    if not rows:
        return [], []
    prompts = render_chats(tokenizer, [list(row["messages"])[:-1] for row in rows], add_generation_prompt=True)
    answers, _ = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
    return answers, [{"id": row["id"], "source": row["source"],
                      **compare(tokenizer, answer, row["messages"][-1]["content"], max_new_tokens)}
                     for row, answer in zip(rows, answers)]


def by_source(scores: Sequence[dict]) -> dict[str, list[dict]]:
    """Scores (answer_rows') grouped by their row's source."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for score in scores:
        grouped[score["source"]].append(score)
    return dict(grouped)


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

    Each argument is scores grouped by source (by_source); a summary is summarize()'s entry (count 0 and None
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
