"""Stage `train`: QLoRA fine-tuning of the base model on the tokenized train split.

    python -m stages.train

Backends (train.backend), all QLoRA (bitsandbytes NF4 base, LoRA adapters):
  unsloth       on a CUDA GPU: Unsloth's FastLanguageModel (`pip install -e ".[gpu]"`); packed rows
                train padding-free
  transformers  on a CUDA GPU without Unsloth: transformers + peft + bitsandbytes, bf16 (or fp16) mixed
                precision, packed rows as padded batches; ~1.7x slower, ~3x the GPU memory
  cpu           transformers + peft + bitsandbytes on the CPU
  auto          unsloth on a CUDA GPU with Unsloth installed, transformers on one without (with a
                warning naming the install), else cpu
A backend this machine cannot run (unsloth or transformers without a CUDA GPU, unsloth not installed)
is an error naming the fix. train.lora.target_modules: [all-linear] is resolved into the explicit leaf
names of the linear layers in the transformer blocks (ftpipe/model/lora.py), printed and recorded in
metrics/train.json (lora_target_modules). Writes the adapter to models/adapter/, the per-step
curve to metrics/plots/train_loss.csv and metrics/train.json. Checkpoints go to
models/checkpoints/<fingerprint>/ every train.checkpoint_every steps; a rerun with the same
params, data and base resumes from the last one instead of starting over.
"""
from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import CONTENT_FILE, atomic_write_text, file_hashes, read_json, write_content_record
from ftpipe.core.params import Params, TrainParams, flatten, load_params
from ftpipe.core.paths import ADAPTER_DIR, BASE_DIR, CHECKPOINTS_DIR, PLOTS_DIR, TOKENIZED_DIR
from ftpipe.core.stage import Stage
from ftpipe.model.architectures import require_supported_architecture
from ftpipe.model.checkpoints import (
    RESULT_NEUTRAL,
    completed_result,
    fingerprint,
    last_checkpoint,
    prune_checkpoint_runs,
    run_completed,
    save_completed,
    start_record,
)
from ftpipe.model.distributed import (
    is_main_process,
    launch,
    multi_host,
    resolve_devices,
    under_launcher,
    world_size,
)
from ftpipe.model.lora import sort_saved_targets
from ftpipe.model.modeling import require_model_dir, resolve_compute_dtype
from ftpipe.model.training import (
    CURVE_COLUMNS,
    GPU_BACKENDS,
    are_packed,
    build_trainer,
    resolve_backend,
    throughput,
    trained_targets,
)


