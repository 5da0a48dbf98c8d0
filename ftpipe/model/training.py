"""Training QLoRA adapters: the code of a training step and of its batches.

The backend (Unsloth on a CUDA GPU; transformers + peft + bitsandbytes on a GPU without Unsloth, or on the
CPU), the 4-bit base with fresh LoRA adapters (on the layers ftpipe.model.lora resolves), the trainer's
arguments, the batches (one example per row, packed, or padding-free) with their token counts, and the
per-step and whole-run throughput (tokens/s, peak GPU memory, MFU). stages/train.py runs it;
ftpipe.model.checkpoints.fingerprint hashes this file (and lora.py, modeling.py), since what is here changes
a run's numbers.

torch, transformers, peft and Unsloth are imported inside the functions: Unsloth must be imported before
transformers, peft and trl, and only on a GPU.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ftpipe.core.errors import PipelineError
from ftpipe.core.params import TrainParams
from ftpipe.model.gpu import base_parameter_count, bf16_peak_flops, mfu
from ftpipe.model.lora import ALL_LINEAR, LoraTargets, lora_targets
from ftpipe.model.modeling import (
    IGNORE_INDEX,
    bnb_config,
    load_tokenizer,
    pad_batch,
    pad_packed_batch,
    padding_free_batch,
    torch_dtype,
)

# tokens: positions the model computed, padding included; useful_tokens: the real (non-padding) ones.
# mfu: model FLOPs utilization on a GPU with a known peak (ftpipe.model.gpu), else empty.
CURVE_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens", "useful_tokens", "loss_tokens", "seconds",
                 "tokens_per_s", "useful_tokens_per_s", "peak_memory_gib", "mfu")
TOKENS_KEY = "real_tokens"   # the collator's count of a batch's non-padding tokens; the model never sees it


GPU_BACKENDS = ("unsloth", "transformers")   # the backends that train on a CUDA GPU
GPU_EXTRA = 'pip install -e ".[gpu]"'        # pyproject.toml's extra: Unsloth and unsloth-zoo, pinned
# Measured on an H200 with an 8B Llama (bench/gpu_train_bench.py): Unsloth 11,188 tokens/s in 8.05 GiB of GPU
# memory, transformers + peft + bitsandbytes 6,607 tokens/s in 24.65 GiB: 1.7x slower, 3.1x the memory.
WITHOUT_UNSLOTH = (f"warning: Unsloth is not installed: training on the GPU with transformers + peft + bitsandbytes, "
                   f"~1.7x slower and with ~3x the GPU memory (8B model on an H200: 6,607 tokens/s in 24.65 GiB vs "
                   f"11,188 in 8.05 GiB). `{GPU_EXTRA}` installs Unsloth; train.backend: transformers silences this.")


def resolve_backend(requested: str) -> str:
    """train.backend resolved on this machine. auto: "unsloth" on a CUDA GPU with Unsloth installed,
    "transformers" on a CUDA GPU without it (after a warning on stderr), else "cpu". A forced backend this
    machine cannot run is an error naming the fix. Unsloth is looked up (importlib.util.find_spec), never
    imported here: on the CPU it must never be, and on a GPU it must come before transformers."""
    import importlib.util

    import torch  # torch may precede Unsloth; transformers, peft and trl may not

    has_cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "cpu":
        return "cpu"
    if requested in GPU_BACKENDS and not has_cuda:
        raise PipelineError(f"params.yaml train.backend is '{requested}', but no CUDA GPU is visible. "
                            f"Set train.backend: auto (or cpu) to train on the CPU.")
    if requested == "unsloth" and not has_unsloth:
        raise PipelineError(f"params.yaml train.backend is 'unsloth', but Unsloth is not installed. Run `{GPU_EXTRA}`, "
                            f"or set train.backend: transformers (or auto) to train with transformers + peft + "
                            f"bitsandbytes on the GPU, ~1.7x slower.")
    if requested in GPU_BACKENDS:
        return requested
    if not has_cuda:
        return "cpu"
    if has_unsloth:
        return "unsloth"
    print(WITHOUT_UNSLOTH, file=sys.stderr)
    return "transformers"


def load_trainable_model(backend: str, params: TrainParams, base_dir: Path, max_seq_length: int,
                         compute_dtype: str):
    """The 4-bit base with fresh LoRA adapters, ready to train: Unsloth's FastLanguageModel, or transformers +
    peft + bitsandbytes on the GPU ("transformers") or the CPU ("cpu"). The LoRA targets are resolved
    (ftpipe.model.lora) and printed."""
    lora = params.lora
    if backend == "unsloth":
        import unsloth  # noqa: F401 - must be imported before transformers, peft and trl
        from unsloth import FastLanguageModel

        if lora.dropout != 0 or lora.bias != "none":
            print("warning: Unsloth's fused LoRA kernels need train.lora.dropout: 0 and bias: none; "
                  "these params make training slower", file=sys.stderr)
        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(base_dir), max_seq_length=max_seq_length, load_in_4bit=True,
            dtype=torch_dtype(compute_dtype), use_exact_model_name=True,   # a local folder: no hub lookups
            quantization_config=bnb_config(params.quantization, compute_dtype))
        targets = announce(lora_targets(model, lora.target_modules), lora.target_modules)
        return FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
            target_modules=targets.modules, random_state=params.seed,
            use_gradient_checkpointing="unsloth" if params.gradient_checkpointing else False,
            **({"exclude_modules": targets.exclude} if targets.exclude else {}))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=bnb_config(params.quantization, compute_dtype),
        # the whole model on the first GPU (CUDA_VISIBLE_DEVICES picks which): no accelerate offloading
        device_map={"": 0} if backend == "transformers" else "cpu", dtype=torch_dtype(compute_dtype))
    targets = announce(lora_targets(model, lora.target_modules), lora.target_modules)
    if params.gradient_checkpointing:
        # Non-reentrant checkpointing: the reentrant form computes no gradient through a segment whose inputs
        # need none, and the frozen embeddings' output needs none; enable_input_require_grads makes it need one
        # all the same (PEFT's QLoRA recipe does both).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=targets.modules, exclude_modules=targets.exclude, task_type="CAUSAL_LM"))


def announce(targets: LoraTargets, requested: list[str]) -> LoraTargets:
    """Print the layers LoRA goes on ([all-linear] resolved: what it means for this architecture)."""
    print(f"train: LoRA on {', '.join(targets.modules)}"
          + (f" (train.lora.target_modules: [{ALL_LINEAR}])" if requested == [ALL_LINEAR] else "")
          + (f", excluding modules outside the transformer blocks ({targets.exclude})" if targets.exclude else ""))
    return targets


def trained_targets(model) -> list[str]:
    """The LoRA target names the trained adapter holds (its adapter_config.json's target_modules), sorted."""
    targets = model.peft_config["default"].target_modules
    return [targets] if isinstance(targets, str) else sorted(targets)


def training_arguments(params: TrainParams, backend: str, compute_dtype: str, output_dir: Path):
    """The trainer's arguments from the train params: a logged step each, a checkpoint every
    train.checkpoint_every steps into `output_dir`."""
    from transformers import TrainingArguments

    steps = {"max_steps": params.max_steps} if params.max_steps else {"num_train_epochs": params.num_epochs}
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps, learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler, warmup_steps=params.warmup_steps,
        weight_decay=params.weight_decay, max_grad_norm=params.max_grad_norm, seed=params.seed,
        data_seed=params.seed, logging_steps=1, save_strategy="steps", save_steps=params.checkpoint_every,
        # No KV cache while training: with one, transformers no longer derives the block-diagonal mask of
        # packed rows from their position_ids, and attention would cross examples.
        use_cache=False,
        # Mixed precision on a GPU, in the compute dtype; the CPU computes in it through bitsandbytes alone.
        report_to=[], use_cpu=backend == "cpu", bf16=backend in GPU_BACKENDS and compute_dtype == "bfloat16",
        fp16=backend in GPU_BACKENDS and compute_dtype == "float16", remove_unused_columns=False,
        dataloader_num_workers=0, save_only_model=False, **steps)


