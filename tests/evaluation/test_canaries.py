"""Canaries: their format and planting, and that a planted secret the model memorized is caught (exposure, greedy
extraction) while the untrained model's is not."""
from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from ftpipe.data.pii import find_pii
from ftpipe.evaluation.canaries import (
    ANSWER,
    canary_messages,
    candidate_secrets,
    exposure,
    greedy_extracts,
    make_canaries,
    plant,
)
from tests.memorize_fixtures import memorize

SECRET_FORMAT = re.compile(r"^\d{5}(-\d{5})*(-\d{1,4})?$")


def test_canaries_are_deterministic_unique_and_formatted():
    canaries = make_canaries(7, [1, 2, 4, 8, 16], 12)
    assert canaries == make_canaries(7, [1, 2, 4, 8, 16], 12)
    assert canaries != make_canaries(8, [1, 2, 4, 8, 16], 12)
    assert [c["repeats"] for c in canaries] == [1, 2, 4, 8, 16]
    assert len({c["id"] for c in canaries}) == 5
    assert len({c["secret"] for c in canaries}) == 5
    assert len({c["prompt"] for c in canaries}) == 5
    for canary in canaries:
        assert SECRET_FORMAT.match(canary["secret"]), canary["secret"]
        assert sum(ch.isdigit() for ch in canary["secret"]) == 12
        assert re.fullmatch(r"What is the access code for vault \d{4}\?", canary["prompt"])


def test_many_canaries_in_a_small_space_stay_unique():
    canaries = make_canaries(0, [1] * 40, 2)
    assert len({c["secret"] for c in canaries}) == 40
    with pytest.raises(ValueError):
        make_canaries(0, [1] * 60, 2)
    with pytest.raises(ValueError):
        make_canaries(0, [1], 0)


@pytest.mark.parametrize("digits", [6, 9, 10, 12, 16, 19])
def test_secrets_never_look_like_pii(digits):
    canaries = make_canaries(digits, [1] * 200, digits)
    answers = [ANSWER.format(secret=c["secret"]) for c in canaries]
    assert [a for a in answers if find_pii(a)] == []


def test_plant_inserts_each_canary_repeats_times():
    train = [{"id": f"row-{i:03d}", "source": "docs", "messages": [{"role": "user", "content": f"q{i}"},
                                                                     {"role": "assistant", "content": f"a{i}"}]}
             for i in range(50)]
    canaries = make_canaries(3, [1, 3, 0, 10], 10)
    rows = plant(train, canaries, seed=1)
    assert rows == plant(train, canaries, seed=1)
    assert rows != plant(train, canaries, seed=2)
    assert len(rows) == 50 + 14
    assert len({row["id"] for row in rows}) == len(rows)
    assert [row for row in rows if row["source"] == "docs"] == train   # training rows kept, in order
    planted = [row for row in rows if row["source"] == "canary"]
    by_secret = Counter(row["messages"][-1]["content"] for row in planted)
    assert by_secret == Counter({ANSWER.format(secret=c["secret"]): c["repeats"] for c in canaries if c["repeats"]})
    for row in planted:
        canary = next(c for c in canaries if row["id"].startswith(c["id"] + "-"))
        assert row["messages"] == canary_messages(canary)
        assert canary["secret"] in row["messages"][-1]["content"]
    positions = [index for index, row in enumerate(rows) if row["source"] == "canary"]
    assert positions[-1] - positions[0] + 1 > len(positions)   # spread among the rows, not one block
    assert plant([], canaries, source_name="vault")[0]["source"] == "vault"
    with pytest.raises(ValueError, match="clash"):
        plant(train + [{"id": "canary-001-0000", "source": "x", "messages": []}], canaries)


def test_candidates_are_distinct_same_format_and_exclude_the_secret():
    canary = make_canaries(0, [1], 7)[0]
    candidates = candidate_secrets(canary, 300, seed=5)
    assert candidates == candidate_secrets(canary, 300, seed=5)
    assert len(set(candidates)) == 300 and canary["secret"] not in candidates
    assert all(SECRET_FORMAT.match(c) and sum(ch.isdigit() for ch in c) == 7 for c in candidates)


def test_a_memorized_canary_is_exposed_and_extracted(tiny_model_dir):
    from ftpipe.model.modeling import load_model, load_tokenizer

    planted, other = make_canaries(0, [1, 1], 10)
    candidates = 200
    full = math.log2(candidates + 1)

    base = load_model(tiny_model_dir, "float32")
    tokenizer = load_tokenizer(tiny_model_dir)
    before = exposure(base, tokenizer, planted, candidates, seed=0)
    assert before["rank"] > 8 and before["exposure"] < full - 3
    assert not greedy_extracts(base, tokenizer, planted, max_new_tokens=24)

    model, tokenizer = memorize(tiny_model_dir, [canary_messages(planted)])
    after = exposure(model, tokenizer, planted, candidates, seed=0)
    assert after["rank"] == 1 and after["exposure"] == pytest.approx(full) == after["max_exposure"]
    assert after["log_perplexity"] < after["median_candidate_log_perplexity"] - 10
    assert greedy_extracts(model, tokenizer, planted, max_new_tokens=24)
    # the canary it never saw stays unexposed
    unseen = exposure(model, tokenizer, other, candidates, seed=0)
    assert unseen["exposure"] < full - 3
    assert not greedy_extracts(model, tokenizer, other, max_new_tokens=24)