def train_adapter(params: TrainParams, max_seq_length: int, base_dir: Path, tokenized_dir: Path,
                  checkpoints_root: Path, out_dir: Path, callbacks: list | None = None,
                  mlflow_run_id: str | None = None) -> dict:
    """Train LoRA adapters on the 4-bit base; save them into `out_dir`; return metrics and curve (and, under
    "start", which run started the checkpoints this run resumed). A run with the same fingerprint that
    finished is published again without training; an interrupted one is resumed from its last checkpoint."""
    from ftpipe.data.tokenized import load_tokenized

    backend = resolve_backend(params.backend)
    compute_dtype = resolve_compute_dtype(params.quantization.compute_dtype, backend in GPU_BACKENDS)
    run_id = fingerprint(params, max_seq_length, base_dir, tokenized_dir, backend, compute_dtype)
    checkpoint_dir = checkpoints_root / run_id
    main_process = is_main_process()   # under DDP, rank 0 alone writes (the others train, then leave)
    if main_process:
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
        if main_process:
            shutil.rmtree(checkpoint_dir)
        resume_from = None
    start = start_record(checkpoint_dir, resume_from, mlflow_run_id) if main_process else {}
    rows = load_tokenized("train", tokenized_dir)
    packed = are_packed(rows)
    print(f"train: backend {backend}, compute dtype {compute_dtype}, run {run_id}, "
          f"{len(rows)} {'packed' if packed else 'one-example'} rows"
          + (f", resuming from {resume_from} (started by MLflow run {start.get('mlflow_run_id')})"
             if resume_from else ""))
    trainer, base_parameters = build_trainer(params, backend, compute_dtype, base_dir, max_seq_length, rows,
                                             checkpoint_dir, callbacks or [])
    planner = trainer.planner
    print(f"train: plan: {planner.plan.describe(planner.batch_size)} ({planner.history[0]['reason']})")
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if trainer.graphs is not None:   # Unsloth's own forward back in place, the graphs' memory freed
            trainer.graphs.uninstall()
    if not main_process:
        return {}
    trainer.model.save_pretrained(str(out_dir))
    sort_saved_targets(out_dir)
    curve = [{key: entry.get(key) for key in CURVE_COLUMNS} for entry in trainer.state.log_history
             if "loss" in entry]
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    metrics = {
        "backend": backend, "compute_dtype": compute_dtype, "run_fingerprint": run_id, "packed": packed,
        "resumed_from": Path(resume_from).name if resume_from else None,
        "steps": trainer.state.global_step, "final_loss": curve[-1]["loss"],
        "mean_loss_last_10_steps": sum(row["loss"] for row in curve[-10:]) / len(curve[-10:]),
        # over the whole curve: the trainer's training_loss leaves out the steps before a resume
        "train_loss": sum(row["loss"] for row in curve) / len(curve),
        "seconds": round(time.perf_counter() - started, 1), "processes": world_size(),
        **throughput(curve),
        "trainable_parameters": trainable, "base_parameters": base_parameters, "reused_completed_run": False,
        # the layers LoRA adapted, by leaf name ([all-linear] resolved): adapter_config.json's target_modules
        "lora_target_modules": trained_targets(trainer.model),
        # how the steps ran (changes no result): the plan at the end (of this process's rows of a step under DDP),
        # and every plan taken with why
        "training_plan": {"final": planner.plan.as_dict(planner.batch_size),
                          "description": planner.plan.describe(planner.batch_size), "history": planner.history,
                          "memory_probe": planner.probe,
                          "cuda_graphs": trainer.graphs.summary() if trainer.graphs is not None
                          else {"off_reason": trainer.graphs_off}},
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
            if logs and "loss" in logs:   # the curve's columns, and each DDP process's own (rank<i>/...)
                tracker.log_metrics({k: v for k, v in logs.items()
                                     if (k in CURVE_COLUMNS and k != "step") or k.startswith("rank")},
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


def launched_on_several_processes(params: Params) -> bool:
    """With several devices (or hosts), run this stage under torchrun and wait for it: True when it did. Each rank
    then comes back to main() (ftpipe/model/distributed.py)."""
    if under_launcher():
        return False
    backend = resolve_backend(params.train.backend)
    processes = resolve_devices(params.train.devices, backend in GPU_BACKENDS)
    if processes == 1 and not multi_host():
        return False
    code = launch("stages.train", processes)
    if code:
        raise PipelineError(f"train: torchrun ended with exit code {code} (the ranks' errors are above); a rerun "
                            f"resumes from the last checkpoint")
    return True


def train_on_other_rank(params: Params, base_dir: Path) -> None:
    """A rank other than 0: trains its share of each step; writes nothing (no output, metrics or MLflow run)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ftpipe-rank-") as scratch:
        train_adapter(params.train, params.tokenize.max_seq_length, base_dir, TOKENIZED_DIR, CHECKPOINTS_DIR,
                      Path(scratch))


def main() -> None:
    base_dir = require_model_dir(BASE_DIR, "base model")
    if not under_launcher():   # once, before torchrun starts any rank
        # Before any training: llama.cpp's converter and runtime must support the architecture, or the quantize
        # stage would fail after it (ftpipe/model/architectures.py; Unsloth's line only informs)
        for line in require_supported_architecture(base_dir).lines():
            print(f"train: architecture {line}")
    params = load_params()
    if launched_on_several_processes(params):
        return
    if not is_main_process():
        return train_on_other_rank(params, base_dir)
    base_content = read_json(base_dir / CONTENT_FILE)
    with Stage("train", tracked_params, settings, system_metrics=True) as stage:
        params, tracker = stage.params, stage.tracker
        tracker.log_input(TOKENIZED_DIR / "train.parquet", "tokenized/train", "training")
        tracker.set_tags({"base.digest": base_content["digest"]})
        live = mlflow_callback(tracker, params.tracking.checkpoint_artifact_max_mib)
        with stage.output() as out_dir:
            result = train_adapter(params.train, params.tokenize.max_seq_length, base_dir, TOKENIZED_DIR,
                                   CHECKPOINTS_DIR, out_dir, callbacks=[live], mlflow_run_id=tracker.run_id)
            write_content_record(out_dir)
            quantization = params.train.quantization
            stage.record.update(
                metrics=result["metrics"], start=result["start"],
                trained_on={"base_digest": base_content["digest"], "base_dtype": base_content["dtype"],
                            "quantized_as": f"bitsandbytes {quantization.quant_type} 4-bit "
                                            f"(double quant: {quantization.double_quant}) of {BASE_DIR}"},
                data_sha256=file_hashes(TOKENIZED_DIR))
        start, metrics = result["start"], result["metrics"]
        plan = metrics["training_plan"]
        # how the steps ran: the plan and why (the memory probe, each fallback), beside the run's numbers
        tracker.set_tags({"train.plan": plan["description"],
                          "train.plan.micro_batch_size": str(plan["final"]["micro_batch_size"]),
                          "train.plan.recomputed_layers": str(plan["final"]["recomputed"]),
                          "train.plan.offloaded_layers": str(plan["final"]["offloaded"])})
        tracker.log_dict(plan, "train/training_plan.json")
        tracker.set_tags({"ftpipe.run_fingerprint": metrics["run_fingerprint"],
                          "ftpipe.resumed": str(bool(start.get("resumed_from_checkpoint"))).lower(),
                          "ftpipe.reused_completed_run": str(metrics["reused_completed_run"]).lower()})
        if start.get("resumed_from_checkpoint"):
            tracker.set_tags({"ftpipe.resumed_from_checkpoint": start["resumed_from_checkpoint"],
                              "ftpipe.resumed_from_run": str(start.get("mlflow_run_id"))})
        atomic_write_text(PLOTS_DIR / "train_loss.csv", curve_csv(result["curve"]))
        for row in result["curve"]:   # the steps a resumed (or reused) run took before this process
            if row["step"] not in live.logged_steps:
                tracker.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
        stage.finish(metrics, log=run_totals(metrics))
        tracker.log_artifact(ADAPTER_DIR, "adapter")
    m = metrics
    print(f"train: {m['steps']} steps, final loss {m['final_loss']:.4f}"
          + (f", {m['useful_tokens_per_s']} useful tokens/s ({m['useful_token_share']:.0%} of the "
             f"{m['tokens_per_s']} computed)" if "tokens_per_s" in m else "")
          + (f", peak {m['peak_memory_gib']} GiB" if "peak_memory_gib" in m else "")
          + (f", MFU {m['mfu']:.1%}" if "mfu" in m else "") + f" -> {ADAPTER_DIR}/")


if __name__ == "__main__":
    run_stage(main)
