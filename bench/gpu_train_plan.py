"""The training plan against Unsloth on one GPU (issue 17): the train stage with gradient_checkpointing: auto and
micro_batch_size: auto, against the hand-written Unsloth loop with Unsloth's notebook defaults, the same loop with
the best fixed setting found by hand, and transformers + peft + bitsandbytes, all at the same effective batch.

Methods (each job in a process of its own: Unsloth patches transformers when imported, and a memory cap is
per process):
  stage            stages.train.train_adapter, train.gradient_checkpointing: auto, train.micro_batch_size: auto
  unsloth_default  a hand-written loop over Unsloth's model with its notebook defaults: offloaded gradient
                   checkpointing ("unsloth"), micro-batch 2, gradient accumulation up to the batch
  unsloth_best     the same loop without checkpointing at a fixed micro-batch (--best-micro, found by hand)
  unsloth_loop     (variable-length data) the same loop with the stage's own plan, on the stage's batches
  hf_peft_bnb      transformers + peft + bitsandbytes (NF4, double quant, bf16 compute, SDPA, non-reentrant
                   checkpointing on every layer, as PEFT's QLoRA guide does), micro-batch 4
  longest          the longest sequence (batch 1) one training step of the stage's setup fits, under each of the
                   job's GPU memory caps (8, 16, 32 GiB; then the whole GPU): the memory model of the plan
                   (ftpipe/model/memory_probe.py) predicts it, steps check it (search_longest); uncapped, the first
                   step is just beyond Unsloth's published 342,733 tokens (--longest-resume continues a search)
  longest_hf_peft_bnb
                   the same for transformers + peft + bitsandbytes under the caps, without a memory model
                   (from 1,024 tokens up, then bisected)
  profile          where one micro-batch's time goes (2 and 4 rows, torch.profiler): GPU kernels against wall time
  dense_check      one micro-batch (2 and 4 rows) with Unsloth dequantizing the 4-bit weights in every pass, and
                   with them dequantized once and kept: seconds, and the numbers against Unsloth's
  graphs_check     micro-batches (2 and 4 rows) replayed as CUDA graphs (ftpipe/model/cuda_graphs.py, as the stage
                   replays them) against run as they are: seconds a pass, peak memory, and the accumulated loss
                   and LoRA gradients against the eager passes'

Same for every method: a random-initialized Llama built on the spot (8b: Llama 3.1 8B dimensions; 1b: Llama 3.2
1B), rows of --seq-len random token ids, --batch rows per optimizer step (the effective batch), LoRA r=16 alpha=32
on the seven projections, AdamW (fused, lr 2e-4, no weight decay, linear schedule after 2 warm-up steps), gradient
clipping at 1.0, seed 42: the same initial adapter. The loops take the rows in the order the stage's trainer took
them (recorded by the stage's job; in file order when it has not run), so the loss curves of stage, unsloth_default
and unsloth_best are comparable step by step. --cap-gib caps the process's GPU memory
(torch.cuda.set_per_process_memory_fraction) before anything is loaded.

    # here (CPU): the payload (the Unsloth site as site.tar.xz, the embedded tokenizer as base-skeleton)
    bash ../shared/gpu/make-gpu-site.sh && .venv/bin/python bench/gpu_pipeline_8b.py --prepare
    # a dry run of the whole bench on the CPU, with a tiny model (minutes; checks the jobs, not speed):
    .venv/bin/python bench/gpu_train_plan.py --cpu-smoke --out /tmp/plan-smoke
    # on the GPU machine (device tool), carrying .gpu-payload; --jobs picks which (default: all, in order):
    python3 bench/gpu_train_plan.py --start --jobs 8b && python3 bench/gpu_train_plan.py --wait 540 --out $OUT
    python3 bench/gpu_train_plan.py --wait 540 --out $OUT     # again, until it says done
    # a later session on a fresh machine adds its jobs to the committed results:
    python3 bench/gpu_train_plan.py --start --merge bench/results/gpu_train_plan.json --jobs 8b-cap,1b && ...
Writes gpu_train_plan.json (commit it as bench/results/gpu_train_plan.json; BENCHMARKS.md reads it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = REPO / ".gpu-payload"
SKELETON = PAYLOAD / "base-skeleton"
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]   # gpu_train_bench; ftpipe (not installed there)
import gpu_train_bench as measured  # noqa: E402 - StepClock, host memory, the models' dimensions

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 42
# The jobs; --jobs selects by name or name prefix ("8b" runs every 8b job), in the order it names them. Effective
# batch 16 rows of 2048 tokens for every method; the capped runs and the 1B take fewer steps (speed and fit, not
# curves).
JOBS = [
    {"name": "8b-stage", "model": "8b", "method": "stage", "steps": 30, "warmup": 10},
    {"name": "8b-unsloth_default", "model": "8b", "method": "unsloth_default", "steps": 30, "warmup": 10},
    {"name": "8b-unsloth_best", "model": "8b", "method": "unsloth_best", "steps": 30, "warmup": 10},
    {"name": "8b-cap24-stage", "model": "8b", "method": "stage", "cap_gib": 24, "steps": 10, "warmup": 4},
    {"name": "8b-cap24-unsloth_default", "model": "8b", "method": "unsloth_default", "cap_gib": 24, "steps": 10,
     "warmup": 4},
    {"name": "8b-cap48-stage", "model": "8b", "method": "stage", "cap_gib": 48, "steps": 10, "warmup": 4},
    {"name": "8b-cap48-unsloth_default", "model": "8b", "method": "unsloth_default", "cap_gib": 48, "steps": 10,
     "warmup": 4},
    {"name": "1b-stage", "model": "1b", "method": "stage", "steps": 30, "warmup": 10},
    {"name": "1b-unsloth_default", "model": "1b", "method": "unsloth_default", "steps": 30, "warmup": 10},
    # variable-length rows: the default data set packed into rows of up to 2048 tokens (padding-free on Unsloth);
    # the loop takes the stage's rows in the stage's order with the stage's plan, as a user would write it
    {"name": "8b-variable-stage", "model": "8b", "method": "stage", "data": "variable", "steps": 16, "warmup": 6},
    {"name": "8b-variable-unsloth_loop", "model": "8b", "method": "unsloth_loop", "data": "variable", "steps": 16,
     "warmup": 6},
    # the longest context of one step (batch 1): the stage's on the whole GPU (steps of minutes: a search that
    # resumes across sessions; its first trial is the target's), later under 8, 16 and 32 GB caps
    {"name": "8b-longest", "model": "8b", "method": "longest", "caps": [None]},
    # transformers + peft + bitsandbytes: speed only (its curve is not one of those compared), so fewer steps
    {"name": "8b-hf_peft_bnb", "model": "8b", "method": "hf_peft_bnb", "steps": 12, "warmup": 4},
    {"name": "1b-hf_peft_bnb", "model": "1b", "method": "hf_peft_bnb", "steps": 12, "warmup": 4},
    {"name": "1b-unsloth_best", "model": "1b", "method": "unsloth_best", "steps": 30, "warmup": 10},
    # the longest context under 8, 16 and 32 GB caps, for the stage and transformers + peft + bnb
    {"name": "8b-longest-capped", "model": "8b", "method": "longest", "caps": [8, 16, 32]},
    {"name": "8b-longest-capped-hf_peft_bnb", "model": "8b", "method": "longest_hf_peft_bnb", "caps": [8, 16, 32]},
    # base weights dequantized once and kept, against Unsloth's dequantizing in every pass (an experiment: no gain)
    {"name": "8b-dense", "model": "8b", "method": "dense_check", "micro_batches": [2, 4], "repeats": 10},
    # where a micro-batch's time goes (torch.profiler): the next step for the 24 and 48 GB targets
    {"name": "8b-profile", "model": "8b", "method": "profile", "micro_batches": [2, 4], "repeats": 3},
    # passes replayed as CUDA graphs (what the stage does since) against run as they are: speed, memory, numbers
    {"name": "8b-graphs", "model": "8b", "method": "graphs_check", "micro_batches": [2, 4], "accumulate": 4,
     "repeats": 12},
    {"name": "1b-graphs", "model": "1b", "method": "graphs_check", "micro_batches": [2, 4], "accumulate": 4,
     "repeats": 12},
    # where the stage's host waits for the GPU (torch's sync debug mode; slows the steps: no rates from it)
    {"name": "1b-syncs", "model": "1b", "method": "stage", "steps": 6, "warmup": 3, "sync_sites": True},
]
LONGEST = 1 << 19   # the longest sequence the model is loaded for (Unsloth sizes its RoPE tables by it)
UNSLOTH_PUBLISHED_LONGEST = 342_733   # Unsloth's published longest context for Llama-3.1-8B QLoRA on an 80 GB GPU
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)


def root() -> Path:
    """Where models, data, logs and results live: beside the repository (on the GPU machine's disk; a warm machine
    keeps the models between calls), or FTPIPE_TRAIN_PLAN_ROOT (the CPU dry run's)."""
    return Path(os.environ.get("FTPIPE_TRAIN_PLAN_ROOT") or REPO.parent / "ftpipe-train-plan")


def train_params(args, job: dict, mode: str, micro):
    """The train section every method shares, with this method's plan params."""
    import dataclasses

    from ftpipe.core.params import load_params

    train = load_params(REPO / "params.yaml").train
    lora = dataclasses.replace(train.lora, r=16, alpha=32, dropout=0.0, bias="none", target_modules=TARGETS)
    quantization = dataclasses.replace(train.quantization, compute_dtype="float32" if args.cpu_smoke else "bfloat16")
    return dataclasses.replace(train, backend="cpu" if args.cpu_smoke else "unsloth", seed=SEED,
                               max_steps=job.get("steps", 1), num_epochs=None, batch_size=args.batch,
                               micro_batch_size=micro,
                               learning_rate=2e-4, lr_scheduler="linear", warmup_steps=2, weight_decay=0.0,
                               max_grad_norm=1.0, gradient_checkpointing=mode, checkpoint_every=10_000,
                               checkpoint_runs_kept=0, lora=lora, quantization=quantization)


# --- preparation -----------------------------------------------------------------------------------------------

def build_model(size: str, folder: Path, cpu: bool) -> None:
    """A random-initialized Llama in bf16 safetensors with the embedded tokenizer (gpu_train_bench's, or a tiny
    one on the CPU)."""
    if not cpu:
        return measured.build_model(size, folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SKELETON)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    record = json.dumps({"digest": f"random-init-tiny-seed0-{parameters}", "dtype": "bfloat16",
                         "parameters": parameters})
    (folder / "provenance.json").write_text(record)
    (folder / "content.json").write_text(record)


def build_data(folder: Path, rows: int, seq_len: int, vocab: int) -> None:
    """rows of exactly seq_len random token ids (every position a target), as the tokenize stage writes them."""
    import random

    from ftpipe.data.parquet_rows import write_rows

    rng = random.Random(0)
    ids = [[rng.randrange(3, vocab) for _ in range(seq_len)] for _ in range(rows)]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_rows(folder / "train.parquet", {"id": [f"r{i}" for i in range(rows)], "input_ids": ids, "labels": ids})


def build_variable_data(folder: Path, model_dir: Path, seq_len: int) -> None:
    """The default data set's clean train split (the payload's data.tar.xz, or this checkout's data/clean), chat
    template applied, packed by the tokenize stage into rows of up to seq_len tokens, repeated to fill every step."""
    import tempfile

    from ftpipe.core.params import TokenizeParams
    from ftpipe.data.parquet_rows import write_rows
    from ftpipe.data.tokenized import load_tokenized
    from ftpipe.model.modeling import load_tokenizer
    from stages.tokenize import tokenize_splits

    with tempfile.TemporaryDirectory() as scratch:
        clean = REPO / "data/clean"
        if (PAYLOAD / "data.tar.xz").exists() and not clean.exists():
            with tarfile.open(PAYLOAD / "data.tar.xz") as archive:
                archive.extractall(scratch, filter="data")
            clean = Path(scratch) / "data/clean"
        params = TokenizeParams(max_seq_length=seq_len, truncation="truncate", assistant_only_loss=True, packing=True,
                                chat_template=None, chat_template_kwargs={}, system_prompt=None)
        packed = Path(scratch) / "packed"
        packed.mkdir()
        tokenize_splits(clean, load_tokenizer(model_dir), params, packed)
        rows = load_tokenized("train", packed)
    needed = 16 * max(job.get("steps", 0) for job in JOBS)
    rows = [dict(row, id=f"{index}") for index, row in enumerate((rows * (needed // len(rows) + 1))[:needed])]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_rows(folder / "train.parquet", {key: [row[key] for row in rows] for key in ("id", "input_ids", "labels",
                                                                                      "position_ids")})


# --- the methods (worker side) ------------------------------------------------------------------------------------

def run_stage(args, job: dict, model_dir: Path, data_dir: Path) -> dict:
    """The stage as the pipeline runs it, with auto plans; records the order its trainer took the rows in."""
    import torch
    from transformers import TrainerCallback

    from ftpipe.model import training
    from ftpipe.model.training import throughput
    from stages.train import train_adapter

    order: list[list[str]] = []
    original = training.TokenCountingCollator.__call__

    def recording(self, rows):
        order.append([row["id"] for row in rows])
        return original(self, rows)

    training.TokenCountingCollator.__call__ = recording

    class ResetPeak(TrainerCallback):   # the probe's peak is not training's
        def on_train_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    work = root() / "work" / job["name"]
    shutil.rmtree(work, ignore_errors=True)
    params = train_params(args, job, "auto", "auto")
    sites = sync_sites() if job.get("sync_sites") else None
    result = train_adapter(params, args.seq_len, model_dir, data_dir, work / "checkpoints", work / "adapter",
                           [ResetPeak()] + ([sites] if sites else []))
    curve = result["curve"]
    (root() / order_file(job)).write_text(json.dumps(order[:job["steps"]]))
    return {**throughput(curve, skip_first=job["warmup"]), "steps": len(curve), "row_order": order[:job["steps"]],
            "losses": [round(row["loss"], 5) for row in curve],
            "training_plan": result["metrics"]["training_plan"], "mfu_stage": result["metrics"].get("mfu"),
            **({"allocator": allocator_record()} if torch.cuda.is_available() else {}),
            **({"host_waits": sites.record()} if sites else {})}


SYNC_SITES_FROM_STEP = 2


def sync_sites():
    """A TrainerCallback recording where the host waited for the GPU while the stage trained
    (torch.cuda.set_sync_debug_mode: each operation that synchronizes warns), counted by the innermost calls outside
    torch, from the end of step SYNC_SITES_FROM_STEP (the steps before compile kernels and capture CUDA graphs) to
    the end of the last step (not the final checkpoint's saving). A step should wait only where Unsloth's loss picks
    its target rows (nonzero(), once a micro-batch), and for the last step's figures (ftpipe/model/step_figures.py:
    an event's wait, which the debug mode does not report, queued behind the next step's first pass)."""
    import collections
    import traceback
    import warnings

    import torch
    from transformers import TrainerCallback

    torch_folder = str(Path(torch.__file__).parent) + os.sep

    class Sites(TrainerCallback):
        def __init__(self):
            self.counts: collections.Counter = collections.Counter()
            self.steps = 0
            self.shown = None
            self.filters = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == SYNC_SITES_FROM_STEP and torch.cuda.is_available():
                self.filters, self.shown = warnings.filters[:], warnings.showwarning
                warnings.simplefilter("always")
                warnings.showwarning = self.seen
                torch.cuda.set_sync_debug_mode("warn")
            elif state.global_step > SYNC_SITES_FROM_STEP and self.shown is not None:
                self.steps += 1
                if state.global_step >= state.max_steps:   # not the final checkpoint's saving (tensors to the host)
                    self.stop()

        def seen(self, message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self.shown(message, category, filename, lineno, file, line)
            frames = [frame for frame in traceback.extract_stack()[:-1]
                      if not frame.filename.startswith(torch_folder) and "warnings" not in frame.filename]
            self.counts[" < ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
                                   for frame in reversed(frames[-3:]))] += 1

        def on_train_end(self, args, state, control, **kwargs):
            self.stop()

        def stop(self):
            if self.shown is not None:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning, warnings.filters[:] = self.shown, self.filters
                self.shown = None

        def record(self) -> dict:
            return {"steps": self.steps, "from_step": SYNC_SITES_FROM_STEP + 1,
                    "sites": dict(self.counts.most_common())}

    return Sites()


def allocator_record() -> dict:
    """The CUDA allocator's config and how often it had to free its cache to allocate (each time a device-wide
    wait), over the process."""
    import torch

    stats = torch.cuda.memory_stats()
    return {"config": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "alloc_retries": stats.get("num_alloc_retries"), "device_allocs": stats.get("num_device_alloc"),
            "device_frees": stats.get("num_device_free")}


def order_file(job: dict) -> str:
    return f"{job['model']}-{job.get('data', 'fixed')}-order.json"


def step_rows(job: dict, rows: list[dict], batch: int) -> list[list[dict]]:
    """Each step's rows: in the order the stage's trainer took them, or in file order."""
    by_id = {row["id"]: row for row in rows}
    path = root() / order_file(job)
    if path.exists():
        return [[by_id[row_id] for row_id in step] for step in json.loads(path.read_text())][:job["steps"]]
    return [rows[step * batch:(step + 1) * batch] for step in range(job["steps"])]


def accumulating_loop(model, steps: list[list[dict]], micro: int, job: dict, parameters: int, cpu: bool,
                      layout=None) -> dict:
    """AdamW steps over `steps`, each as micro-batches of `micro` rows whose mean losses are weighted by their share
    of the step's targets (the sum of token losses over the step's target count: the stage's numbers)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from ftpipe.model.modeling import pad_batch
    from ftpipe.model.training_plan import loss_token_count, split_rows

    device = "cpu" if cpu else "cuda"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=not cpu)
    schedule = get_linear_schedule_with_warmup(optimizer, 2, len(steps))
    clock = measured.StepClock() if not cpu else None
    losses, seconds = [], []
    model.train()
    if clock:
        clock.start()
    for rows in steps:
        began = time.perf_counter()
        total = sum(loss_token_count(row) for row in rows)
        step_loss = 0.0
        for micro_rows in split_rows(rows, micro):
            collated = (layout or (lambda rows: pad_batch(rows, 0)))(micro_rows)
            batch = {key: value.to(device) for key, value in collated.items()}
            if clock:
                clock.count(batch)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=not cpu):
                loss = model(**batch, use_cache=False).loss * (sum(loss_token_count(r) for r in micro_rows) / total)
            loss.backward()
            step_loss += float(loss)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(step_loss, 5))
        if clock:
            clock.step_done(step_loss)
        seconds.append(time.perf_counter() - began)
    summary = clock.summary(job["warmup"], parameters) if clock else {"seconds": round(sum(seconds), 2)}
    return {**summary, "losses": losses, "micro_batch_size": micro}


def run_loop(args, job: dict, model_dir: Path, rows: list[dict]) -> dict:
    from transformers import set_seed

    from ftpipe.model.gpu import base_parameter_count
    from ftpipe.model.modeling import pad_packed_batch, padding_free_batch
    from ftpipe.model.training import load_trainable_model

    layout = None
    if job["method"] == "unsloth_default":
        mode, micro = "unsloth", 2
    elif job["method"] == "unsloth_best":
        mode, micro = "off", args.best_micro
    else:   # unsloth_loop: the stage's own plan (a plan with recomputed layers is not a loop's setting: refused)
        stage = json.loads((root() / f"{job['name'].replace('unsloth_loop', 'stage')}.result.json").read_text())
        final = stage["training_plan"]["final"]
        if final["kept"] != final["layers"]:
            raise SystemExit(f"the stage recomputed layers ({final}); run this loop with the same plan by hand")
        mode, micro = "off", final["micro_batch_size"]
        # Unsloth's layout for packed rows; the CPU dry run's transformers model takes them padded
        layout = padding_free_batch if not args.cpu_smoke else (lambda rows: pad_packed_batch(rows, 0))
    params = train_params(args, job, mode, micro)
    set_seed(SEED)   # as build_trainer does: the same initial adapter as the stage's
    model = load_trainable_model(params.backend, params, model_dir, args.seq_len, params.quantization.compute_dtype)
    result = accumulating_loop(model, step_rows(job, rows, args.batch), micro, job, base_parameter_count(model_dir),
                               args.cpu_smoke, layout)
    return {**result, "gradient_checkpointing": mode, **({} if args.cpu_smoke else {"allocator": allocator_record()})}


def hf_model(model_dir: Path):
    """transformers + peft + bitsandbytes as PEFT's QLoRA guide sets it up (module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


def one_pass_model(args, job: dict, model_dir: Path):
    """The Unsloth model without recomputation, in training mode, with `micro_step(batch)`: one forward and backward
    pass (gradients cleared first, so they are that pass's), returning the loss; and `micro_batch(rows, size)`: the
    first `size` rows as a batch on the GPU. What the dense_check and profile jobs measure a micro-batch with."""
    import torch
    from transformers import set_seed

    from ftpipe.model.modeling import pad_batch
    from ftpipe.model.training import load_trainable_model

    params = train_params(args, job, "off", max(job["micro_batches"]))
    set_seed(SEED)
    model = load_trainable_model(params.backend, params, model_dir, args.seq_len, "bfloat16")
    model.train()

    def micro_step(batch: dict):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach()

    def micro_batch(rows: list[dict], size: int) -> dict:
        return {key: value.cuda() for key, value in pad_batch(rows[:size], 0).items()}

    return model, micro_step, micro_batch


def loss_and_gradients(model, loss) -> dict:
    """A pass's loss and a copy of each parameter's gradient, by name: what the checks compare."""
    return {"loss": loss, **{name: parameter.grad.clone() for name, parameter in model.named_parameters()
                             if parameter.grad is not None}}


def largest_difference(left: dict, right: dict) -> float:
    """The largest absolute difference between two loss_and_gradients."""
    return max(float((left[name].float() - right[name].float()).abs().max()) for name in left)


def run_dense_check(args, job: dict, model_dir: Path, rows: list[dict]) -> dict:
    """One micro-batch's forward and backward pass, no recomputation, at each of the job's micro-batch sizes: with
    Unsloth dequantizing the 4-bit weights in every pass (twice a micro-batch), and with every decoder layer's
    weights dequantized once and kept (13 GiB for the 8B): the seconds a micro-batch of each, and the loss and
    LoRA gradients against Unsloth's (the same pass twice without dense weights shows what the kernels themselves
    vary). The dense weights reach Unsloth's fused LoRA kernels through its get_lora_parameters, looked up in
    unsloth.kernels.fast_lora at each call, without a quant state (fast_dequantize returns such a weight as it is).
    Session 4 measured no gain (0.998x, 0.995x): the stage does not keep dense weights."""
    import torch
    import unsloth.kernels.fast_lora as fast_lora
    from unsloth.kernels.utils import fast_dequantize

    model, micro_step, micro_batch = one_pass_model(args, job, model_dir)
    projections = [module for module in model.modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")
                   and getattr(module.base_layer.weight, "quant_state", None) is not None]
    dense: dict[int, torch.Tensor] = {}
    original = fast_lora.get_lora_parameters

    def get_lora_parameters(proj):
        weight, quant_state, *lora = original(proj)
        return (dense[id(proj)], None, *lora) if id(proj) in dense else (weight, quant_state, *lora)

    fast_lora.get_lora_parameters = get_lora_parameters

    def outcome(batch: dict) -> dict:
        return loss_and_gradients(model, micro_step(batch))

    def seconds(batch: dict) -> float:
        micro_step(batch)
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(job["repeats"]):
            micro_step(batch)
        torch.cuda.synchronize()
        return round((time.perf_counter() - began) / job["repeats"], 4)

    result = {"projections": len(projections), "by_micro_batch": {}}
    for micro in job["micro_batches"]:
        batch = micro_batch(rows, micro)
        dense.clear()
        plain, again, plain_seconds = outcome(batch), outcome(batch), seconds(batch)
        dense.update({id(proj): fast_dequantize(proj.base_layer.weight, proj.base_layer.weight.quant_state)
                      for proj in projections})
        kept, kept_seconds = outcome(batch), seconds(batch)
        result["dense_gib"] = round(sum(weight.numel() * weight.element_size() for weight in dense.values()) / 2**30, 2)
        result["by_micro_batch"][str(micro)] = {
            "seconds_dequantizing": plain_seconds, "seconds_dense": kept_seconds,
            "speedup": round(plain_seconds / kept_seconds, 4),
            "bitwise_identical": all(torch.equal(plain[name], kept[name]) for name in plain),
            "largest_difference_dense": largest_difference(plain, kept),
            "largest_difference_repeated": largest_difference(plain, again)}
        print(micro, result["by_micro_batch"][str(micro)], flush=True)
    return result


def run_profile(args, job: dict, model_dir: Path, rows: list[dict]) -> dict:
    """Where one micro-batch's forward and backward pass (no recomputation) spends its time, at each of the job's
    micro-batch sizes: wall seconds, the GPU's kernel seconds within them (the rest is the GPU waiting for the
    host), and the kernels and host operations taking the most time (torch.profiler)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _, micro_step, micro_batch = one_pass_model(args, job, model_dir)

    def top(events, key: str, count: int = 15) -> list:
        ranked = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:count]
        return [{"name": event.key[:120], "calls": event.count, "ms": round(getattr(event, key) / 1e3, 2)}
                for event in ranked]

    result = {}
    for micro in job["micro_batches"]:
        batch = micro_batch(rows, micro)
        for _ in range(2):
            micro_step(batch)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            began = time.perf_counter()
            for _ in range(job["repeats"]):
                micro_step(batch)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - began) / job["repeats"]
        events = profiler.key_averages()
        # the GPU's own entries (kernels, copies, memsets); an operator's entry repeats its kernels' time
        on_gpu = [event for event in events if event.device_type == DeviceType.CUDA]
        kernel = sum(event.self_device_time_total for event in on_gpu) / 1e6 / job["repeats"]
        result[str(micro)] = {"wall_seconds": round(wall, 4), "kernel_seconds": round(kernel, 4),
                              "gpu_busy_share": round(kernel / wall, 4),
                              "kernels": top(on_gpu, "self_device_time_total"),
                              "host": top(events, "self_cpu_time_total")}
        print(micro, {key: result[str(micro)][key] for key in ("wall_seconds", "kernel_seconds")}, flush=True)
    return {"by_micro_batch": result}


def run_graphs_check(args, job: dict, model_dir: Path, rows: list[dict]) -> dict:
    """At each of the job's micro-batch sizes, `accumulate` passes (forward and backward, no recomputation, the
    loss summed over the passes' target count as the trainer's) with the model's body run as it is and replayed as
    CUDA graphs (ftpipe.model.cuda_graphs.BackboneGraphs, installed in Unsloth's forward as the stage installs it):
    seconds a pass (over `repeats` passes), peak GPU memory, and the accumulated loss and LoRA gradients against
    the eager passes'. Unsloth's kernels are not bitwise reproducible from one pass to the next (8b-dense measured
    it), so the graphs' difference from the eager passes is set beside the eager passes' difference from
    themselves. A failed capture's whole traceback goes to the job's log."""
    import traceback

    import torch

    import ftpipe.model.cuda_graphs as cuda_graphs
    from ftpipe.model.cuda_graphs import BackboneGraphs, to_gpu_without_waiting
    from ftpipe.model.modeling import pad_batch
    from ftpipe.model.training_plan import loss_token_count

    named = cuda_graphs.first_cause

    def first_cause(error):
        traceback.print_exception(error)
        return named(error)

    cuda_graphs.first_cause = first_cause
    model, _, _ = one_pass_model(args, job, model_dir)
    graphs = BackboneGraphs(model.parameters(), torch.device("cuda", 0))
    why_not = graphs.install()
    if why_not:
        raise SystemExit(why_not)

    def pass_(batch: dict, count, plan):
        graphs.use(plan)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**to_gpu_without_waiting(batch, "cuda"), num_items_in_batch=count, use_cache=False).loss
        loss.backward()
        return loss.detach()

    def eager(batch, count):
        return pass_(batch, count, None)

    def graphed(batch, count):
        return pass_(batch, count, "no recomputation")

    def accumulated(run, batches: list[dict], count) -> dict:
        model.zero_grad(set_to_none=True)
        return loss_and_gradients(model, sum(run(batch, count) for batch in batches).clone())

    def timed(run, batches: list[dict], count) -> dict:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        for index in range(job["repeats"]):
            run(batches[index % len(batches)], count)
        torch.cuda.synchronize()
        return {"seconds": round((time.perf_counter() - began) / job["repeats"], 4),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}

    result = {"by_micro_batch": {}}
    for micro in job["micro_batches"]:
        step = rows[:micro * job["accumulate"]]
        batches = [pad_batch(step[start:start + micro], 0) for start in range(0, len(step), micro)]
        count = torch.tensor(sum(loss_token_count(row) for row in step), device="cuda")
        plain, again = accumulated(eager, batches, count), accumulated(eager, batches, count)
        plain_time = timed(eager, batches, count)
        accumulated(graphed, batches, count)   # the first pass runs as it is, the second is captured
        replayed = accumulated(graphed, batches, count)
        graphed_time = timed(graphed, batches, count)
        entry = {"eager": plain_time, "graphed": graphed_time,
                 "speedup": round(plain_time["seconds"] / graphed_time["seconds"], 4),
                 "tokens_per_s_eager": round(micro * args.seq_len / plain_time["seconds"], 1),
                 "tokens_per_s_graphed": round(micro * args.seq_len / graphed_time["seconds"], 1),
                 "loss_eager": float(plain["loss"]), "loss_graphed": float(replayed["loss"]),
                 "largest_difference_graphed": largest_difference(plain, replayed),
                 "largest_difference_repeated": largest_difference(plain, again), "graphs": graphs.summary()}
        result["by_micro_batch"][str(micro)] = entry
        print(micro, entry, flush=True)
        graphs.release()
    graphs.uninstall()
    return result


def run_hf(args, job: dict, model_dir: Path, rows: list[dict]) -> dict:
    from ftpipe.model.gpu import base_parameter_count

    return accumulating_loop(hf_model(model_dir), step_rows(job, rows, args.batch), 4, job,
                             base_parameter_count(model_dir), False)


def cap_memory(cap_gib: float | None) -> str:
    """Caps this process's GPU memory at cap_gib (None: the whole GPU); returns the cap's label."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(cap_gib * 2**30 / total, 1.0) if cap_gib else 1.0)
    return f"{cap_gib:g} GiB" if cap_gib else "uncapped"


def longest_multiple(fits, step: int, limit: int) -> int:
    """The longest multiple of `step` up to `limit` that `fits` (a predicate true up to some length), or 0."""
    low, high = 0, step
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit // step * step + step)
    while high - low > step:
        middle = (low + high) // 2 // step * step
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def search_longest(trial, first: list[int], step: int, limit: int, earlier: list[dict], seconds: float,
                   on_trial) -> dict:
    """The longest multiple of `step` up to `limit` that `trial(length) -> record with "fits"` fits: the
    `first` lengths in turn (a target, a prediction) until one fails, then, while none has failed, growing
    steps above the longest that fitted (step, 2 step, 4 step, ...), then halving the distance between the
    longest that fitted and the shortest that failed. `earlier` trials (a resumed search) count as made."""
    trials = list(earlier)
    low = max([t["length"] for t in trials if t["fits"]], default=0)
    high = min([t["length"] for t in trials if not t["fits"]], default=None)
    queue = [length for length in first if length > low and (high is None or length < high)]
    began, increment = time.time(), step
    while time.time() - began < seconds:
        if queue:
            length = queue.pop(0)
        elif high is None:
            length, increment = low + increment, increment * 2
        else:
            length = (low + high) // 2 // step * step
        if length > limit or length <= low or (high is not None and (length >= high or high - low <= step)):
            break
        record = trial(length)
        trials.append(record)
        on_trial(trials)
        if record["fits"]:
            low = length
        else:
            high, queue = length, [candidate for candidate in queue if candidate < length]
    return {"longest_fitting": low, "shortest_failing": high, "resolution": step, "trials": trials,
            "complete": high is not None and high - low <= step or low + step > limit}


def step_at(model, optimizer, batch: dict) -> tuple[bool, float]:
    """One training step (forward, backward, optimizer) on `batch`: whether it fitted, and its seconds."""
    import torch

    began, fitted = time.time(), True
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        fitted = False
    loss = batch = None   # after the except block: its traceback held the failed step's tensors
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return fitted, round(time.time() - began, 1)


def longest_jobs(args, job: dict, run_one) -> dict:
    """run_one(cap_gib, label, earlier trials, write) for each of the job's caps (smallest first; None: the whole
    GPU), results written as each trial ends, --longest-resume continuing a result file's trials."""
    earlier = json.loads(Path(args.longest_resume).read_text()) if args.longest_resume else {}
    earlier = earlier.get("jobs", {}).get(job["name"], earlier)   # a whole report, or one job's result file
    result = {"searches": {}}

    def write(extra: dict | None = None) -> None:
        Path(args.result).write_text(json.dumps({**result, **(extra or {})}, default=str))

    for cap_gib in job["caps"]:
        label = cap_memory(cap_gib)
        trials = (earlier.get("searches", {}).get(label, {}).get("trials")
                  or earlier.get("in_progress_trials", {}).get(label, []))
        result["searches"][label] = run_one(cap_gib, label, trials, write)
        write()
    return result


def run_longest(args, job: dict, model_dir: Path) -> dict:
    """The longest sequence one training step fits (batch 1) with the stage's model setup and plans, under each
    of the job's GPU memory caps. The memory model, fitted on probes of one row of --longest-probe tokens and
    one of twice that (longest_probe), predicts the longest length some plan fits (GPU and host RAM); steps
    (forward, backward, optimizer) check it (search_longest), each on the plan the stage would choose and, where
    that runs out of memory, on the plans the stage falls back to (next_plan), as it would redo the step. A step
    near the H200's limit takes minutes (attention is quadratic in the length), so each trial is written as it
    ends and --longest-resume continues from a result file's trials."""
    import torch
    from transformers import set_seed

    from ftpipe.model.memory_probe import usable_gpu_bytes, usable_host_bytes
    from ftpipe.model.modeling import padding_free_batch
    from ftpipe.model.training import load_trainable_model, offload_function
    from ftpipe.model.training_plan import apply_plan, candidate_plans, choose_plan, decoder_layers, next_plan

    params = train_params(args, {"steps": 1}, "auto", 1)
    set_seed(SEED)
    model = load_trainable_model("unsloth", params, model_dir, LONGEST, "bfloat16")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers, offload = len(decoder_layers(model)), offload_function(model)
    memory, probe = longest_probe(model, args.longest_probe, offload, sum(p.numel() for p in trainable))
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=True)
    candidates = candidate_plans(1, 1, "auto", layers, offload is not None)
    step = args.longest_step if job["caps"] == [None] else args.longest_step // 8

    def run_one(cap_gib, label, earlier, write):
        gpu_budget, host_budget = usable_gpu_bytes(), usable_host_bytes()

        def plan_for(length: int):
            return choose_plan(candidates, memory, gpu_budget, length, 1, host_budget)

        def fits(length: int) -> bool:
            return plan_for(length).reason.startswith("the fastest")

        predicted = longest_multiple(fits, step, LONGEST)
        search = {"predicted_longest": predicted, "gpu_budget_gib": round(gpu_budget / 2**30, 1),
                  "host_budget_gib": round(host_budget / 2**30, 1)}

        def attempt(length: int, choice_plan, predicted_bytes: float) -> dict:
            apply_plan(model, choice_plan, offload)
            batch = {k: v.cuda() for k, v in padding_free_batch(one_long_row(length, seed=0)).items()}
            torch.cuda.reset_peak_memory_stats()
            measured.reset_peak_rss()
            fitted, seconds = step_at(model, optimizer, batch)
            return {"fits": fitted, "plan": choice_plan.as_dict(1), "predicted_gib": round(predicted_bytes / 2**30, 2),
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "host_peak_rss_gib": round(measured.host_memory()["peak_rss"] / 2**30, 2), "seconds": seconds}

        def trial(length: int) -> dict:
            write({"in_progress": {"cap": label, "length": length}})
            return step_with_fallbacks(
                length, plan_for(length).plan,   # the plan needing the least memory where none is predicted to fit
                lambda plan: attempt(length, plan, memory.step_bytes(plan, length)),
                lambda plan: next_plan(plan, candidates, memory, length, host_budget), label)

        # Uncapped, the target first (the shortest multiple of step beyond Unsloth's published 342,733 tokens),
        # then the prediction: a step there takes minutes
        first = [length for length in (UNSLOTH_PUBLISHED_LONGEST // step * step + step,) if cap_gib is None]
        first += [predicted] if predicted else [step]
        found = search_longest(trial, first, step, LONGEST, earlier, args.longest_seconds,
                               lambda trials: write({"in_progress_trials": {label: trials}}))
        return {**search, **found}

    return {"probe": probe, **longest_jobs(args, job, run_one)}


def one_long_row(length: int, seed: int) -> list[dict]:
    """A batch of one row of `length` random tokens (every position a target), one example, as the trainer's
    packed rows: the longest-context searches' steps and probes."""
    import torch

    ids = torch.randint(3, 32000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": ids, "labels": ids, "position_ids": list(range(length))}]


def step_with_fallbacks(length: int, plan, attempt, fall_back, label: str = "") -> dict:
    """One trial of the longest-context search as the stage runs a step: `attempt(plan)` (a record with "fits"),
    and after running out of memory `fall_back(plan)` (the next plan, or None) and again, until a plan fits or
    none is left. The trial's record is its last attempt's, with every attempt."""
    attempts = []
    while plan is not None:
        attempts.append(attempt(plan))
        print(label, length, attempts[-1], flush=True)
        if attempts[-1]["fits"]:
            break
        plan = fall_back(plan)
    return {"length": length, **attempts[-1], "attempts": attempts}


def longest_probe(model, tokens: int, offload, trainable_parameters: int):
    """The memory model for batch-1 rows far longer than training's: probe steps on one row of `tokens` and one
    of twice that with every layer recomputed, and one of `tokens` offloaded (no layer is kept at such lengths).
    The stage's probe doubles the rows instead (its micro-batches are rows of max_seq_length); at 16k tokens
    that extrapolated 21x to 344k and predicted 118 GiB for a step that ran out of 139 (bench/results/
    gpu_longest_memory.json: a row's cost per token measured at 8k-128k)."""
    import torch

    from ftpipe.model.memory_probe import ADAM_STATE_BYTES, input_bytes_per_token, offload_bytes, probe_step_bytes
    from ftpipe.model.modeling import padding_free_batch
    from ftpipe.model.training_plan import MemoryModel, Plan, apply_plan, decoder_layers

    layers = len(decoder_layers(model))
    probes = {"recompute": (Plan(1, layers, 0, layers), tokens), "recompute_double": (Plan(1, layers, 0, layers),
                                                                                        2 * tokens)}
    if offload is not None:
        probes["offload"] = (Plan(1, 0, layers, layers), tokens)
    measured_bytes = {}
    for name, (plan, length) in probes.items():
        apply_plan(model, plan, offload)
        measured_bytes[name] = probe_step_bytes(model, padding_free_batch, one_long_row(length, seed=1),
                                                torch.bfloat16)
    record = {"tokens": tokens, **{f"{name}_step_gib": None if value is None else round(value / 2**30, 3)
                                   for name, value in measured_bytes.items()}}
    memory = MemoryModel.fit(layers, tokens, None, measured_bytes["recompute"], measured_bytes["recompute_double"],
                             input_bytes_per_token(model), fixed_extra=ADAM_STATE_BYTES * trainable_parameters,
                             offload=offload_bytes(measured_bytes))
    record["model_kib_per_token"] = {"beyond_layer_inputs": round(memory.other_per_token / 1024, 1),
                                     "offload_buffers": round(memory.offload_per_token / 1024, 1)}
    return memory, record


def run_longest_hf(args, job: dict, model_dir: Path) -> dict:
    """The same search for transformers + peft + bitsandbytes (run_hf's model), without a memory model: from
    --longest-step / 8 tokens up, then bisected."""
    import torch

    model = hf_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    step = args.longest_step // 8

    def run_one(cap_gib, label, earlier, write):
        def trial(length: int) -> dict:
            ids = torch.randint(3, 32000, (1, length), generator=torch.Generator().manual_seed(0)).cuda()
            torch.cuda.reset_peak_memory_stats()
            write({"in_progress": {"cap": label, "length": length}})
            fitted, seconds = step_at(model, optimizer, {"input_ids": ids, "labels": ids})
            record = {"length": length, "fits": fitted, "seconds": seconds,
                      "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
            print(label, record, flush=True)
            return record

        return search_longest(trial, [step], step, LONGEST, earlier, args.longest_seconds,
                              lambda trials: write({"in_progress_trials": {label: trials}}))

    return longest_jobs(args, job, run_one)


def worker(args) -> None:
    job = json.loads(args.worker)
    if not job["method"].startswith(("hf_peft_bnb", "longest_hf")) and not args.cpu_smoke:
        import unsloth  # noqa: F401 - before transformers, trl and peft, in this process only
    # The cap after Unsloth's import: importing it sets the allocator's config (expandable segments) in the
    # environment, which CUDA's first use reads; a cap set first ran capped jobs on the default allocator, unlike a
    # card of that size (sessions 1-3: their stage runs near the cap freed and re-reserved memory every step)
    if job.get("cap_gib"):   # before any model is loaded
        cap_memory(job["cap_gib"])
    from ftpipe.data.tokenized import load_tokenized

    model_dir = root() / f"model-{job['model']}"
    data_dir = root() / (f"data-{job['model']}" + ("-variable" if job.get("data") == "variable" else ""))
    if job["method"] == "stage":
        result = run_stage(args, job, model_dir, data_dir)
    elif job["method"] == "longest":
        result = run_longest(args, job, model_dir)
    elif job["method"] == "longest_hf_peft_bnb":
        result = run_longest_hf(args, job, model_dir)
    elif job["method"] == "hf_peft_bnb":
        result = run_hf(args, job, model_dir, load_tokenized("train", data_dir))
    elif job["method"] == "profile":
        result = run_profile(args, job, model_dir, load_tokenized("train", data_dir))
    elif job["method"] == "dense_check":
        result = run_dense_check(args, job, model_dir, load_tokenized("train", data_dir))
    elif job["method"] == "graphs_check":
        result = run_graphs_check(args, job, model_dir, load_tokenized("train", data_dir))
    else:
        result = run_loop(args, job, model_dir, load_tokenized("train", data_dir))
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))


# --- orchestration ------------------------------------------------------------------------------------------------

def site_environment() -> dict[str, str]:
    """The Unsloth site unpacked beside the repository (once per machine) on the path, then the repository."""
    site = root() / "site"
    if not site.exists():
        site.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(site), "-xJf", str(PAYLOAD / "site.tar.xz")], check=True)
    return {**os.environ, "PYTHONPATH": f"{site}:{REPO}", "PYTHONUNBUFFERED": "1"}


def run_all(args) -> None:
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    report_file = base / "gpu_train_plan.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {"jobs": {}}
    if args.merge and not report["jobs"]:   # a fresh machine: the jobs of earlier sessions, from their results
        earlier = json.loads(Path(args.merge).read_text())
        report = {**earlier, "jobs": {name: job for name, job in earlier["jobs"].items() if job.get("exit") == 0}}
        for job in report["jobs"].values():   # the loops of a later session take the rows in the stage's order
            if job.get("row_order") and not (base / order_file(job)).exists():
                (base / order_file(job)).write_text(json.dumps(job["row_order"]))
    jobs = selected_jobs(args.jobs)
    if args.cpu_smoke:
        jobs = [dict(job, steps=4, warmup=1) for job in jobs if job["model"] == "8b"
                and not job["method"].startswith(("hf_peft_bnb", "longest", "dense", "profile", "graphs"))
                and not job.get("cap_gib")]
    env = os.environ if args.cpu_smoke else site_environment()
    report.setdefault("sessions", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "jobs": [job["name"] for job in jobs]})
    report.update(state="running", settings={"seq_len": args.seq_len, "batch": args.batch, "seed": SEED,
                                             "best_micro": args.best_micro, "lora": {"r": 16, "alpha": 32,
                                                                                     "target_modules": TARGETS}})
    if not args.cpu_smoke:
        import torch

        from ftpipe.core.provenance import environment

        report["environment"], report["gpu"] = environment(), torch.cuda.get_device_name(0)
    for job in jobs:
        model_dir = base / f"model-{job['model']}"
        if not (model_dir / "provenance.json").exists():
            smoke = ["--cpu-smoke"] if args.cpu_smoke else []
            subprocess.run([sys.executable, __file__, "--build", job["model"], *smoke], env=env, check=True)
        result_file = base / f"{job['name']}.result.json"
        result_file.unlink(missing_ok=True)
        log = base / f"{job['name']}.log"
        command = [sys.executable, __file__, "--worker", json.dumps(job), "--result", str(result_file),
                   "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--best-micro", str(args.best_micro),
                   "--longest-step", str(args.longest_step), "--longest-probe", str(args.longest_probe),
                   "--longest-seconds", str(args.longest_seconds)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        if args.longest_resume:
            command += ["--longest-resume", str(Path(args.longest_resume).resolve())]
        started = time.time()
        with open(log, "w") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
        entry = {**job, "exit": code, "wall_seconds": round(time.time() - started, 1),
                 "session": len(report["sessions"])}
        if result_file.exists():
            entry.update(json.loads(result_file.read_text()))
        if code != 0:
            entry["log_tail"] = log.read_text(errors="replace")[-4000:]
        report["jobs"][job["name"]] = entry
        report["comparison"] = compare(report["jobs"])
        report_file.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"{job['name']}: exit {code}, {entry['wall_seconds']} s", flush=True)
    report["state"] = "done"
    report_file.write_text(json.dumps(report, indent=1, default=str) + "\n")


