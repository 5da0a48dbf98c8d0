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

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from ftpipe.core.errors import PipelineError
from ftpipe.core.params import TrainParams
from ftpipe.model.cuda_graphs import BackboneGraphs, to_gpu_without_waiting
from ftpipe.model.distributed import gather, per_process_rows, under_launcher, world_size
from ftpipe.model.gpu import base_parameter_count, bf16_peak_flops, mfu
from ftpipe.model.lora import ALL_LINEAR, LoraTargets, lora_targets
from ftpipe.model.memory_probe import busiest_layouts, probe_memory, usable_gpu_bytes, usable_host_bytes
from ftpipe.model.modeling import (
    IGNORE_INDEX,
    bnb_config,
    load_tokenizer,
    pad_batch,
    pad_packed_batch,
    padding_free_batch,
    torch_dtype,
)
from ftpipe.model.step_figures import StepFigures
from ftpipe.model.training_plan import Choice, Plan, PlannedSteps, candidate_plans, choose_plan, decoder_layers

# tokens: positions the model computed, padding included; useful_tokens: the real (non-padding) ones.
# mfu: model FLOPs utilization on a GPU with a known peak (ftpipe.model.gpu), else empty.
CURVE_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens", "useful_tokens", "loss_tokens", "seconds",
                 "tokens_per_s", "useful_tokens_per_s", "peak_memory_gib", "mfu")


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
            device_map={"": local_device()},   # under DDP, each rank's own GPU
            dtype=torch_dtype(compute_dtype), use_exact_model_name=True,   # a local folder: no hub lookups
            quantization_config=bnb_config(params.quantization, compute_dtype))
        targets = announce(lora_targets(model, lora.target_modules), lora.target_modules)
        return FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
            target_modules=targets.modules, random_state=params.seed,
            # Offloading armed on every layer; the plan (ftpipe/model/training_plan.py) then sets each layer's mode
            use_gradient_checkpointing=False if params.gradient_checkpointing == "off" else "unsloth",
            **({"exclude_modules": targets.exclude} if targets.exclude else {}))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=bnb_config(params.quantization, compute_dtype),
        # the whole model on one GPU (the first visible one; under DDP the rank's own): no accelerate offloading
        device_map={"": local_device()} if backend == "transformers" else "cpu", dtype=torch_dtype(compute_dtype))
    targets = announce(lora_targets(model, lora.target_modules), lora.target_modules)
    if params.gradient_checkpointing != "off":   # armed on every layer; the plan sets each layer's mode
        # Non-reentrant checkpointing: the reentrant form computes no gradient through a segment whose inputs
        # need none, and the frozen embeddings' output needs none; enable_input_require_grads makes it need one
        # all the same (PEFT's QLoRA recipe does both).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=targets.modules, exclude_modules=targets.exclude, task_type="CAUSAL_LM"))


def local_device() -> int:
    """The GPU index this process trains on: its rank's on this host under DDP (torchrun's LOCAL_RANK), else 0
    (the first visible GPU)."""
    import torch

    index = int(os.environ.get("LOCAL_RANK", "0")) if under_launcher() else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(index)
    return index


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
        # The loader gives a whole step's rows (this process's share of them under DDP); the trainer splits them
        # into the plan's micro-batches
        output_dir=str(output_dir), per_device_train_batch_size=per_process_rows(params.batch_size, world_size()),
        # every LoRA weight takes part in every step: DDP need not search the graph for unused ones
        ddp_find_unused_parameters=False,
        gradient_accumulation_steps=1, learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler, warmup_steps=params.warmup_steps,
        weight_decay=params.weight_decay, max_grad_norm=params.max_grad_norm, seed=params.seed,
        data_seed=params.seed, logging_steps=1, save_strategy="steps", save_steps=params.checkpoint_every,
        # No KV cache while training: with one, transformers no longer derives the block-diagonal mask of
        # packed rows from their position_ids, and attention would cross examples.
        use_cache=False,
        # Mixed precision on a GPU, in the compute dtype; the CPU computes in it through bitsandbytes alone.
        report_to=[], use_cpu=backend == "cpu", bf16=backend in GPU_BACKENDS and compute_dtype == "bfloat16",
        fp16=backend in GPU_BACKENDS and compute_dtype == "float16", remove_unused_columns=False,
        dataloader_num_workers=0, save_only_model=False,
        # Nothing between two steps waits for the GPU (ftpipe/model/step_figures.py says why): the loader's batch
        # is copied from pinned memory without waiting, and the loss is not read after each step to filter out a
        # NaN or infinite one (such a loss is logged as it is, which is what a review should see)
        dataloader_pin_memory=True, accelerator_config={"non_blocking": True}, logging_nan_inf_filter=False,
        **steps)


