"""The training plan (ftpipe/model/training_plan.py): the candidates params allow, the memory model fitted on
probe steps, the choice of the fastest plan that fits, the fallback after running out of memory, and, on the tiny
model on the CPU, that every plan trains the same step: per-layer recomputation and micro-batches change no
gradient, and a step redone after an out-of-memory error ends where it would have."""
from __future__ import annotations

import dataclasses

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.model.memory_probe import offload_bytes
from ftpipe.model.training_plan import (
    KEEP,
    OFFLOAD,
    RECOMPUTE,
    Choice,
    MemoryModel,
    Plan,
    PlannedSteps,
    apply_plan,
    candidate_plans,
    checkpoint_levels,
    choose_plan,
    decoder_layers,
    loss_token_count,
    micro_batch_sizes,
    next_plan,
    predicted_speed,
)
from tests.model_fixtures import TOKENIZE, TRAIN

GIB, KIB = 2**30, 2**10
# An 8B Llama's figures (32 layers, hidden 4096, bf16), as ftpipe.model.memory_probe would fit them: 4 rows of
# 2048 tokens without recomputation take 28.8 GiB (measured on an H200: 36 GiB with the 4-bit weights)
LLAMA_8B = MemoryModel(step_fixed=1.0 * GIB, keep_per_token=110 * KIB, input_per_token=8 * KIB,
                       transient_per_token=118 * KIB, other_per_token=40 * KIB)
SEQ = 2048


def test_micro_batch_sizes_are_the_batch_divisors_and_powers_of_two_largest_first():
    assert micro_batch_sizes(16, "auto") == [16, 8, 4, 2, 1]
    assert micro_batch_sizes(6, "auto") == [6, 4, 3, 2, 1]
    assert micro_batch_sizes(16, 4) == [4]


def test_each_checkpointing_mode_allows_its_own_layer_counts():
    assert checkpoint_levels("off", 4, True) == [(0, 0)]
    assert checkpoint_levels("on", 4, True) == [(4, 0)]
    assert checkpoint_levels("unsloth", 4, True) == [(0, 4)]
    assert checkpoint_levels("auto", 2, False) == [(0, 0), (1, 0), (2, 0)]
    assert checkpoint_levels("auto", 2, True) == [(0, 0), (1, 0), (2, 0), (1, 1), (0, 2)]


def test_a_plan_names_each_layers_mode_and_its_accumulation():
    plan = Plan(micro_batch_size=4, recomputed=2, offloaded=1, layers=5)
    assert plan.layer_modes() == [OFFLOAD, RECOMPUTE, RECOMPUTE, KEEP, KEEP]
    assert plan.accumulation(16) == 4 and plan.accumulation(6) == 2
    assert plan.describe(16) == ("micro-batch 4 x 4 accumulated, 2 of 5 decoder layers recomputed, "
                                 "1 of 5 decoder layers offloaded to host RAM and recomputed")
    assert Plan(16, 0, 0, 32).describe(16) == "micro-batch 16 (the whole batch), no recomputation"
    assert plan.as_dict(16) == {"micro_batch_size": 4, "recomputed": 2, "offloaded": 1, "layers": 5, "kept": 2,
                                "gradient_accumulation": 4}


def test_the_memory_model_is_recovered_from_three_probe_steps():
    truth = LLAMA_8B
    layers, tokens = 32, SEQ

    def probe(plan, rows):
        return truth.step_bytes(plan, rows * tokens)

    fitted = MemoryModel.fit(layers, tokens, keep=probe(Plan(1, 0, 0, layers), 1),
                             recompute=probe(Plan(1, layers, 0, layers), 1),
                             recompute_double=probe(Plan(2, layers, 0, layers), 2),
                             input_per_token=truth.input_per_token, fixed_extra=0.5 * GIB)
    assert fitted.keep_per_token == pytest.approx(truth.keep_per_token)
    assert fitted.other_per_token == pytest.approx(truth.other_per_token)
    assert fitted.transient_per_token == pytest.approx(truth.transient_per_token)
    assert fitted.step_fixed == pytest.approx(truth.step_fixed + 0.5 * GIB)   # plus the optimizer's state


