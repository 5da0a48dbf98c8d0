"""Stage `train`: QLoRA fine-tuning of the base model on the tokenized train split.

    python -m stages.train

Backends (train.backend): `unsloth` on a CUDA GPU (FastLanguageModel, 4-bit base, LoRA);
`cpu`: transformers + peft + bitsandbytes NF4 on the CPU, still QLoRA; `auto` picks
Unsloth when a CUDA GPU is present. Writes the adapter to models/adapter/, the per-step
curve to metrics/plots/train_loss.csv and metrics/train.json. Checkpoints go to
models/checkpoints/<fingerprint>/ every train.checkpoint_every steps; a rerun with the same
params, data and base resumes from the last one instead of starting over.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
import ftpipe.model.modeling as modeling_module
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import (
    CONTENT_FILE,
    atomic_dir,
    atomic_write_text,
    file_hashes,
    read_json,
    sha256_file,
    sha256_text,
    tree_digest,
    write_content_record,
    write_json,
)
from ftpipe.core.params import Params, TrainParams, flatten, load_params
from ftpipe.core.paths import (
    ADAPTER_DIR,
    BASE_DIR,
    CHECKPOINTS_DIR,
    PLOTS_DIR,
    PROVENANCE_FILE,
    TOKENIZED_DIR,
    metrics_file,
)
from ftpipe.core.provenance import package_version, stage_record
from ftpipe.model.modeling import (
    IGNORE_INDEX,
    bnb_config,
    load_tokenizer,
    pad_batch,
    pad_packed_batch,
    padding_free_batch,
    require_model_dir,
    resolve_compute_dtype,
    torch_dtype,
)
from ftpipe.tracking.runs import stage_run

# tokens: positions the model computed, padding included; useful_tokens: the real (non-padding) ones.
# mfu: model FLOPs utilization on a GPU with a known peak (ftpipe.model.gpu), else empty.
CURVE_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens", "useful_tokens", "loss_tokens", "seconds",
                 "tokens_per_s", "useful_tokens_per_s", "peak_memory_gib", "mfu")
TOKENS_KEY = "real_tokens"   # the collator's count of a batch's non-padding tokens; the model never sees it
# Params that change no number of the result: how often checkpoints are written and how many old runs' are
# kept. They are left out of the fingerprint (a resume is the same run) and out of dvc.yaml (no rerun).
RESULT_NEUTRAL = ("checkpoint_every", "checkpoint_runs_kept")
# Params whose value is resolved on the machine ('auto'): the fingerprint holds the resolved value instead.
RESOLVED = ("backend", "quantization.compute_dtype")
# Packages whose version changes a step's numbers: a checkpoint is resumed only under the same ones.
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "unsloth", "unsloth-zoo")
RUN_FILE = "run.json"              # in a checkpoint folder: which MLflow run started it, and when
COMPLETED_DIR = "completed"        # in a checkpoint folder: the finished run's adapter and result.json
RESULT_FILE = "result.json"


def resolve_backend(requested: str) -> str:
    import torch  # torch may precede Unsloth; transformers, peft and trl may not

    has_cuda = torch.cuda.is_available()
    if requested == "unsloth" and not has_cuda:
        raise PipelineError("params.yaml train.backend is 'unsloth', but no CUDA GPU is visible. "
                            "Set train.backend: auto (or cpu) to train on the CPU.")
    if requested == "cpu":
        return "cpu"
    return "unsloth" if has_cuda else "cpu"


def fingerprint(params: TrainParams, max_seq_length: int, base_dir: Path, tokenized_dir: Path, backend: str,
                compute_dtype: str) -> str:
    """Identity of a training run: what can change its numbers. Params (less RESULT_NEUTRAL ones, with
    'auto' values resolved: a run started on the CPU never resumes on a GPU), the base weights, the
    training data, this stage's step code and the numeric packages' versions. Checkpoints are only resumed
    by a run with the same fingerprint: a checkpoint written by other code may hold a different optimizer
    state or per-step log."""
    numbers = {key: value for key, value in flatten(params).items() if key not in RESULT_NEUTRAL + RESOLVED}
    base = read_json(base_dir / CONTENT_FILE)["digest"]
    data = tree_digest(file_hashes(tokenized_dir, exclude=(PROVENANCE_FILE,)))
    code = [sha256_file(Path(__file__)), sha256_file(Path(modeling_module.__file__))]   # the step and the batches
    packages = {name: package_version(name) for name in NUMERIC_PACKAGES}
    return sha256_text(json.dumps({"train": numbers, "max_seq_length": max_seq_length, "backend": backend,
                                   "compute_dtype": compute_dtype, "base": base, "data": data, "code": code,
                                   "packages": packages}, sort_keys=True))[:16]


def prune_checkpoint_runs(root: Path, current: Path, kept: int) -> list[str]:
    """Keep the `kept` most recent checkpoint folders of other runs (other params, data or code: they are
    resumed if those come back), remove older ones, saying so. Returns the removed run ids."""
    others = sorted((path for path in root.glob("*") if path.is_dir() and path != current),
                    key=lambda path: path.stat().st_mtime, reverse=True)
    removed = []
    for path in others[kept:]:
        shutil.rmtree(path)
        removed.append(path.name)
        print(f"train: removed the checkpoints of run {path.name} (other params, data or code; "
              f"train.checkpoint_runs_kept: {kept} runs are kept)")
    return removed


ALL_LINEAR = "all-linear"   # PEFT's own name for every linear layer but the output head


def lora_targets(model, target_modules: list[str]) -> list[str] | str:
    """What PEFT is given: train.lora.target_modules, checked against the model's linear layers (a name PEFT
    would not find is an error listing the model's real names: Phi-3 fuses qkv_proj, Llama has q_proj), or
    PEFT's "all-linear"."""
    import torch

    if target_modules == [ALL_LINEAR]:
        return ALL_LINEAR
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name]
    missing = [target for target in target_modules
               if not any(name == target or name.endswith("." + target) for name in names)]
    if missing:
        real = sorted({name.rsplit(".", 1)[-1] for name in names} - {"lm_head"})
        raise PipelineError(f"params.yaml train.lora.target_modules: {missing} not found in the base model. Its "
                            f"linear layers are: {', '.join(real)}. Name some of these, or [{ALL_LINEAR}].")
    return target_modules