class TokenCountingCollator:
    """Builds batches and counts the real (non-padding) and loss tokens for throughput figures.

    One example per row: right-padded, with an attention mask. Packed rows (they have position_ids):
    right-padded with position_ids and no attention mask (pad_packed_batch), or, with `padding_free`
    (the Unsloth backend), concatenated into one row (padding_free_batch). The trainer counts each
    batch as it trains on it (count()): the data loader collates one batch ahead, so counting in
    __call__ would credit each step with the next step's batch."""

    def __init__(self, pad_id: int, padding_free: bool):
        self.pad_id = pad_id
        self.padding_free = padding_free
        self.tokens = 0          # positions computed, padding included
        self.useful_tokens = 0   # real tokens
        self.loss_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if "position_ids" not in rows[0]:
            batch = pad_batch(rows, self.pad_id)
        elif self.padding_free:
            batch = padding_free_batch(rows)
        else:
            batch = pad_packed_batch(rows, self.pad_id)
        batch[TOKENS_KEY] = torch.tensor(sum(len(row["input_ids"]) for row in rows))
        return batch

    def count(self, batch: dict) -> dict:
        """Credit this batch's tokens; return the batch without the count, as the model takes it."""
        self.tokens += batch["input_ids"].numel()
        self.useful_tokens += int(batch[TOKENS_KEY])
        self.loss_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return {key: value for key, value in batch.items() if key != TOKENS_KEY}


