"""The training plan: how a step of train.batch_size rows runs on this machine's memory.

A plan is a micro-batch size (rows per forward and backward pass; a step sums the gradients of its
micro-batches, so its numbers are those of the whole batch whatever the split) and, per decoder layer, what
happens to its activations between the forward and the backward pass:
  keep       kept on the GPU (fastest: nothing is computed twice)
  recompute  dropped; the layer's input is kept on the GPU and the layer recomputed in the backward pass
             (PyTorch's non-reentrant checkpoint)
  offload    dropped; the input goes to host RAM and the layer is recomputed (Unsloth's offloaded
             checkpointing; the Unsloth backend only)

train.gradient_checkpointing: auto picks the fastest plan predicted to fit in the GPU's free memory with a
safety margin, from a memory model fitted on three probe steps (MemoryModel.fit) and a speed model
(predicted_speed); on, unsloth and off fix every layer's mode and leave the micro-batch to choose.
train.micro_batch_size fixes the micro-batch, or leaves it (auto) to choose. A step that still runs out of
memory is redone on the next plan (PlannedSteps): the fastest one predicted to need less memory.

Written here: Unsloth always checkpoints every layer (its "auto" skip planner un-checkpoints layers only
after a first step at the full batch, which must fit first), transformers and PEFT turn checkpointing on
for all layers or none, and accelerate's find_executable_batch_size halves the batch after an error
without any memory model, changing the numbers of the step.

torch is imported inside the functions, as everywhere in ftpipe.model.
"""
from __future__ import annotations

import functools
import gc
import math
import operator
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from ftpipe.core.errors import PipelineError
from ftpipe.model.distributed import world_size

KEEP, RECOMPUTE, OFFLOAD = "keep", "recompute", "offload"
# Speed model (predicted_speed), fitted on one H200 with an 8B Llama, sequence length 2048, Unsloth:
# - PER_MICRO_BATCH_TOKENS: a micro-batch's fixed cost (the NF4 weights dequantized in the forward and the
#   backward pass, kernel launches) in tokens' worth of time: 14,993 tokens/s at 2 rows a micro-batch and
#   15,806 at 4 give 1 + 470/4096 : 1 + 470/8192; rounded up to 512.
# - RECOMPUTE_COST: recomputing every layer adds its forward pass, about a third of a step's time
#   (forward 1, backward 2); 0.35 for the layer inputs' bookkeeping.
# - OFFLOAD_COST: the copies to and from host RAM on top of that: 15,806 tokens/s without checkpointing,
#   11,188 with Unsloth's offloaded checkpointing at 4 rows, 1.41x, so 0.41 - 0.35 = 0.06.
PER_MICRO_BATCH_TOKENS = 512
RECOMPUTE_COST = 0.35
OFFLOAD_COST = 0.06
# The share of the free GPU memory a plan may be predicted to take, and what is kept out besides (the
# allocator's rounding and fragmentation, cuBLAS workspaces, kernels loaded later). A plan that still does
# not fit costs one redone step (PlannedSteps).
MEMORY_SHARE = 0.9
RESERVED_BYTES = 2**30 // 2
# Host RAM offloaded layer inputs may take: Unsloth pins it, and the rest of the machine needs some.
HOST_SHARE = 0.6
ADAM_STATE_BYTES = 8   # AdamW's two float32 moments per trainable parameter, allocated at the first step