def load_trainable_model(backend: str, params: TrainParams, base_dir: Path, max_seq_length: int,
                         compute_dtype: str):
    """The 4-bit base with fresh LoRA adapters, ready to train."""
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
        return FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
            target_modules=lora_targets(model, lora.target_modules), random_state=params.seed,
            use_gradient_checkpointing="unsloth" if params.gradient_checkpointing else False)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=bnb_config(params.quantization, compute_dtype),
        device_map="cpu", dtype=torch_dtype(compute_dtype))
    targets = lora_targets(model, lora.target_modules)
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=targets, task_type="CAUSAL_LM"))


def training_arguments(params: TrainParams, backend: str, compute_dtype: str, output_dir: Path):
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
        report_to=[], use_cpu=backend == "cpu", bf16=backend == "unsloth" and compute_dtype == "bfloat16",
        fp16=backend == "unsloth" and compute_dtype == "float16", remove_unused_columns=False,
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
    import torch
    from transformers import Trainer

    from ftpipe.model.gpu import bf16_peak_flops, mfu

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


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def run_completed(checkpoint: Path) -> bool:
    state = read_json(checkpoint / "trainer_state.json")
    return state["global_step"] >= state["max_steps"]


def completed_result(checkpoint_dir: Path, out_dir: Path) -> dict | None:
    """The result of a run with this fingerprint that already finished, its adapter copied into `out_dir`;
    None if there is none. The stage reruns for reasons that change no number (a helper module edited, a
    license declaration that still passes): training again would cost hours for the same adapter."""
    completed = checkpoint_dir / COMPLETED_DIR
    if not (completed / RESULT_FILE).exists():
        return None
    for path in completed.iterdir():
        if path.name != RESULT_FILE:
            shutil.copy2(path, out_dir / path.name)
    result = read_json(completed / RESULT_FILE)
    result["metrics"]["reused_completed_run"] = True
    return result


def save_completed(checkpoint_dir: Path, out_dir: Path, result: dict) -> None:
    """Keep the finished run's adapter and result beside its checkpoints (written atomically)."""
    with atomic_dir(checkpoint_dir / COMPLETED_DIR) as completed:
        for path in out_dir.iterdir():
            shutil.copy2(path, completed / path.name)
        write_json(completed / RESULT_FILE, result)


