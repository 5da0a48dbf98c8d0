"""mean_loss bounds its memory (a token budget per forward, the float32 logits in chunks) without changing the
loss: on the tiny model it is bit for bit the one-forward-per-batch, one-cross-entropy-call loss it was, and
with budgets small enough to split every batch and every row it differs only by float summation order."""
from __future__ import annotations

import math

import pytest

from ftpipe.data.tokenized import load_tokenized
from ftpipe.model import modeling
from ftpipe.model.modeling import IGNORE_INDEX, load_model, loss_batches, mean_loss, pad_batch
from tests.conftest import EMBEDDED_EOS_ID


def unbounded_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """The loss as mean_loss computed it before its memory bounds: whole batches, one cross-entropy call each."""
    import torch
    import torch.nn.functional as F

    ordered = sorted(rows, key=lambda row: len(row["input_ids"]))
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            batch = pad_batch(ordered[start:start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shifted = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((shifted != IGNORE_INDEX).sum())
    return total / count


@pytest.fixture(scope="module")
def model_and_rows(tiny_base, tiny_data):
    rows = load_tokenized("validation", tiny_data[1]) + load_tokenized("test", tiny_data[1])
    return load_model(tiny_base, "float32"), rows


@pytest.mark.parametrize("batch_size", [16, 3])
def test_the_loss_is_bit_for_bit_what_it_was(model_and_rows, batch_size):
    model, rows = model_and_rows
    result = mean_loss(model, rows, EMBEDDED_EOS_ID, batch_size, "loss")
    assert result["loss"] == unbounded_loss(model, rows, EMBEDDED_EOS_ID, batch_size)
    assert result["tokens"] == sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    assert result["perplexity"] == math.exp(result["loss"])


def test_tiny_budgets_split_forwards_and_rows_and_keep_the_loss(model_and_rows, monkeypatch):
    model, rows = model_and_rows
    widest = max(len(row["input_ids"]) for row in rows)
    monkeypatch.setattr(modeling, "LOSS_TOKEN_BUDGET", widest + 10)   # at most one row of the widest per forward
    vocabulary = model.config.vocab_size
    monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", 7 * vocabulary)   # spans of 7 positions
    result = mean_loss(model, rows, EMBEDDED_EOS_ID, 16, "loss")
    assert result["loss"] == pytest.approx(unbounded_loss(model, rows, EMBEDDED_EOS_ID, 16), rel=1e-6)


def test_loss_batches_respect_rows_and_tokens():
    rows = [{"input_ids": [0] * length} for length in (3, 4, 5, 5, 9, 30)]
    batches = loss_batches(rows, batch_size=3, token_budget=16)
    assert [[len(row["input_ids"]) for row in batch] for batch in batches] == [[3, 4, 5], [5], [9], [30]]
    assert all(len(batch) * len(batch[-1]["input_ids"]) <= 16 for batch in batches[:-1])
    assert loss_batches(rows, batch_size=16, token_budget=10 ** 6) == [rows]   # the old batching when it fits