@dataclass(frozen=True)
class Plan:
    micro_batch_size: int   # rows per forward/backward pass
    recomputed: int         # decoder layers recomputed from inputs kept on the GPU
    offloaded: int          # decoder layers recomputed from inputs offloaded to host RAM (Unsloth)
    layers: int             # decoder layers of the model

    @property
    def kept(self) -> int:
        return self.layers - self.recomputed - self.offloaded

    def layer_modes(self) -> list[str]:
        """Each decoder layer's mode, first layer first: the first ones offloaded (their inputs are needed
        last in the backward pass, so the copy back has the most time), then recomputed, then kept."""
        return [OFFLOAD] * self.offloaded + [RECOMPUTE] * self.recomputed + [KEEP] * self.kept

    def accumulation(self, batch_size: int) -> int:
        return math.ceil(batch_size / self.micro_batch_size)

    def describe(self, batch_size: int) -> str:
        steps = self.accumulation(batch_size)
        split = (f"micro-batch {self.micro_batch_size} x {steps} accumulated" if steps > 1
                 else f"micro-batch {self.micro_batch_size} (the whole batch)")
        if self.kept == self.layers:
            saving = "no recomputation"
        else:
            parts = [f"{count} of {self.layers} decoder layers {what}" for count, what in
                     ((self.recomputed, "recomputed"), (self.offloaded, "offloaded to host RAM and recomputed"))
                     if count]
            saving = ", ".join(parts)
        return f"{split}, {saving}"

    def as_dict(self, batch_size: int) -> dict:
        return {**asdict(self), "kept": self.kept, "gradient_accumulation": self.accumulation(batch_size)}


def micro_batch_sizes(batch_size: int, requested: int | str) -> list[int]:
    """The micro-batch sizes to consider, largest first: the one requested, or (auto) every divisor of the batch
    (equal micro-batches: one shape for compiled kernels) and the powers of two below it."""
    if requested != "auto":
        return [int(requested)]
    sizes = {size for size in range(1, batch_size + 1) if batch_size % size == 0}
    sizes |= {2**k for k in range(batch_size.bit_length()) if 2**k <= batch_size}
    return sorted(sizes, reverse=True)


def checkpoint_levels(mode: str, layers: int, can_offload: bool) -> list[tuple[int, int]]:
    """(recomputed, offloaded) layer counts a train.gradient_checkpointing mode allows."""
    if mode == "off":
        return [(0, 0)]
    if mode == "on":
        return [(layers, 0)]
    if mode == "unsloth":
        return [(0, layers)]
    levels = [(recomputed, 0) for recomputed in range(layers + 1)]
    if can_offload:   # the layer inputs move to host RAM one layer at a time, the rest recomputed on the GPU
        levels += [(layers - offloaded, offloaded) for offloaded in range(1, layers + 1)]
    return levels


def candidate_plans(batch_size: int, micro_batch_size: int | str, mode: str, layers: int,
                    can_offload: bool) -> list[Plan]:
    return [Plan(micro, recomputed, offloaded, layers) for micro in micro_batch_sizes(batch_size, micro_batch_size)
            for recomputed, offloaded in checkpoint_levels(mode, layers, can_offload)]


def predicted_speed(plan: Plan, tokens_per_row: int) -> float:
    """Tokens per second relative to a plan with no recomputation and micro-batches of unbounded size."""
    recomputed_share = (plan.recomputed + plan.offloaded) / plan.layers if plan.layers else 0.0
    offloaded_share = plan.offloaded / plan.layers if plan.layers else 0.0
    return 1.0 / (1.0 + PER_MICRO_BATCH_TOKENS / (plan.micro_batch_size * tokens_per_row)
                  + RECOMPUTE_COST * recomputed_share + OFFLOAD_COST * offloaded_share)