def make_trainer(model, args, rows: list[dict], collator: TokenCountingCollator, callbacks: list,
                 base_parameters: int):
    """A transformers Trainer that logs each step's token counts and rates (MeasuringTrainer)."""
    import torch
    from transformers import Trainer

    peak_flops = bf16_peak_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None

    class MeasuringTrainer(Trainer):
        """Adds tokens, useful tokens, their rates, peak GPU memory and MFU to each per-step log entry."""
        last_time = time.perf_counter()
        last_counts = (0, 0, 0)

        def training_step(self, model, inputs, *args: Any, **kwargs: Any):
            return super().training_step(model, collator.count(inputs), *args, **kwargs)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()   # the step's kernels are done: the time is the step's
                now = time.perf_counter()
                seconds = now - self.last_time
                counts = (collator.tokens, collator.useful_tokens, collator.loss_tokens)
                logs["tokens"], logs["useful_tokens"], logs["loss_tokens"] = (
                    now_count - last for now_count, last in zip(counts, self.last_counts))
                logs["seconds"] = round(seconds, 4)
                logs["tokens_per_s"] = round(logs["tokens"] / seconds, 1) if seconds > 0 else 0.0
                logs["useful_tokens_per_s"] = round(logs["useful_tokens"] / seconds, 1) if seconds > 0 else 0.0
                if torch.cuda.is_available():
                    logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    logs["mfu"] = mfu(base_parameters, logs["tokens_per_s"], peak_flops)
                self.last_time, self.last_counts = now, counts
            super().log(logs, *args, **kwargs)

    return MeasuringTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                            callbacks=callbacks)



def build_trainer(params: TrainParams, backend: str, compute_dtype: str, base_dir: Path, max_seq_length: int,
                  rows: list[dict], output_dir: Path, callbacks: list) -> tuple[Any, int]:
    """The trainer of a run and the base model's parameter count: the seed set, the 4-bit base with fresh
    LoRA adapters, the batches of `rows` (packed rows go padding-free on Unsloth) and the trainer's
    arguments, checkpointing into `output_dir`. Everything that decides a step's numbers is here."""
    from transformers import set_seed

    pad_id = load_tokenizer(base_dir).pad_token_id
    set_seed(params.seed)
    model = load_trainable_model(backend, params, base_dir, max_seq_length, compute_dtype)
    # Padding-free batches are Unsloth's layout (its varlen attention takes packed_seq_lengths); the transformers
    # backends get packed rows right-padded, the block-diagonal mask built from their position ids.
    collator = TokenCountingCollator(pad_id, padding_free="position_ids" in rows[0] and backend == "unsloth")
    base_parameters = base_parameter_count(base_dir)
    trainer = make_trainer(model, training_arguments(params, backend, compute_dtype, output_dir),
                           rows, collator, callbacks, base_parameters)
    return trainer, base_parameters


def throughput(curve: list[dict], skip_first: int = 1) -> dict:
    """Rates over the timed steps: the first steps are left out (CUDA/Triton warm-up, the first batch
    being collated), unless there are no others."""
    def measured(rows: list[dict]) -> list[dict]:   # steps logged with every count (all, unless a resume)
        return [row for row in rows if row.get("seconds") and row.get("tokens") and row.get("useful_tokens")]

    timed = measured(curve[skip_first:]) or measured(curve)
    if not timed:
        return {}
    seconds = sum(row["seconds"] for row in timed)
    tokens, useful = sum(row["tokens"] for row in timed), sum(row["useful_tokens"] for row in timed)
    rates = {"tokens_per_s": round(tokens / seconds, 1), "useful_tokens_per_s": round(useful / seconds, 1),
             "useful_token_share": round(useful / tokens, 4)}
    peaks = [row["peak_memory_gib"] for row in curve if row.get("peak_memory_gib") is not None]
    if peaks:
        rates["peak_memory_gib"] = max(peaks)
    mfus = [row["mfu"] for row in timed if row.get("mfu") is not None]
    if mfus:
        rates["mfu"] = round(sum(row["mfu"] * row["seconds"] for row in timed if row.get("mfu") is not None)
                             / sum(row["seconds"] for row in timed if row.get("mfu") is not None), 4)
    return rates