def selected_jobs(names: str) -> list[dict]:
    """The jobs --jobs names (comma-separated: a job's name, else a prefix of names), in the order named, a
    prefix's jobs in JOBS order: a session runs first what it needs most."""
    selected = []
    for name in names.split(","):
        exact = [job for job in JOBS if job["name"] == name]
        selected += [job for job in exact or JOBS if job["name"].startswith(name) and job not in selected]
    return selected


def compare(jobs: dict) -> dict:
    """The issue's targets from the jobs that ran: speed ratios and the loss curves' largest difference."""
    def rate(name: str):   # real tokens: the stage pads padding-free rows to a multiple of 128 positions
        job = jobs.get(name, {})
        return job.get("useful_tokens_per_s") or job.get("tokens_per_s")

    out = {}
    stage, loop = rate("8b-variable-stage"), rate("8b-variable-unsloth_loop")
    if stage and loop:
        out["8b variable-length: stage / hand-written loop with the stage's plan"] = round(stage / loop, 3)
        pair = [jobs[name]["losses"] for name in ("8b-variable-stage", "8b-variable-unsloth_loop")]
        out["8b variable-length: largest loss difference"] = round(max(abs(a - b) for a, b in zip(*pair)), 5)
    for prefix in ("8b", "8b-cap24", "8b-cap48", "8b-variable", "1b"):
        stage, default = rate(f"{prefix}-stage"), rate(f"{prefix}-unsloth_default")
        if stage and default:
            out[f"{prefix}: stage / unsloth_default"] = round(stage / default, 3)
        best = rate(f"{prefix}-unsloth_best")
        if stage and best:
            out[f"{prefix}: stage / unsloth_best"] = round(stage / best, 3)
        curves = {method: jobs.get(f"{prefix}-{method}", {}).get("losses") for method in
                  ("stage", "unsloth_default", "unsloth_best")}
        if curves["stage"] and all(curves.values()):
            out[f"{prefix}: largest loss difference from the stage's, steps 1-{len(curves['stage'])}"] = {
                method: round(max(abs(a - b) for a, b in zip(curves["stage"], losses)), 5)
                for method, losses in curves.items() if method != "stage"}
        history = jobs.get(f"{prefix}-stage", {}).get("training_plan", {}).get("history")
        if history:
            out[f"{prefix}: stage steps redone after running out of memory"] = len(history) - 1
    whole = jobs.get("8b-longest", {}).get("searches", {}).get("uncapped")
    if whole:
        out["8b longest context, whole GPU: stage"] = whole["longest_fitting"]
        out[f"8b longest context beyond Unsloth's published {UNSLOTH_PUBLISHED_LONGEST:,}"] = (
            whole["longest_fitting"] > UNSLOTH_PUBLISHED_LONGEST)
    for model in ("8b", "1b"):
        graphs = jobs.get(f"{model}-graphs", {}).get("by_micro_batch")
        if graphs:
            out[f"{model} CUDA graphs of the body: pass speed-up; largest gradient difference, graphed and eager "
                f"repeated"] = {f"micro-batch {micro}": [entry["speedup"], entry["largest_difference_graphed"],
                                                         entry["largest_difference_repeated"]]
                                for micro, entry in graphs.items()}
    dense = jobs.get("8b-dense", {}).get("by_micro_batch")
    if dense:
        out["8b dense base weights: micro-batch speed-up, and bitwise the same loss and gradients"] = {
            f"micro-batch {micro}": [entry["speedup"], entry["bitwise_identical"]] for micro, entry in dense.items()}
    capped = {method: jobs.get(name, {}).get("searches", {}) for method, name in
              (("stage", "8b-longest-capped"), ("transformers + peft + bnb", "8b-longest-capped-hf_peft_bnb"))}
    labels = sorted({label for searches in capped.values() for label in searches},
                    key=lambda text: float(text.split()[0]))   # "8 GiB", "16 GiB", ...
    if labels:
        out["8b longest context under GPU memory caps"] = {
            label: {method: searches[label]["longest_fitting"] for method, searches in capped.items()
                    if label in searches} for label in labels}
    return out