@dataclass(frozen=True)
class MemoryModel:
    """GPU bytes a training step takes on top of the resident model, from the tokens of a micro-batch:
    step_fixed + tokens x (kept layers x keep_per_token + recomputed layers x input_per_token
    + [any layer checkpointed] x transient_per_token + [any layer offloaded] x offload_per_token
    + other_per_token).
    A checkpointed layer keeps only its input (hidden size x dtype bytes: input_per_token, exact); the layer
    being recomputed holds a kept layer's activations for a moment, and an offloaded input's staging buffer
    (transient_per_token = keep_per_token + input_per_token); other_per_token is the embeddings, the final
    norm, the logits and the loss. Unsloth's offloaded checkpointing keeps buffers of its own on the GPU
    (copies in flight, the backward pass's double buffer): offload_per_token, measured by a fourth probe
    (on an H200, 8B Llama: 32 KiB per token, four layer inputs' worth, whatever the number offloaded)."""
    step_fixed: float
    keep_per_token: float
    input_per_token: float
    transient_per_token: float
    other_per_token: float
    offload_per_token: float = 0.0

    def step_bytes(self, plan: Plan, tokens: int) -> float:
        per_token = self.other_per_token + plan.recomputed * self.input_per_token
        if plan.kept:
            per_token += plan.kept * self.keep_per_token
        if plan.kept < plan.layers:
            per_token += self.transient_per_token
        if plan.offloaded:
            per_token += self.offload_per_token
        return self.step_fixed + tokens * per_token

    def host_bytes(self, plan: Plan, tokens: int) -> float:
        return plan.offloaded * self.input_per_token * tokens

    def fits_host(self, plan: Plan, tokens_per_row: int, host_budget_bytes: float) -> bool:
        """Whether the plan's offloaded layer inputs fit `host_budget_bytes` of host RAM."""
        return self.host_bytes(plan, plan.micro_batch_size * tokens_per_row) <= host_budget_bytes

    @classmethod
    def fit(cls, layers: int, tokens: int, keep: float | None, recompute: float, recompute_double: float,
            input_per_token: float, fixed_extra: float = 0.0, offload: float | None = None) -> "MemoryModel":
        """From the probe steps' peak bytes: every layer kept at `tokens` (None: it ran out of memory), every
        layer recomputed at `tokens` and at 2 x `tokens`, and (where offloading is possible) every layer
        offloaded at `tokens`. The two recompute probes give the per-token cost of that plan and the fixed
        part; the keep probe then gives a kept layer's activations per token, the offload probe what offloading
        keeps on the GPU besides. `fixed_extra` is what a probe does not allocate (the optimizer's state)."""
        recompute_per_token = max((recompute_double - recompute) / tokens, 0.0)
        fixed = max(recompute - tokens * recompute_per_token, 0.0)
        beyond_inputs = max(recompute_per_token - layers * input_per_token, 0.0)   # transient + other
        # offloading every layer keeps no input on the GPU: what it takes beyond transient + other is its own
        offload_per_token = max((offload - fixed) / tokens - beyond_inputs, 0.0) if offload is not None else 0.0
        if keep is None:   # not even one row with every layer kept: no plan keeping layers is considered
            return cls(step_fixed=fixed + fixed_extra, keep_per_token=float("inf"), input_per_token=input_per_token,
                       transient_per_token=0.0, other_per_token=beyond_inputs, offload_per_token=offload_per_token)
        keep_total = (keep - fixed) / tokens   # L*a + c, with recompute_per_token = L*b + (a + b) + c
        if layers > 1:
            keep_per_token = (keep_total - recompute_per_token + (layers + 1) * input_per_token) / (layers - 1)
        else:
            keep_per_token = keep_total
        keep_per_token = min(max(keep_per_token, input_per_token), keep_total / layers)   # a >= b, c >= 0
        transient = min(keep_per_token + input_per_token, beyond_inputs)
        return cls(step_fixed=fixed + fixed_extra, keep_per_token=keep_per_token, input_per_token=input_per_token,
                   transient_per_token=transient, other_per_token=beyond_inputs - transient,
                   offload_per_token=offload_per_token)


@dataclass(frozen=True)
class Choice:
    plan: Plan
    reason: str
    predicted_bytes: float | None = None
    budget_bytes: float | None = None


def choose_plan(candidates: Sequence[Plan], memory: MemoryModel, budget_bytes: float, tokens_per_row: int,
                batch_size: int, host_budget_bytes: float = float("inf")) -> Choice:
    """The fastest candidate predicted to fit `budget_bytes` (and host RAM for offloaded inputs); when none is,
    the one needing the least memory, with a warning (its steps will show whether it fits)."""
    def needs(plan: Plan) -> float:
        return memory.step_bytes(plan, plan.micro_batch_size * tokens_per_row)

    fitting = [plan for plan in candidates if needs(plan) <= budget_bytes
               and memory.fits_host(plan, tokens_per_row, host_budget_bytes)]
    gib = 2**30
    if not fitting:
        plan = min(candidates, key=needs)
        return Choice(plan, f"no plan is predicted to fit {budget_bytes / gib:.1f} GiB; trying the smallest, "
                            f"{plan.describe(batch_size)} ({needs(plan) / gib:.1f} GiB predicted)",
                      needs(plan), budget_bytes)
    plan = max(fitting, key=lambda plan: (predicted_speed(plan, tokens_per_row), -needs(plan)))
    return Choice(plan, f"the fastest of {len(fitting)} plans predicted to fit: {needs(plan) / gib:.1f} GiB "
                        f"predicted of {budget_bytes / gib:.1f} GiB usable", needs(plan), budget_bytes)