def test_the_offload_probe_gives_what_offloading_keeps_on_the_gpu():
    # what the H200 measured for a row of the 8B model (bench/results/gpu_longest_memory.json): offloading every
    # layer takes 32 KiB a token more than transient + other; recomputation does not
    truth = dataclasses.replace(LLAMA_8B, offload_per_token=32 * KIB)
    layers = 32

    def probe(plan, rows):
        return truth.step_bytes(plan, rows * SEQ)

    fitted = MemoryModel.fit(layers, SEQ, keep=probe(Plan(1, 0, 0, layers), 1),
                             recompute=probe(Plan(1, layers, 0, layers), 1),
                             recompute_double=probe(Plan(2, layers, 0, layers), 2),
                             input_per_token=truth.input_per_token, offload=probe(Plan(1, 0, layers, layers), 1))
    assert fitted.offload_per_token == pytest.approx(32 * KIB)
    mixed = Plan(1, 16, 16, layers)
    assert fitted.step_bytes(mixed, 300_000) == pytest.approx(truth.step_bytes(mixed, 300_000))
    assert fitted.step_bytes(Plan(1, 32, 0, 32), SEQ) == pytest.approx(truth.step_bytes(Plan(1, 32, 0, 32), SEQ))
    # without the probe (no offloading backend): nothing added
    assert MemoryModel.fit(layers, SEQ, None, 4 * GIB, 7 * GIB, 8 * KIB).offload_per_token == 0.0


def test_an_offload_probe_that_ran_out_of_memory_rules_out_offloading():
    assert offload_bytes({"recompute": 1.0}) is None                       # not probed
    assert offload_bytes({"offload": None}) == float("inf")               # ran out of memory
    fitted = MemoryModel.fit(32, SEQ, None, 4 * GIB, 7 * GIB, 8 * KIB, offload=offload_bytes({"offload": None}))
    choice = choose_plan(candidate_plans(1, 1, "auto", 32, True), fitted, 20 * GIB, SEQ, 1)
    assert choice.plan.offloaded == 0


def test_a_fallback_keeps_offloaded_inputs_within_host_ram():
    candidates = candidate_plans(1, 1, "auto", 32, True)
    length = 344_064   # each offloaded layer's input: 8 KiB x 344,064 tokens = 2.6 GiB of host RAM
    # the fastest plan needing less GPU memory offloads one layer more
    assert next_plan(Plan(1, 29, 3, 32), candidates, LLAMA_8B, length, 20 * GIB) == Plan(1, 28, 4, 32)
    # 7 layers (18.4 GiB) fit 20 GiB of host RAM, 8 (21 GiB) do not: nothing is left to fall back to
    assert next_plan(Plan(1, 25, 7, 32), candidates, LLAMA_8B, length, 20 * GIB) is None
    assert next_plan(Plan(1, 25, 7, 32), candidates, LLAMA_8B, length) == Plan(1, 24, 8, 32)   # RAM unbounded
    assert LLAMA_8B.fits_host(Plan(1, 25, 7, 32), length, 20 * GIB)
    assert not LLAMA_8B.fits_host(Plan(1, 24, 8, 32), length, 20 * GIB)
    assert LLAMA_8B.fits_host(Plan(2, 0, 0, 32), length, 0)   # nothing offloaded: no host RAM needed


def test_a_keep_probe_that_ran_out_of_memory_rules_out_keeping_layers():
    fitted = MemoryModel.fit(32, SEQ, keep=None, recompute=4 * GIB, recompute_double=7 * GIB,
                             input_per_token=8 * KIB)
    assert fitted.keep_per_token == float("inf")
    assert fitted.step_bytes(Plan(1, 32, 0, 32), SEQ) == pytest.approx(4 * GIB)   # what the probe measured
    choice = choose_plan(candidate_plans(4, "auto", "auto", 32, False), fitted, 20 * GIB, SEQ, 4)
    assert choice.plan.kept == 0