def start_record(checkpoint_dir: Path, resume_from: str | None, mlflow_run_id: str | None) -> dict:
    """Who started this checkpoint folder (written by the run that starts it) and, on a resume, that run."""
    path = checkpoint_dir / RUN_FILE
    if resume_from and path.exists():
        return {**read_json(path), "resumed_from_checkpoint": Path(resume_from).name}
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record = {"mlflow_run_id": mlflow_run_id, "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                              time.gmtime())}
    write_json(path, record)
    return {**record, "resumed_from_checkpoint": Path(resume_from).name if resume_from else None}


def train_adapter(params: TrainParams, max_seq_length: int, base_dir: Path, tokenized_dir: Path,
                  checkpoints_root: Path, out_dir: Path, callbacks: list | None = None,
                  mlflow_run_id: str | None = None) -> dict:
    """Train LoRA adapters on the 4-bit base; save them into `out_dir`; return metrics and curve (and, under
    "start", which run started the checkpoints this run resumed)."""
    from ftpipe.data.tokenized import load_tokenized

    backend = resolve_backend(params.backend)
    compute_dtype = resolve_compute_dtype(params.quantization.compute_dtype, backend == "unsloth")
    run_id = fingerprint(params, max_seq_length, base_dir, tokenized_dir, backend, compute_dtype)
    checkpoint_dir = checkpoints_root / run_id
    prune_checkpoint_runs(checkpoints_root, checkpoint_dir, params.checkpoint_runs_kept)
    reused = completed_result(checkpoint_dir, out_dir)
    if reused:
        print(f"train: run {run_id} (same params, base, data, code and packages) already finished; "
              f"its adapter is published again, without training")
        return reused
    resume_from = last_checkpoint(checkpoint_dir)
    if resume_from and run_completed(Path(resume_from)):
        # A finished run without its completed/ record (killed while saving it): resuming its last checkpoint
        # would take one step more (step 201 of 200), so it trains again: same seed and data, same adapter.
        shutil.rmtree(checkpoint_dir)
        resume_from = None
    start = start_record(checkpoint_dir, resume_from, mlflow_run_id)
    rows = load_tokenized("train", tokenized_dir)
    packed = "position_ids" in rows[0]   # tokenize.packing wrote packed rows
    pad_id = load_tokenizer(base_dir).pad_token_id
    print(f"train: backend {backend}, compute dtype {compute_dtype}, run {run_id}, "
          f"{len(rows)} {'packed' if packed else 'one-example'} rows"
          + (f", resuming from {resume_from} (started by MLflow run {start.get('mlflow_run_id')})"
             if resume_from else ""))
    from transformers import set_seed

    set_seed(params.seed)
    model = load_trainable_model(backend, params, base_dir, max_seq_length, compute_dtype)
    collator = TokenCountingCollator(pad_id, padding_free=packed and backend == "unsloth")
    from ftpipe.model.gpu import base_parameter_count

    base_parameters = base_parameter_count(base_dir)
    trainer = make_trainer(model, training_arguments(params, backend, compute_dtype, checkpoint_dir),
                           rows, collator, callbacks or [], base_parameters)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.model.save_pretrained(str(out_dir))
    curve = [{key: entry.get(key) for key in CURVE_COLUMNS} for entry in trainer.state.log_history
             if "loss" in entry]
    trainable, _ = model.get_nb_trainable_parameters()
    metrics = {
        "backend": backend, "compute_dtype": compute_dtype, "run_fingerprint": run_id, "packed": packed,
        "resumed_from": Path(resume_from).name if resume_from else None,
        "steps": trainer.state.global_step, "final_loss": curve[-1]["loss"],
        "mean_loss_last_10_steps": sum(row["loss"] for row in curve[-10:]) / len(curve[-10:]),
        # over the whole curve: the trainer's training_loss leaves out the steps before a resume
        "train_loss": sum(row["loss"] for row in curve) / len(curve),
        "seconds": round(time.perf_counter() - started, 1),
        **throughput(curve),
        "trainable_parameters": trainable, "base_parameters": base_parameters, "reused_completed_run": False,
    }
    result = {"metrics": metrics, "curve": curve, "start": start}
    save_completed(checkpoint_dir, out_dir, result)
    return result


def curve_csv(curve: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve)
    return buffer.getvalue()


def tracked_params(params: Params) -> dict:
    """The params.yaml keys that can change this stage's result: dvc.yaml lists the same
    (tests/test_dvc_yaml.py), so that changing one reruns training."""
    train = {key: value for key, value in flatten(params.train, "train").items()
             if key.removeprefix("train.") not in RESULT_NEUTRAL}
    return {**train, "tokenize.max_seq_length": params.tokenize.max_seq_length}


def settings(params: Params) -> dict:
    """The params.yaml keys this stage also reads, which change no result (checkpoint cadence and retention,
    what MLflow keeps): not in dvc.yaml, so that changing one reruns nothing; logged to MLflow all the same."""
    return {**{f"train.{key}": getattr(params.train, key) for key in RESULT_NEUTRAL},
            **flatten(params.tracking, "tracking")}


# Whole-run figures whose names are also per-step metrics: logged to MLflow as run/<name> (a total of 461
# seconds at step 0 beside per-step values of 2 s would read as one spike of the same series).
def run_totals(metrics: dict) -> dict:
    return {(f"run/{key}" if key in CURVE_COLUMNS else key): value for key, value in metrics.items()
            if isinstance(value, (int, float))}


def mlflow_callback(tracker, checkpoint_max_mib: float):
    """Logs each step's metrics to MLflow as it is taken (a killed run keeps its curve up to there)
    and each checkpoint's adapter when it is saved: copied into the store up to `checkpoint_max_mib`,
    else by path, size and SHA-256."""
    from transformers import TrainerCallback

    class MlflowSteps(TrainerCallback):
        def __init__(self):
            self.logged_steps: set[int] = set()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                tracker.log_metrics({k: v for k, v in logs.items() if k in CURVE_COLUMNS and k != "step"},
                                    step=state.global_step)
                self.logged_steps.add(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                path = checkpoint / name
                if not path.exists():
                    continue
                if path.stat().st_size <= checkpoint_max_mib * 2**20:
                    tracker.log_artifact(path, f"checkpoints/{checkpoint.name}")
                else:
                    tracker.log_reference(path, f"checkpoints/{checkpoint.name}/{name}.reference.json")

    return MlflowSteps()


def main() -> None:
    params = load_params()
    stage_params = tracked_params(params)
    base_dir = require_model_dir(BASE_DIR, "base model")
    base_content = read_json(base_dir / CONTENT_FILE)
    with stage_run("train", {**stage_params, **settings(params)},
                   params.tracking.system_metrics_interval_s) as tracker:
        tracker.log_input(TOKENIZED_DIR / "train.parquet", "tokenized/train", "training")
        tracker.set_tags({"base.digest": base_content["digest"]})
        live = mlflow_callback(tracker, params.tracking.checkpoint_artifact_max_mib)
        with atomic_dir(ADAPTER_DIR) as out_dir:
            result = train_adapter(params.train, params.tokenize.max_seq_length, base_dir, TOKENIZED_DIR,
                                   CHECKPOINTS_DIR, out_dir, callbacks=[live], mlflow_run_id=tracker.run_id)
            write_content_record(out_dir)
            write_json(out_dir / PROVENANCE_FILE, stage_record(
                "train", stage_params, mlflow=tracker.reference(), metrics=result["metrics"], start=result["start"],
                trained_on={"base_digest": base_content["digest"], "base_dtype": base_content["dtype"],
                            "quantized_as": f"bitsandbytes {params.train.quantization.quant_type} 4-bit "
                                            f"(double quant: {params.train.quantization.double_quant}) "
                                            f"of {BASE_DIR}"},
                data_sha256=file_hashes(TOKENIZED_DIR)))
        start, metrics = result["start"], result["metrics"]
        tracker.set_tags({"ftpipe.run_fingerprint": metrics["run_fingerprint"],
                          "ftpipe.resumed": str(bool(start.get("resumed_from_checkpoint"))).lower(),
                          "ftpipe.reused_completed_run": str(metrics["reused_completed_run"]).lower()})
        if start.get("resumed_from_checkpoint"):
            tracker.set_tags({"ftpipe.resumed_from_checkpoint": start["resumed_from_checkpoint"],
                              "ftpipe.resumed_from_run": str(start.get("mlflow_run_id"))})
        atomic_write_text(PLOTS_DIR / "train_loss.csv", curve_csv(result["curve"]))
        write_json(metrics_file("train"), metrics)
        for row in result["curve"]:   # the steps a resumed (or reused) run took before this process
            if row["step"] not in live.logged_steps:
                tracker.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
        tracker.log_metrics(run_totals(metrics))
        tracker.log_artifact(ADAPTER_DIR, "adapter")
    m = metrics
    print(f"train: {m['steps']} steps, final loss {m['final_loss']:.4f}"
          + (f", {m['useful_tokens_per_s']} useful tokens/s ({m['useful_token_share']:.0%} of the "
             f"{m['tokens_per_s']} computed)" if "tokens_per_s" in m else "")
          + (f", peak {m['peak_memory_gib']} GiB" if "peak_memory_gib" in m else "")
          + (f", MFU {m['mfu']:.1%}" if "mfu" in m else "") + f" -> {ADAPTER_DIR}/")


if __name__ == "__main__":
    run_stage(main)
