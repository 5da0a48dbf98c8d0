"""Measuring what a training step needs on this GPU, to choose the plan (ftpipe/model/training_plan.py).

Three probe steps (forward and backward on random tokens, in the trainer's batch layout, no optimizer step):
one row of max_seq_length tokens with every decoder layer kept, the same with every layer recomputed, and two
rows with every layer recomputed; a fourth where layers can be offloaded (Unsloth): one row with every layer
offloaded, for the buffers offloading keeps on the GPU. Packed rows hold examples of the lengths of the data's
busiest rows (busiest_layouts). Their peak memory above the resident model fits
MemoryModel; a probe that runs out of memory is recorded as such. The probes leave no trace: gradients are
cleared and the random state restored, so a run's numbers are those it has without them.

torch is imported inside the functions, as everywhere in ftpipe.model.
"""
from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Callable, Sequence

from ftpipe.model.training_plan import (
    ADAM_STATE_BYTES,
    HOST_SHARE,
    MEMORY_SHARE,
    RESERVED_BYTES,
    MemoryModel,
    Plan,
    apply_plan,
    decoder_layers,
)


def usable_gpu_bytes() -> float:
    """What a training step may take on the current GPU: the free memory (the driver's, plus what PyTorch holds
    cached but unused), capped by torch.cuda.set_per_process_memory_fraction where a cap is set, times
    MEMORY_SHARE, less RESERVED_BYTES."""
    import torch

    free, total = torch.cuda.mem_get_info()
    allocated = torch.cuda.memory_allocated()
    free += torch.cuda.memory_reserved() - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    free = min(free, fraction * total - allocated)
    return max(free * MEMORY_SHARE - RESERVED_BYTES, 0.0)


def usable_host_bytes() -> float:
    """Host RAM offloaded layer inputs may take: HOST_SHARE of what is available now (Linux's MemAvailable;
    unbounded where /proc/meminfo is missing)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return float("inf")
    available = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    return available * HOST_SHARE


def input_bytes_per_token(model) -> int:
    """A decoder layer's input, per token: hidden size x the activations' bytes (bf16 or fp16: 2)."""
    from ftpipe.model.batch_memory import text_config

    return text_config(model.config).hidden_size * 2


def probe_step_bytes(model, collate: Callable[[list[dict]], dict], rows: list[dict], dtype) -> float | None:
    """Peak GPU bytes one forward and backward pass over `rows` takes above what was allocated before, or None
    when it runs out of memory. Gradients are cleared after."""
    import torch

    batch = {key: value.to("cuda") for key, value in collate(rows).items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    peak = None
    try:
        with torch.autocast("cuda", dtype=dtype):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    except torch.OutOfMemoryError:
        pass
    loss = batch = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return peak


# Packed rows whose examples' lengths the probe copies: the first ones of the data set (reading every row's
# positions would take long on a large one)
LAYOUT_SAMPLE_ROWS = 512


def busiest_layouts(rows: Sequence[dict], count: int = 2) -> list[list[int]]:
    """The examples' lengths of the `count` packed rows holding the most examples (of the first
    LAYOUT_SAMPLE_ROWS): the probe's rows take their layout. Unsloth runs padding-free attention per example,
    and rows of many examples take more memory than rows of one (8B, micro-batch 8 on an H200: 71.6 GiB above
    the model for the default data set packed, 60.2 for rows of one example; bench/results/gpu_train_plan.json)."""
    def lengths(positions) -> list[int]:
        starts = [index for index, position in enumerate(positions) if position == 0] or [0]
        return [end - start for start, end in zip(starts, [*starts[1:], len(positions)])]

    layouts = [lengths(row["position_ids"]) for row in rows[:LAYOUT_SAMPLE_ROWS]]
    return sorted(layouts, key=len, reverse=True)[:count]


def layout_positions(lengths: Sequence[int], tokens: int) -> list[int]:
    """Position ids of a row of exactly `tokens` tokens holding examples of `lengths`, repeated as needed (the
    last one cut short)."""
    positions: list[int] = []
    while len(positions) < tokens:
        for length in lengths:
            positions += range(length)
    return positions[:tokens]


def random_rows(count: int, tokens: int, vocab_size: int, packed: bool, seed: int = 0,
                layouts: Sequence[Sequence[int]] | None = None) -> list[dict]:
    """Rows of random token ids (every position a target), shaped as the trainer's rows: packed rows hold one
    example each, or examples of the lengths of `layouts` (one per row, in turn)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        ids = torch.randint(0, vocab_size, (tokens,), generator=generator).tolist()
        row = {"input_ids": ids, "labels": ids}
        if packed:
            row["position_ids"] = layout_positions(layouts[index % len(layouts)] if layouts else [tokens], tokens)
        rows.append(row)
    return rows