def start(args) -> None:
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    (base / "gpu_train_plan.json").unlink(missing_ok=True) if args.fresh else None
    log = open(base / "run.log", "a")
    command = [sys.executable, str(Path(__file__).resolve()), "--run", "--jobs", args.jobs, "--seq-len",
               str(args.seq_len), "--batch", str(args.batch), "--best-micro", str(args.best_micro),
               "--longest-step", str(args.longest_step), "--longest-probe", str(args.longest_probe),
               "--longest-seconds", str(args.longest_seconds)]
    if args.longest_resume:
        command += ["--longest-resume", str(Path(args.longest_resume).resolve())]
    if args.merge:
        command += ["--merge", str(Path(args.merge).resolve())]
    report_file = base / "gpu_train_plan.json"
    if report_file.exists():   # a wait right after must not take the last run's "done" for this one's
        report_file.write_text(json.dumps({**json.loads(report_file.read_text()), "state": "starting"}, indent=1))
    subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started; log {base / 'run.log'}")


def wait(seconds: float, out: Path) -> None:
    base = root()
    deadline = time.time() + seconds
    report_file = base / "gpu_train_plan.json"

    def read_report() -> dict:
        return json.loads(report_file.read_text()) if report_file.exists() else {}

    def failed(report: dict) -> set[str]:
        return {name for name, job in report.get("jobs", {}).items() if job.get("exit")}

    failed_before = failed(read_report())   # an earlier wait returned on those; this one waits for the jobs after
    while time.time() < deadline:
        log = (base / "run.log").read_text(errors="replace") if (base / "run.log").exists() else ""
        if "Traceback" in log:
            break   # the runner itself failed
        report = read_report()
        if report.get("state") == "done" or failed(report) - failed_before:
            break   # done, or a job failed: its log is worth reading before the rest runs
        time.sleep(5)
    out.mkdir(parents=True, exist_ok=True)
    for path in (report_file, base / "run.log"):
        if path.exists():
            (out / path.name).write_text(path.read_text(errors="replace")[-200_000:])
    # the jobs' logs and result files as one archive: the device tool brings back at most 8 files
    with tarfile.open(out / "jobs.tar.gz", "w:gz") as archive:
        for path in [*sorted(base.glob("*.log")), *sorted(base.glob("*.result.json"))]:
            if path.name != "run.log":
                archive.add(path, arcname=path.name)
    report = read_report()
    if report:
        print("state:", report.get("state"))
        for name, job in report["jobs"].items():
            print(name, job.get("exit"), {k: job.get(k) for k in ("tokens_per_s", "peak_memory_gib", "mfu")})
        print(json.dumps(report.get("comparison"), indent=1))