ROWS_KEY = "step_rows"   # a step's rows, which the trainer splits into the plan's micro-batches
# Padding-free rows are rounded up to a multiple of this many tokens (a filler example without targets): a
# step's concatenated rows then take a few lengths instead of a new one nearly every step. On variable-length
# data the stage ran at 0.95x a loop that saw each length before, new lengths recompiling Unsloth's kernels
# (issue 17; bench/gpu_train_plan.py's variable-length jobs measure the effect). 128 positions cost 0.8% more
# computed tokens on average at 4 rows of 2048.
PADDING_FREE_MULTIPLE = 128


def are_packed(rows: list[dict]) -> bool:
    """Whether the tokenize stage packed these rows (tokenize.packing: several examples a row, each with its own
    position ids)."""
    return "position_ids" in rows[0]


class StepRows:
    """A step's rows, carried through the trainer's batch untouched (not a list or a mapping, which accelerate
    would walk to move to the GPU)."""
    __slots__ = ("rows",)

    def __init__(self, rows: list[dict]):
        self.rows = rows


class TokenCountingCollator:
    """Builds batches and counts the real (non-padding) and loss tokens for throughput figures.

    One example per row: right-padded, with an attention mask. Packed rows (they have position_ids):
    right-padded with position_ids and no attention mask (pad_packed_batch), or, with `padding_free`
    (the Unsloth backend), concatenated into one row (padding_free_batch). A step's batch carries its rows
    (ROWS_KEY): the trainer collates each micro-batch of the plan from them (collate()). The trainer counts
    each batch as it trains on it (count()): the data loader collates one batch ahead, so counting in
    __call__ would credit each step with the next step's batch."""

    def __init__(self, pad_id: int, padding_free: bool):
        self.pad_id = pad_id
        self.padding_free = padding_free
        self.tokens = 0          # positions computed, padding included
        self.useful_tokens = 0   # real tokens
        self.loss_tokens = 0

    def collate(self, rows: list[dict]) -> dict:
        if not are_packed(rows):
            return pad_batch(rows, self.pad_id)
        if self.padding_free:
            return padding_free_batch(rows, PADDING_FREE_MULTIPLE, self.pad_id)
        return pad_packed_batch(rows, self.pad_id)

    def __call__(self, rows: list[dict]) -> dict:
        """What the trainer's loader yields for a step: its rows, and the labels from which the trainer counts the
        step's targets (num_items_in_batch)."""
        return {"labels": self.collate(rows)["labels"], ROWS_KEY: StepRows(rows)}

    def count(self, micro_batch: dict, rows: list[dict]) -> None:
        """Credit a micro-batch's tokens as it is trained on."""
        self.tokens += micro_batch["input_ids"].numel()
        self.useful_tokens += sum(len(row["input_ids"]) for row in rows)
        self.loss_tokens += int((micro_batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def make_trainer(model, args, rows: list[dict], collator: TokenCountingCollator, callbacks: list,
                 base_parameters: int, planner: PlannedSteps, graphs: BackboneGraphs | None = None):
    """A transformers Trainer that runs each step as the plan's micro-batches (`planner`), replaying the model's
    body as CUDA graphs where a pass can be (`graphs`, when given), and logs each step's token counts and rates
    (MeasuringTrainer)."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import nested_gather

    peak_flops = bf16_peak_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None

    class MeasuringTrainer(Trainer):
        """Adds tokens, useful tokens, their rates, peak GPU memory and MFU to each per-step log entry, and logs a
        step once the next step's first micro-batch is queued (ftpipe/model/step_figures.py: the GPU never waits
        for the host's logging)."""
        step_began: StepFigures | None = None   # where the step being timed began: the last step's end
        unlogged: dict | None = None            # the last step's figures, not logged yet
        counted = (0, 0, 0)                     # the collator's counts when the last step ended

        def training_step(self, model, inputs, num_items_in_batch=None):
            """The step's rows as the plan's micro-batches, each a forward and backward pass of the trainer's own
            training_step: with num_items_in_batch (the whole step's target count) each adds its sum of token
            losses over that count, so the step's gradient is the whole batch's; for a model that takes no such
            count, its mean loss weighted by its share of the targets."""
            micro_batch_step = super().training_step
            by_count = num_items_in_batch is not None and self.model_accepts_loss_kwargs
            if self.step_began is None:
                self.step_began = StepFigures({}, self.args.device)

            def forward_backward(micro_rows: list[dict], share: float, last: bool):
                batch = collator.collate(micro_rows)
                collator.count(batch, micro_rows)
                if graphs is not None:
                    graphs.use(planner.plan if capturable_pass(planner.plan, micro_rows) else None)
                batch = to_gpu_without_waiting(batch, self.args.device)
                # Under DDP the gradients are averaged across processes once a step, in the last micro-batch's
                # backward pass: processes may then run different numbers of micro-batches
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    if by_count:
                        return micro_batch_step(model, batch, num_items_in_batch)
                    if share == 0:   # no targets: no gradient (and a mean over none would be NaN)
                        return torch.zeros((), device=self.args.device)
                    self.current_gradient_accumulation_steps = 1 / share   # the trainer divides the loss by it
                    try:
                        return micro_batch_step(model, batch, None)
                    finally:
                        self.current_gradient_accumulation_steps = 1

            def micro_step(micro_rows: list[dict], share: float, last: bool):
                loss = forward_backward(micro_rows, share, last)
                self.log_last_step()   # this pass is queued: the GPU runs it while the host logs the last step
                return loss

            return planner.run(inputs[ROWS_KEY].rows, micro_step, self.state.global_step + 1)

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                     start_time, learning_rate=None):
            """The step's figures taken (StepFigures), to be logged after the next step's first micro-batch is
            queued; at once before a checkpoint (whose trainer state holds the log) or an evaluation, and under DDP
            (the processes gather their counts at the same point of a step, and may run different numbers of
            micro-batches). transformers' own logging of the step is then skipped, its saving and evaluating not."""
            if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
                counts = (collator.tokens, collator.useful_tokens, collator.loss_tokens)
                # the mean of every process's loss, as transformers logs it (under DDP a collective, at the same
                # point on every process; on one, the loss itself)
                loss = nested_gather(tr_loss, self.args.parallel_mode).mean()
                self.unlogged = {
                    "figures": StepFigures({"loss": loss, "grad_norm": grad_norm}
                                           if grad_norm is not None else {"loss": loss}, self.args.device),
                    "steps": self.state.global_step - self._globalstep_last_logged,
                    "learning_rate": learning_rate if learning_rate is not None else self._get_learning_rate(),
                    "counts": [now - before for now, before in zip(counts, self.counted)],
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    if torch.cuda.is_available() else None,
                    "start_time": start_time}
                self.counted = counts
                tr_loss -= tr_loss   # queued after the figures' copy
                self._globalstep_last_logged = self.state.global_step
                self.store_flos()
                if self.control.should_save or self.control.should_evaluate or world_size() > 1:
                    self.log_last_step()
            super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                             start_time, learning_rate)

        def _finalize_training(self, *args, **kwargs):
            self.log_last_step()
            return super()._finalize_training(*args, **kwargs)

        def log_last_step(self) -> None:
            """Logs the step whose figures were taken last, if not yet: its loss (the sum over the steps since the
            last log, as transformers logs it), gradient norm and learning rate, with its token counts, seconds,
            rates, peak memory and MFU (of every process, under DDP)."""
            step, self.unlogged = self.unlogged, None
            if step is None:
                return
            figures = step["figures"].read()
            self._total_loss_scalar += figures["loss"]
            logs = {"loss": figures["loss"] / step["steps"]}
            if "grad_norm" in figures:
                logs["grad_norm"] = figures["grad_norm"]
            logs["learning_rate"] = step["learning_rate"]
            seconds = step["figures"].seconds_after(self.step_began)
            self.step_began = step["figures"]
            peak = step["peak_memory_gib"]
            tokens, useful, loss_tokens = step["counts"]
            ranks = gather({"tokens": tokens, "useful_tokens": useful, "loss_tokens": loss_tokens,
                            "peak_memory_gib": peak})   # every process's, under DDP
            for key in ("tokens", "useful_tokens", "loss_tokens"):   # the whole step's, all processes
                logs[key] = sum(entry[key] for entry in ranks)
            logs["seconds"] = round(seconds, 4)
            logs["tokens_per_s"] = round(logs["tokens"] / seconds, 1) if seconds > 0 else 0.0
            logs["useful_tokens_per_s"] = round(logs["useful_tokens"] / seconds, 1) if seconds > 0 else 0.0
            if peak is not None:
                logs["peak_memory_gib"] = max(entry["peak_memory_gib"] for entry in ranks)
                logs["mfu"] = mfu(base_parameters, logs["tokens_per_s"] / len(ranks), peak_flops)   # per GPU
            if len(ranks) > 1:
                for index, entry in enumerate(ranks):
                    logs[f"rank{index}/tokens"] = entry["tokens"]
                    if entry["peak_memory_gib"] is not None:
                        logs[f"rank{index}/peak_memory_gib"] = entry["peak_memory_gib"]
            self.log(logs, step["start_time"])

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or torch.cuda.is_available() or self.args.world_size == 1:
                return super()._load_optimizer_and_scheduler(checkpoint)
            # DDP on the CPU: transformers maps the optimizer's state to args.device, "cpu:0" there, a location
            # torch.load cannot restore; the state belongs on the CPU
            from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

            self.optimizer.load_state_dict(torch.load(Path(checkpoint) / OPTIMIZER_NAME, map_location="cpu",
                                                      weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    trainer = MeasuringTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                               callbacks=callbacks)
    trainer.planner = planner
    trainer.graphs = graphs
    return trainer


def cuda_graphs(params: TrainParams, backend: str, model) -> tuple[BackboneGraphs | None, str | None]:
    """The CUDA graphs of this run's model body (ftpipe/model/cuda_graphs.py), installed, or None and why not:
    train.cuda_graphs off; not the Unsloth backend (they go into its forward, checked to capture by
    bench/gpu_train_plan.py's graphs jobs); several processes (DDP exchanges gradients inside the backward pass)."""
    if params.cuda_graphs == "off":
        return None, "train.cuda_graphs: off"
    if backend != "unsloth":
        return None, f"the {backend} backend (CUDA graphs are used with Unsloth only)"
    if world_size() > 1:
        return None, "several processes (DDP exchanges gradients inside the backward pass)"
    graphs = BackboneGraphs(model.parameters(), local_device())
    why_not = graphs.install()
    return (None, why_not) if why_not else (graphs, None)


def capturable_pass(plan: Plan, rows: list[dict]) -> bool:
    """Whether the body of a pass of `plan` on `rows` can be CUDA graphs: every layer's activations kept
    (recomputation saves and restores random states, offloading copies to host RAM: neither can be captured), and
    rows not packed (Unsloth's attention over packed examples reads their lengths on the host)."""
    return plan.kept == plan.layers and not are_packed(rows)


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
    collator = TokenCountingCollator(pad_id, padding_free=are_packed(rows) and backend == "unsloth")
    rows_per_process = per_process_rows(params.batch_size, world_size())
    planner = plan_steps(model, params, backend, max_seq_length, collator.collate, torch_dtype(compute_dtype),
                         rows_per_process, rows)
    base_parameters = base_parameter_count(base_dir)
    graphs, graphs_off = cuda_graphs(params, backend, model)
    if graphs is not None:
        planner.free_memory = graphs.free_after_running_out
    trainer = make_trainer(model, training_arguments(params, backend, compute_dtype, output_dir),
                           rows, collator, callbacks, base_parameters, planner, graphs)
    trainer.graphs_off = graphs_off
    return trainer, base_parameters


def plan_steps(model, params: TrainParams, backend: str, max_seq_length: int, collate, dtype, rows: int,
               data: list[dict]) -> PlannedSteps:
    """How this process runs its `rows` of each step (ftpipe/model/training_plan.py): on a GPU, the plan chosen
    from a memory probe (packed rows laid out as the busiest rows of `data`) when params leave a choice (auto),
    else the one params set; on the CPU, all its rows at once (memory rarely binds there, and that is the
    fastest), with every layer recomputed for `on`."""
    import torch

    layers = len(decoder_layers(model))
    mode, micro = params.gradient_checkpointing, params.micro_batch_size
    micro = min(micro, rows) if micro != "auto" else micro
    offload = offload_function(model) if backend == "unsloth" else None
    if mode == "unsloth" and offload is None:
        raise PipelineError("params.yaml train.gradient_checkpointing is 'unsloth', which needs the Unsloth backend "
                            f"(train.backend: unsloth, on a CUDA GPU, `{GPU_EXTRA}`); set it to auto, on or off.")
    if not torch.cuda.is_available():
        plan = Plan(rows if micro == "auto" else micro, layers if mode == "on" else 0, 0, layers)
        return PlannedSteps(model, Choice(plan, "on the CPU: as params.yaml sets it, auto being the whole batch "
                                                "without recomputation"), [plan], None, max_seq_length,
                            rows)
    candidates = candidate_plans(rows, micro, mode, layers, offload is not None)
    if len(candidates) == 1:
        return PlannedSteps(model, Choice(candidates[0], "as params.yaml sets it"), candidates, None, max_seq_length,
                            rows, offload)
    trainable, _ = model.get_nb_trainable_parameters()
    packed = are_packed(data)
    memory, probe = probe_memory(model, collate, max_seq_length, packed, dtype, trainable, offload,
                                 busiest_layouts(data) if packed else None)
    budget, host_budget = usable_gpu_bytes(), usable_host_bytes() if offload is not None else float("inf")
    if memory is None:
        choice = Choice(candidates[-1], "one row does not fit even with every layer recomputed: the plan needing "
                                        "the least memory", None, budget)
    else:
        choice = choose_plan(candidates, memory, budget, max_seq_length, rows, host_budget)
    return PlannedSteps(model, choice, candidates, memory, max_seq_length, rows, offload, probe, host_budget)


def offload_function(model):
    """Unsloth's offloading checkpoint function, as it armed the decoder layers (loaded with offloading), or None:
    also when Unsloth chose plain recomputation instead (it does below 512 tokens, where offloading costs more
    than it saves) and left torch's reentrant checkpoint in place."""
    import torch.utils.checkpoint

    armed = [getattr(layer, "_gradient_checkpointing_func", None) for layer in decoder_layers(model)]
    offloading = torch.utils.checkpoint.CheckpointFunction.__name__ == "UnslothCheckpointFunction"
    return armed[0] if armed and armed[0] is not None and offloading else None


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

