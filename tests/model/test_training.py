"""ftpipe.model.training: the batches the trainer is given (packed rows score each example as if alone,
padded or padding-free), the collator's token counts, the LoRA targets, the backend, and the throughput
figures of a curve."""
import dataclasses

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.data.packing import packed_rows
from ftpipe.data.tokenized import load_tokenized
from ftpipe.model.lora import LoraTargets, lora_targets
from ftpipe.model.modeling import IGNORE_INDEX, pad_packed_batch, padding_free_batch
from ftpipe.model.training import (
    PADDING_FREE_MULTIPLE,
    ROWS_KEY,
    TokenCountingCollator,
    capturable_pass,
    cuda_graphs,
    load_trainable_model,
    resolve_backend,
    throughput,
)
from tests.conftest import EMBEDDED_EOS_ID
from tests.model_fixtures import TARGET_MODULES, TOKENIZE, TRAIN


def test_resolve_backend_on_a_machine_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert resolve_backend("auto") == "cpu" and resolve_backend("cpu") == "cpu"
    with pytest.raises(PipelineError, match=r"train\.backend is 'unsloth', but no CUDA GPU is visible"):
        resolve_backend("unsloth")


# Packed rows. PAD_ID is the tiny model's pad (and end-of-turn) token.
PAD_ID = EMBEDDED_EOS_ID


@pytest.fixture(scope="module")
def float_model(tiny_model_dir):
    """The tiny Llama in float32 (exact enough to compare losses to 1e-5), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def packed(examples: list[dict]) -> dict:
    """One packed row of `examples`, as the tokenize stage writes it."""
    import numpy as np

    arrays = [{"id": row["id"], "input_ids": np.array(row["input_ids"]), "labels": np.array(row["labels"])}
              for row in examples]
    columns = packed_rows(arrays, [list(range(len(arrays)))])
    return {key: values[0].tolist() if hasattr(values[0], "tolist") else values[0] for key, values in columns.items()}


def loss(model, batch: dict, **kwargs) -> float:
    """The model's own training loss (mean over label tokens), as the trainer computes it."""
    import torch

    with torch.no_grad():
        return model(**batch, **kwargs).loss.item()


def separate_losses(model, examples: list[dict]) -> tuple[float, int]:
    """Token-weighted mean loss of the examples, each run alone, and its number of loss tokens."""
    import torch

    total, count = 0.0, 0
    for row in examples:
        tokens = int(sum(label != IGNORE_INDEX for label in row["labels"][1:]))
        total += loss(model, {"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]])},
                      use_cache=False) * tokens
        count += tokens
    return total / count, count


@pytest.fixture(scope="module")
def examples(tiny_data) -> list[dict]:
    """Three tokenized training examples (one per row, assistant-only labels) of different lengths."""
    rows = load_tokenized("train", tiny_data[1])[:3]
    assert len({len(row["input_ids"]) for row in rows}) > 1   # different lengths: padding shows
    return rows


def test_a_packed_row_scores_each_example_as_if_alone(float_model, examples):
    """Attention stays within each example of a packed row: its loss is the token-weighted mean of the
    examples' own losses. The negative controls show that the test can fail: the same row with
    contiguous position ids, or with a KV cache (transformers then ignores the position ids' blocks),
    lets examples attend to each other and the loss moves by ~5e-3, 500 times the tolerance."""
    import torch

    expected, tokens = separate_losses(float_model, examples)
    row = packed(examples)
    batch = pad_packed_batch([row], PAD_ID)
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]   # no attention mask
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == tokens
    assert loss(float_model, batch, use_cache=False) == pytest.approx(expected, abs=1e-5)

    contiguous = dict(batch, position_ids=torch.arange(len(row["input_ids"])).unsqueeze(0))
    assert abs(loss(float_model, contiguous, use_cache=False) - expected) > 1e-3
    assert abs(loss(float_model, batch, use_cache=True) - expected) > 1e-3