@pytest.mark.parametrize("budget_gib, expected", [
    (130, Plan(16, 0, 0, 32)),   # everything fits: the whole batch, nothing recomputed
    (40, Plan(4, 0, 0, 32)),     # 4 rows without recomputation beat 8 with the 12 layers recomputed that would fit
    (16, Plan(2, 0, 0, 32)),     # a 24 GB card: 2 rows, nothing recomputed
])
def test_the_fastest_plan_that_fits_is_chosen(budget_gib, expected):
    candidates = candidate_plans(16, "auto", "auto", 32, True)
    choice = choose_plan(candidates, LLAMA_8B, budget_gib * GIB, SEQ, 16)
    assert choice.plan == expected
    assert choice.predicted_bytes <= budget_gib * GIB
    # no candidate that fits is predicted to be faster
    fitting = [plan for plan in candidates
               if LLAMA_8B.step_bytes(plan, plan.micro_batch_size * SEQ) <= budget_gib * GIB]
    assert max(predicted_speed(plan, SEQ) for plan in fitting) == predicted_speed(choice.plan, SEQ)


def test_recomputing_a_few_layers_is_chosen_over_halving_the_micro_batch_when_it_is_faster():
    """Between a micro-batch of 8 rows with two layers recomputed and 4 rows with none, the speed model prefers
    whichever costs less time: here the two recomputed layers (0.35 x 2/32 = 2.2%) over the halving (3.1%)."""
    plan_8 = Plan(8, 2, 0, 32)
    budget = LLAMA_8B.step_bytes(plan_8, 8 * SEQ) + 1
    choice = choose_plan(candidate_plans(16, "auto", "auto", 32, False), LLAMA_8B, budget, SEQ, 16)
    assert choice.plan == plan_8
    assert predicted_speed(plan_8, SEQ) > predicted_speed(Plan(4, 0, 0, 32), SEQ)


def test_offloading_is_chosen_only_when_recomputing_on_the_gpu_does_not_fit():
    """One row of a long sequence: every layer recomputed still keeps every layer's input on the GPU; offloading
    some of them to host RAM is what fits."""
    long = 256 * 1024
    all_recomputed = LLAMA_8B.step_bytes(Plan(1, 32, 0, 32), long)
    candidates = candidate_plans(1, "auto", "auto", 32, True)
    choice = choose_plan(candidates, LLAMA_8B, all_recomputed - 1 * GIB, long, 1)
    assert choice.plan.offloaded > 0 and choice.plan.kept == 0
    assert choice.plan.offloaded == min(plan.offloaded for plan in candidates
                                        if LLAMA_8B.step_bytes(plan, long) <= all_recomputed - 1 * GIB)
    no_host = choose_plan(candidates, LLAMA_8B, all_recomputed - 1 * GIB, long, 1, host_budget_bytes=0)
    assert "no plan is predicted to fit" in no_host.reason


def test_when_nothing_fits_the_smallest_plan_is_tried_and_the_reason_says_so():
    choice = choose_plan(candidate_plans(4, "auto", "on", 32, False), LLAMA_8B, 0.5 * GIB, SEQ, 4)
    assert choice.plan == Plan(1, 32, 0, 32)
    assert choice.reason.startswith("no plan is predicted to fit 0.5 GiB; trying the smallest")


def test_after_running_out_of_memory_the_next_plan_needs_less():
    candidates = candidate_plans(16, "auto", "auto", 32, True)
    failed = Plan(4, 0, 0, 32)
    plan = next_plan(failed, candidates, LLAMA_8B, SEQ)
    assert LLAMA_8B.step_bytes(plan, plan.micro_batch_size * SEQ) < LLAMA_8B.step_bytes(failed, 4 * SEQ)
    assert next_plan(Plan(1, 0, 32, 32), candidates, LLAMA_8B, SEQ) is None   # nothing needs less
    # without a memory model (params fixed the plan's other half): smaller micro-batches
    fixed = candidate_plans(16, "auto", "off", 32, False)
    assert next_plan(Plan(16, 0, 0, 32), fixed, None, SEQ) == Plan(8, 0, 0, 32)