def argument_parser() -> argparse.ArgumentParser:
    """The bench's command line; its defaults are the bench's settings (gpu_longest_memory.py reads them too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", action="store_true", help="start the jobs in the background and return")
    parser.add_argument("--fresh", action="store_true", help="with --start: forget earlier results on this machine")
    parser.add_argument("--run", action="store_true", help="run the jobs here, in the foreground")
    parser.add_argument("--wait", type=float, help="wait up to this many seconds for the jobs, then copy results")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--jobs", default="8b,1b", help="job names or name prefixes, comma-separated, run in "
                                                            "this order")
    parser.add_argument("--cpu-smoke", action="store_true", help="a dry run on the CPU with a tiny model")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="rows per optimizer step, for every method")
    parser.add_argument("--best-micro", type=int, default=8, help="unsloth_best's micro-batch (found by hand)")
    parser.add_argument("--longest-step", type=int, default=8192)
    parser.add_argument("--longest-probe", type=int, default=32768, help="the memory probe's row length")
    parser.add_argument("--longest-seconds", type=float, default=1500, help="stop starting trials after this")
    parser.add_argument("--longest-resume", help="a result file whose longest trials to continue from")
    parser.add_argument("--merge", help="on a fresh machine, start from an earlier session's results file "
                                        "(bench/results/gpu_train_plan.json): the comparison covers both")
    parser.add_argument("--build")
    parser.add_argument("--worker")
    parser.add_argument("--result")
    return parser


def main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    if args.build:
        size = args.build
        folder = root() / f"model-{size}"
        build_model(size, folder, args.cpu_smoke)
        from ftpipe.model.modeling import load_tokenizer

        rows = args.batch * max(job.get("steps", 0) for job in JOBS)
        seq_len = 64 if args.cpu_smoke else args.seq_len
        build_data(root() / f"data-{size}", rows, seq_len, len(load_tokenizer(folder)))
        build_variable_data(root() / f"data-{size}-variable", folder, seq_len)
    elif args.worker:
        worker(args)
    elif args.start:
        start(args)
    elif args.run:
        if args.cpu_smoke:
            args.seq_len, args.batch, args.best_micro = 64, 4, 2
        run_all(args)
    elif args.wait is not None:
        wait(args.wait, args.out)
    elif args.cpu_smoke:
        args.seq_len, args.batch, args.best_micro = 64, 4, 2
        os.environ["FTPIPE_TRAIN_PLAN_ROOT"] = str(args.out / "work")
        run_all(args)
        wait(0, args.out)
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