# Unsloth marks a model that ran forward and backward before trainer.train() and, when training starts, drops the
# kernels torch.compile built for it, warning that the run was "poisoned" and asking for the probe under no_grad
# (where it could not measure the backward pass). Dropping them is right here too (the probes' shapes are not
# training's), so the warning would only alarm: it is silenced once the probes ran.
UNSLOTH_PROBE_WARNING = r"Unsloth: detected a manual forward/backward run before trainer\.train\(\)"


def silence_unsloth_probe_warning() -> None:
    warnings.filterwarnings("ignore", message=UNSLOTH_PROBE_WARNING)


def offload_bytes(measured: dict) -> float | None:
    """The offload probe's peak for MemoryModel.fit: None where it did not run, infinite where it ran out of
    memory (no plan offloading layers is then considered)."""
    if "offload" not in measured:
        return None
    return float("inf") if measured["offload"] is None else measured["offload"]


def probe_memory(model, collate: Callable[[list[dict]], dict], max_seq_length: int, packed: bool, dtype,
                 trainable_parameters: int, offload_function: Callable | None = None,
                 layouts: Sequence[Sequence[int]] | None = None) -> tuple[MemoryModel | None, dict]:
    """The memory model of this model on this GPU from the probe steps (module docstring; the offload probe
    where `offload_function` is given; packed rows laid out as `layouts`, busiest_layouts of the data), and what
    was measured. None when even one row with every layer recomputed does not fit."""
    import torch

    layers = len(decoder_layers(model))
    vocab_size = model.get_input_embeddings().weight.shape[0]
    model.train()   # checkpointing runs in training mode only
    probes = [("recompute", Plan(1, layers, 0, layers)), ("recompute_double", Plan(2, layers, 0, layers)),
              ("keep", Plan(1, 0, 0, layers))]
    if offload_function is not None:
        probes.append(("offload", Plan(1, 0, layers, layers)))
    measured = {}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        for name, plan in probes:
            apply_plan(model, plan, offload_function)
            rows = random_rows(plan.micro_batch_size, max_seq_length, vocab_size, packed, layouts=layouts)
            measured[name] = probe_step_bytes(model, collate, rows, dtype)
    silence_unsloth_probe_warning()
    record = {"tokens_per_row": max_seq_length, "layers": layers,
              "examples_per_row": [len(layout) for layout in layouts] if packed and layouts else 1 if packed else None,
              **{f"{name}_step_gib": round(value / 2**30, 3) if value is not None else None
                 for name, value in measured.items()}}
    if measured["recompute"] is None or measured["recompute_double"] is None:
        return None, record
    memory = MemoryModel.fit(layers, max_seq_length, measured["keep"], measured["recompute"],
                             measured["recompute_double"], input_bytes_per_token(model),
                             fixed_extra=ADAM_STATE_BYTES * trainable_parameters, offload=offload_bytes(measured))
    record["model_kib_per_token"] = {"kept_layer": round(memory.keep_per_token / 1024, 1),
                                     "layer_input": round(memory.input_per_token / 1024, 1),
                                     "outside_layers": round(memory.other_per_token / 1024, 1),
                                     "offload_buffers": round(memory.offload_per_token / 1024, 1)}
    record["model_fixed_gib"] = round(memory.step_fixed / 2**30, 3)
    return memory, record