def next_plan(failed: Plan, candidates: Sequence[Plan], memory: MemoryModel | None, tokens_per_row: int,
              host_budget_bytes: float = float("inf")) -> Plan | None:
    """After `failed` ran out of memory: the fastest candidate predicted to need less GPU memory (and to fit the
    host RAM its offloaded inputs take), or None. Without a memory model: the next smaller micro-batch with the
    same checkpointing, else one more checkpointed layer."""
    if memory is not None:
        def needs(plan: Plan) -> float:
            return memory.step_bytes(plan, plan.micro_batch_size * tokens_per_row)

        smaller = [plan for plan in candidates if needs(plan) < needs(failed)
                   and memory.fits_host(plan, tokens_per_row, host_budget_bytes)]
        return max(smaller, key=lambda plan: (predicted_speed(plan, tokens_per_row), -needs(plan)), default=None)
    level = (failed.recomputed, failed.offloaded)
    same_level = [plan for plan in candidates if (plan.recomputed, plan.offloaded) == level
                  and plan.micro_batch_size < failed.micro_batch_size]
    if same_level:
        return max(same_level, key=lambda plan: plan.micro_batch_size)
    more_checkpointed = [plan for plan in candidates if plan.micro_batch_size == failed.micro_batch_size
                         and (plan.kept, -plan.offloaded) < (failed.kept, -failed.offloaded)]
    return max(more_checkpointed, key=lambda plan: (plan.kept, -plan.offloaded), default=None)


# --- applying a plan to a model ---------------------------------------------------------------------------