def test_loss_tokens_are_the_targets_after_the_first_position():
    assert loss_token_count({"labels": [-100, 5, 6, -100, 7]}) == 3
    assert loss_token_count({"labels": [4, 5]}) == 1


# --- on the tiny model, on the CPU ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_model(tiny_base):
    """The tiny 4-bit base with LoRA, layers armed for checkpointing (as gradient_checkpointing: auto loads it)."""
    from ftpipe.model.training import load_trainable_model

    params = dataclasses.replace(TRAIN, gradient_checkpointing="auto")
    return load_trainable_model("cpu", params, tiny_base, TOKENIZE.max_seq_length, "float32")


@pytest.fixture(scope="module")
def step_rows(tiny_data):
    from ftpipe.data.tokenized import load_tokenized

    return load_tokenized("train", tiny_data[1])[:4]


def lora_gradients(model, rows, plan: Plan, oom_when=None, free_memory=None) -> tuple[dict, list]:
    """One step's LoRA gradients under `plan` (through PlannedSteps, the trainer's path), and the plans taken.
    `oom_when(plan)`: raise CUDA's out-of-memory error on a micro-batch of that plan; `free_memory`: the planner's
    (what frees memory held for speed)."""
    import torch

    from ftpipe.model.modeling import pad_batch

    model.zero_grad(set_to_none=True)
    layers = len(decoder_layers(model))
    candidates = candidate_plans(4, "auto", "auto", layers, False)
    planner = PlannedSteps(model, Choice(plan, "test"), candidates, None, TOKENIZE.max_seq_length, 4)
    planner.free_memory = free_memory
    total = sum(loss_token_count(row) for row in rows)

    lasts = []

    def micro_step(micro_rows, share, last):
        lasts.append(last)
        if oom_when and oom_when(planner.plan):
            raise torch.OutOfMemoryError("test: out of memory")
        batch = pad_batch(micro_rows, 0)
        loss = model(**batch, use_cache=False).loss * share
        loss.backward()
        return loss.detach()

    torch.manual_seed(0)
    loss = planner.run(rows, micro_step, step=1)
    assert sum(loss_token_count(row) for row in rows) == total
    # the last micro-batch of the step (where DDP exchanges gradients) is flagged, and only it
    micro_batches = -(-len(rows) // planner.plan.micro_batch_size)
    assert lasts[-micro_batches:] == [False] * (micro_batches - 1) + [True]
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"loss": float(loss), **grads}, planner.history


def assert_same_gradients(left: dict, right: dict, rtol: float = 1e-5) -> None:
    import torch

    assert left.keys() == right.keys() and len(left) > 1
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=rtol, atol=1e-7, msg=name)


def test_apply_plan_sets_each_decoder_layers_checkpointing(lora_model):
    layers = decoder_layers(lora_model)
    assert len(layers) == 2
    apply_plan(lora_model, Plan(1, 1, 0, 2))
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    apply_plan(lora_model, Plan(1, 0, 0, 2))
    assert [layer.gradient_checkpointing for layer in layers] == [False, False]
    with pytest.raises(PipelineError, match="offloaded checkpointing needs Unsloth"):
        apply_plan(lora_model, Plan(1, 0, 1, 2))


def test_recomputed_layers_give_the_gradients_of_kept_ones(lora_model, step_rows):
    lora_model.train()
    kept, _ = lora_gradients(lora_model, step_rows, Plan(4, 0, 0, 2))
    for plan in (Plan(4, 1, 0, 2), Plan(4, 2, 0, 2)):
        recomputed, _ = lora_gradients(lora_model, step_rows, plan)
        assert_same_gradients(recomputed, kept)