def test_a_padded_batch_of_packed_rows_and_its_padding_free_form_score_the_same(float_model, examples):
    """Two packed rows of different lengths, right-padded (the CPU batch), or concatenated into one row
    without padding (the Unsloth batch): the padding never changes the loss of the real tokens."""
    expected, _ = separate_losses(float_model, examples)
    rows = [packed(examples[:2]), packed(examples[2:])]
    padded = pad_packed_batch(rows, PAD_ID)
    width = len(rows[0]["input_ids"])
    assert padded["input_ids"].shape == (2, width) and len(rows[1]["input_ids"]) < width
    tail = padded["position_ids"][1, len(rows[1]["input_ids"]):]
    assert tail.tolist() == list(range(len(tail)))   # the padding is a block of its own
    assert (padded["labels"][1, len(rows[1]["input_ids"]):] == IGNORE_INDEX).all()
    assert loss(float_model, padded, use_cache=False) == pytest.approx(expected, abs=1e-5)

    flat = padding_free_batch(rows)
    assert flat["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))
    assert flat["packed_seq_lengths"].tolist() == [len(row["input_ids"]) for row in examples]
    transformers_input = {key: value for key, value in flat.items() if key != "packed_seq_lengths"}
    assert loss(float_model, transformers_input, use_cache=False) == pytest.approx(expected, abs=1e-5)


def test_collator_carries_the_steps_rows_and_counts_each_micro_batch_as_trained(examples):
    rows = [packed(examples[:2]), packed(examples[2:])]
    real = sum(len(row["input_ids"]) for row in examples)
    loss_tokens = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in examples)
    for padding_free, keys in ((False, ["input_ids", "labels", "position_ids"]),
                               (True, ["input_ids", "labels", "packed_seq_lengths", "position_ids"])):
        collator = TokenCountingCollator(PAD_ID, padding_free=padding_free)
        batch = collator(rows)   # what the trainer's loader gives: the step's rows, and labels to count targets
        assert sorted(batch) == sorted(["labels", ROWS_KEY]) and batch[ROWS_KEY].rows == rows
        assert collator.tokens == 0   # nothing is counted before it is trained on
        for micro_rows in (rows[:1], rows[1:]):
            micro_batch = collator.collate(micro_rows)
            assert sorted(micro_batch) == keys
            collator.count(micro_batch, micro_rows)
        assert (collator.useful_tokens, collator.loss_tokens) == (real, loss_tokens)
        assert collator.tokens >= real
        if padding_free:   # each micro-batch's row rounded up to PADDING_FREE_MULTIPLE positions
            assert collator.tokens == sum(-(-len(row["input_ids"]) // PADDING_FREE_MULTIPLE) * PADDING_FREE_MULTIPLE
                                          for row in rows)
    collator = TokenCountingCollator(PAD_ID, padding_free=True)   # one example per row: padded, masked
    micro_batch = collator.collate(examples)
    assert sorted(micro_batch) == ["attention_mask", "input_ids", "labels"]
    collator.count(micro_batch, examples)
    assert (collator.useful_tokens, collator.loss_tokens) == (real, loss_tokens)
    assert collator.tokens == len(examples) * max(len(row["input_ids"]) for row in examples) > real


def test_a_padding_free_row_rounded_up_has_the_same_loss(examples, float_model):
    """The filler is an example of its own (positions from 0, no targets): no token attends to it, no loss on it."""
    rows = [packed(examples)]
    exact, rounded = padding_free_batch(rows), padding_free_batch(rows, pad_to_multiple=64, pad_id=PAD_ID)
    length = exact["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] == -(-length // 64) * 64 > length
    filler = rounded["input_ids"].shape[1] - length
    assert rounded["packed_seq_lengths"].tolist() == exact["packed_seq_lengths"].tolist() + [filler]
    assert rounded["position_ids"][0, length:].tolist() == list(range(filler))
    assert (rounded["labels"][0, length:] == IGNORE_INDEX).all()

    def model_input(batch):
        return {key: value for key, value in batch.items() if key != "packed_seq_lengths"}

    assert loss(float_model, model_input(rounded), use_cache=False) == pytest.approx(
        loss(float_model, model_input(exact), use_cache=False), abs=1e-6)


def test_an_unknown_lora_target_is_named_with_the_models_real_layers(tiny_base):
    """Phi-3 fuses qkv_proj; Llama has q_proj, k_proj, v_proj: a wrong name must say which names exist."""
    params = dataclasses.replace(TRAIN, lora=dataclasses.replace(TRAIN.lora, target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(PipelineError) as raised:
        load_trainable_model("cpu", params, tiny_base, TOKENIZE.max_seq_length, "float32")
    message = str(raised.value)
    assert "train.lora.target_modules: ['qkv_proj'] not found in the base model" in message
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message and "lm_head" not in message


def test_all_linear_targets_every_linear_layer_but_the_head(tiny_base):
    """[all-linear] is resolved into explicit names (tests/model/test_lora.py: per architecture); named modules
    are given as they are."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    assert lora_targets(model, ["all-linear"]) == LoraTargets(sorted(TARGET_MODULES))
    assert lora_targets(model, ["q_proj", "self_attn.v_proj"]) == LoraTargets(["q_proj", "self_attn.v_proj"])


def test_throughput_leaves_out_the_warm_up_step():
    curve = [{"tokens": 100, "useful_tokens": 50, "seconds": 10.0, "peak_memory_gib": 1.0, "mfu": 0.1},
             {"tokens": 100, "useful_tokens": 80, "seconds": 1.0, "peak_memory_gib": 2.0, "mfu": 0.3},
             {"tokens": 100, "useful_tokens": 90, "seconds": 1.0, "peak_memory_gib": 1.5, "mfu": 0.5}]
    assert throughput(curve) == {"tokens_per_s": 100.0, "useful_tokens_per_s": 85.0, "useful_token_share": 0.85,
                                 "peak_memory_gib": 2.0, "mfu": 0.4}
    cpu = [{"tokens": 10, "useful_tokens": 10, "seconds": 2.0, "peak_memory_gib": None, "mfu": None}]
    assert throughput(cpu) == {"tokens_per_s": 5.0, "useful_tokens_per_s": 5.0, "useful_token_share": 1.0}


def test_throughput_skips_steps_logged_without_counts():
    """A run resumed from a checkpoint of older code carries per-step logs without these counts."""
    old = [{"tokens": 100, "seconds": 1.0, "useful_tokens": None}, {"tokens": None, "seconds": 1.0}]
    assert throughput(old) == {}
    new = old + [{"tokens": 100, "useful_tokens": 100, "seconds": 2.0}]
    assert throughput(new) == {"tokens_per_s": 50.0, "useful_tokens_per_s": 50.0, "useful_token_share": 1.0}


def test_cuda_graphs_are_used_with_unsloth_on_one_process_and_otherwise_say_why_not(monkeypatch):
    import sys
    import types

    import torch

    from ftpipe.model.cuda_graphs import BackboneGraphs

    model = torch.nn.Linear(2, 2)
    llama = types.ModuleType("unsloth.models.llama")
    llama._run_backbone = original = lambda causal_lm, **kwargs: None
    monkeypatch.setitem(sys.modules, "unsloth.models.llama", llama)
    graphs, why_not = cuda_graphs(TRAIN, "unsloth", model)
    assert isinstance(graphs, BackboneGraphs) and why_not is None and len(graphs.parameters) == 2
    assert llama._run_backbone is not original   # installed; the train stage uninstalls it after training
    graphs.uninstall()
    monkeypatch.delitem(sys.modules, "unsloth.models.llama")
    assert cuda_graphs(TRAIN, "unsloth", model) == (None, "this Unsloth runs no _run_backbone (CUDA graphs go in "
                                                          "there)")
    assert cuda_graphs(dataclasses.replace(TRAIN, cuda_graphs="off"), "unsloth", model) == (None,
                                                                                             "train.cuda_graphs: off")
    assert cuda_graphs(TRAIN, "transformers", model) == (
        None, "the transformers backend (CUDA graphs are used with Unsloth only)")


def test_cuda_graphs_are_off_under_ddp(monkeypatch):
    import torch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cuda_graphs(TRAIN, "unsloth", torch.nn.Linear(2, 2)) == (
        None, "several processes (DDP exchanges gradients inside the backward pass)")


def test_only_passes_keeping_every_layer_on_rows_not_packed_can_be_graphs():
    from ftpipe.model.training_plan import Plan

    rows = [{"input_ids": [1, 2], "labels": [1, 2]}] * 2
    assert capturable_pass(Plan(2, 0, 0, 4), rows)
    assert not capturable_pass(Plan(2, 1, 0, 4), rows)     # recomputation stashes random states
    assert not capturable_pass(Plan(2, 0, 1, 4), rows)     # offloading copies to host RAM
    assert not capturable_pass(Plan(2, 0, 0, 4), [{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0, 1]}])