def decoder_layers(model) -> list:
    """The model's decoder layers: transformers' GradientCheckpointingLayer modules, each with its own
    gradient_checkpointing switch (Unsloth keeps them)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def recompute_function() -> Callable:
    """PyTorch's own non-reentrant checkpoint. Unsloth replaces torch.utils.checkpoint.checkpoint with its
    offloading one when loaded with offloading; it keeps the original as _unsloth_pristine_checkpoint."""
    import torch.utils.checkpoint as checkpoint

    original = getattr(checkpoint, "_unsloth_pristine_checkpoint", None) or PRISTINE_CHECKPOINT
    return functools.partial(original, use_reentrant=False)


def _pristine_checkpoint():
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint


PRISTINE_CHECKPOINT = _pristine_checkpoint()   # at import, before Unsloth (imported later, on a GPU) patches it


def apply_plan(model, plan: Plan, offload_function: Callable | None = None) -> None:
    """Set each decoder layer's checkpointing to the plan's mode for it."""
    layers = decoder_layers(model)
    if len(layers) != plan.layers:
        raise PipelineError(f"train: the plan is for {plan.layers} decoder layers, the model has {len(layers)}")
    if plan.offloaded and offload_function is None:
        raise PipelineError("train: offloaded checkpointing needs Unsloth (train.backend: unsloth)")
    recompute = recompute_function()
    for layer, mode in zip(layers, plan.layer_modes()):
        if mode == KEEP:
            layer.gradient_checkpointing = False
        else:
            layer._gradient_checkpointing_func = recompute if mode == RECOMPUTE else offload_function
            layer.gradient_checkpointing = True


# --- the steps ----------------------------------------------------------------------------------------------

def split_rows(rows: Sequence[dict], micro_batch_size: int) -> list[Sequence[dict]]:
    return [rows[start:start + micro_batch_size] for start in range(0, len(rows), micro_batch_size)]


class PlannedSteps:
    """Runs each training step as the plan's micro-batches; a step that runs out of GPU memory is redone from
    its start on the next plan (next_plan), with the random state it started with, so nothing is lost and the
    step's numbers are those it would have had. The plans taken are kept in `history`."""

    def __init__(self, model, choice: Choice, candidates: Sequence[Plan], memory: MemoryModel | None,
                 tokens_per_row: int, batch_size: int, offload_function: Callable | None = None,
                 probe: dict | None = None, host_budget_bytes: float = float("inf")):
        self.model, self.candidates, self.memory = model, list(candidates), memory
        self.host_budget_bytes = host_budget_bytes   # host RAM offloaded inputs may take (a fallback's too)
        self.tokens_per_row, self.batch_size, self.offload_function = tokens_per_row, batch_size, offload_function
        self.probe = probe   # what the memory probe measured (ftpipe.model.memory_probe), when it ran
        self.plan = choice.plan
        self.distributed = world_size() > 1   # under DDP a step cannot be redone on one process alone
        self.history: list[dict] = [{"step": 0, "plan": choice.plan.as_dict(batch_size), "reason": choice.reason}]
        # Called when a step runs out of memory, before any fallback: frees memory held for speed (CUDA graphs'
        # pool) and says what it freed, the step then redone on the same plan; or None when it held none.
        self.free_memory: Callable[[], str | None] | None = None
        apply_plan(model, self.plan, offload_function)

    def run(self, rows: Sequence[dict], micro_step: Callable[[Sequence[dict], float, bool], Any], step: int):
        """micro_step(micro_rows, share, last) runs forward and backward on some rows (share: their part of the
        step's loss tokens; last: the step's last micro-batch) and returns the detached loss it added; returns the
        step's loss. Under DDP a step that runs out of memory on one process cannot be redone on it alone (the
        others wait in the gradients' exchange): it stops the run, which resumes from its last checkpoint."""
        import torch

        total = sum(loss_token_count(row) for row in rows) or 1
        rng = _rng_state()
        while True:
            try:
                loss = None
                micro_batches = split_rows(rows, self.plan.micro_batch_size)
                for index, micro_rows in enumerate(micro_batches):
                    added = micro_step(micro_rows, sum(loss_token_count(row) for row in micro_rows) / total,
                                       index == len(micro_batches) - 1)
                    loss = added if loss is None else loss + added
                return loss
            except torch.OutOfMemoryError:
                if self.distributed:
                    raise
                # handled outside the except block: its traceback holds the failed step's tensors
            self._fall_back(step)
            _restore_rng(rng)

    def _fall_back(self, step: int) -> None:
        import torch

        self.model.zero_grad(set_to_none=True)   # the failed step's partial gradients
        gc.collect()
        freed = self.free_memory() if self.free_memory is not None else None
        torch.cuda.empty_cache()
        failed = self.plan
        if freed is not None:
            print(f"warning: train: step {step} ran out of GPU memory with {failed.describe(self.batch_size)}; "
                  f"{freed}, and redid the step with the same plan", file=sys.stderr, flush=True)
            self.history.append({"step": step, "plan": failed.as_dict(self.batch_size),
                                 "reason": f"step {step} ran out of memory: {freed}"})
            return
        plan = next_plan(failed, self.candidates, self.memory, self.tokens_per_row, self.host_budget_bytes)
        if plan is None:
            raise PipelineError(
                f"train: out of GPU memory at step {step} with {failed.describe(self.batch_size)}, and no plan needs "
                f"less. Lower tokenize.max_seq_length, set train.gradient_checkpointing: auto (or unsloth) and "
                f"train.micro_batch_size: auto, or free the GPU of other processes.")
        print(f"warning: train: step {step} ran out of GPU memory with {failed.describe(self.batch_size)}; "
              f"redoing it with {plan.describe(self.batch_size)}", file=sys.stderr, flush=True)
        self.plan = plan
        self.history.append({"step": step, "plan": plan.as_dict(self.batch_size),
                             "reason": f"step {step} ran out of memory with the plan before"})
        apply_plan(self.model, plan, self.offload_function)


def loss_token_count(row: dict) -> int:
    """Positions of a row whose next token is a target (labels shifted by one, as the loss reads them). Counted in C
    (operator.countOf): the trainer counts a step's rows on the host between two steps."""
    labels = row["labels"]
    return max(len(labels) - 1 - operator.countOf(labels[1:], -100), 0)


def _rng_state() -> dict:
    import torch

    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _restore_rng(state: dict) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