def test_micro_batches_sum_to_the_whole_batchs_gradient(lora_model, step_rows):
    lora_model.train()
    whole, _ = lora_gradients(lora_model, step_rows, Plan(4, 0, 0, 2))
    for micro in (1, 2, 3):
        split, _ = lora_gradients(lora_model, step_rows, Plan(micro, 0, 0, 2))
        assert_same_gradients(split, whole, rtol=1e-4)


def test_a_step_that_runs_out_of_memory_is_redone_on_the_next_plan_with_the_same_result(lora_model, step_rows,
                                                                                       capsys):
    lora_model.train()
    reference, _ = lora_gradients(lora_model, step_rows, Plan(2, 0, 0, 2))
    redone, history = lora_gradients(lora_model, step_rows, Plan(4, 0, 0, 2),
                                     oom_when=lambda plan: plan.micro_batch_size == 4)
    assert_same_gradients(redone, reference, rtol=1e-6)   # nothing of the failed attempt is left in them
    assert [entry["plan"]["micro_batch_size"] for entry in history] == [4, 2]
    assert history[1]["reason"] == "step 1 ran out of memory with the plan before"
    assert ("warning: train: step 1 ran out of GPU memory with micro-batch 4 (the whole batch), no recomputation; "
            "redoing it with micro-batch 2 x 2 accumulated, no recomputation") in capsys.readouterr().err


def test_memory_held_for_speed_is_freed_first_and_the_step_redone_on_the_same_plan(lora_model, step_rows, capsys):
    """A step running out of memory beside CUDA graphs' pool: the graphs are dropped (free_memory says so) and the
    step is redone on the same plan, with the same result; with nothing more to free, the next plan."""
    lora_model.train()
    reference, _ = lora_gradients(lora_model, step_rows, Plan(4, 0, 0, 2))
    failures, frees = iter([True]), iter(["dropped its CUDA graphs (off for the rest of the run)"])
    redone, history = lora_gradients(lora_model, step_rows, Plan(4, 0, 0, 2),
                                     oom_when=lambda plan: next(failures, False),
                                     free_memory=lambda: next(frees, None))
    assert_same_gradients(redone, reference, rtol=1e-6)
    assert [entry["plan"]["micro_batch_size"] for entry in history] == [4, 4]
    assert history[1]["reason"] == "step 1 ran out of memory: dropped its CUDA graphs (off for the rest of the run)"
    assert ("warning: train: step 1 ran out of GPU memory with micro-batch 4 (the whole batch), no recomputation; "
            "dropped its CUDA graphs (off for the rest of the run), and redid the step with the same plan"
            ) in capsys.readouterr().err
    failures = iter([True])   # again, with nothing left to free: the next plan
    _, history = lora_gradients(lora_model, step_rows, Plan(4, 0, 0, 2), oom_when=lambda plan: next(failures, False),
                                free_memory=lambda: next(frees, None))
    assert [entry["plan"]["micro_batch_size"] for entry in history] == [4, 2]


def test_running_out_of_memory_with_no_smaller_plan_names_the_fixes(lora_model, step_rows):
    lora_model.train()
    with pytest.raises(PipelineError, match="out of GPU memory at step 1 with micro-batch 1 x 4 accumulated, 2 of 2 "
                                            "decoder layers recomputed, and no plan needs less. Lower "
                                            "tokenize.max_seq_length"):
        lora_gradients(lora_model, step_rows, Plan(4, 0, 0, 2), oom_when=lambda plan: True)


def test_layers_armed_without_unsloths_offloading_offer_no_offload_plan(lora_model):
    """The layers are armed (torch's checkpoint), but no offloading is in place: no plan may call it offloading."""
    from ftpipe.model.training import offload_function

    assert all(getattr(layer, "_gradient_checkpointing_func", None) for layer in decoder_layers(lora_model))
    assert offload_function(lora_model) is None
