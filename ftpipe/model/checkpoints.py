"""The checkpoints of training runs, in models/checkpoints/<fingerprint>/: what identifies a run (its
fingerprint), who started its folder, which checkpoint to resume, the finished run kept for reuse
(completed/), and the removal of other runs' folders beyond train.checkpoint_runs_kept.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import ftpipe.model.lora as lora_module
import ftpipe.model.modeling as modeling_module
import ftpipe.model.training as training_module
import ftpipe.model.training_plan as training_plan_module
from ftpipe.core.io import (
    CONTENT_FILE,
    atomic_dir,
    file_hashes,
    read_json,
    sha256_file,
    sha256_text,
    tree_digest,
    write_json,
)
from ftpipe.core.params import TrainParams, flatten
from ftpipe.core.paths import PROVENANCE_FILE
from ftpipe.core.provenance import package_version

# Params that change no number of the result: how often checkpoints are written and how many old runs' are
# kept. They are left out of the fingerprint (a resume is the same run) and out of dvc.yaml (no rerun).
# The training plan's params too (ftpipe/model/training_plan.py): a step's gradient is the whole batch's however
# it is split and whatever is recomputed; a run resumed under another plan continues the same numbers (up to
# the order of floating-point sums).
# CUDA graphs replay the same kernels on the same inputs (ftpipe/model/cuda_graphs.py).
# So is the number of devices: the processes share each step's rows and sum their gradients (DDP), so a run
# interrupted on N GPUs resumes on M.
RESULT_NEUTRAL = ("checkpoint_every", "checkpoint_runs_kept", "gradient_checkpointing", "micro_batch_size",
                  "devices", "cuda_graphs")
# Params whose value is resolved on the machine ('auto'): the fingerprint holds the resolved value instead
# (backend: unsloth, transformers or cpu; compute dtype: bfloat16 on a GPU, float32 on the CPU).
RESOLVED = ("backend", "quantization.compute_dtype")
# Packages whose version changes a step's numbers: a checkpoint is resumed only under the same ones.
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "unsloth", "unsloth-zoo")
# The files holding the code of a training step (seed, model, trainer, collator, backends), of the layers LoRA
# adapts and of its batches (padding, packing, loss): the fingerprint hashes them.
STEP_CODE = (Path(training_module.__file__), Path(lora_module.__file__), Path(modeling_module.__file__),
             Path(training_plan_module.__file__))
RUN_FILE = "run.json"              # in a checkpoint folder: which MLflow run started it, and when
COMPLETED_DIR = "completed"        # in a checkpoint folder: the finished run's adapter and result.json
RESULT_FILE = "result.json"


def fingerprint(params: TrainParams, max_seq_length: int, base_dir: Path, tokenized_dir: Path, backend: str,
                compute_dtype: str) -> str:
    """Identity of a training run: what can change its numbers. Params (less RESULT_NEUTRAL ones, with
    'auto' values resolved: a run started on the CPU never resumes on a GPU, nor one started with transformers
    + peft on a GPU under Unsloth once it is installed: their steps differ), the base weights, the training
    data, the code of the step, of its LoRA targets and of its batches (STEP_CODE: ftpipe/model/training.py,
    lora.py and modeling.py; editing stages/train.py or another helper changes no fingerprint) and the
    numeric packages' versions. Checkpoints are only resumed by a run with the same fingerprint: a checkpoint
    written by other code may hold a different optimizer state or per-step log."""
    numbers = {key: value for key, value in flatten(params).items() if key not in RESULT_NEUTRAL + RESOLVED}
    base = read_json(base_dir / CONTENT_FILE)["digest"]
    data = tree_digest(file_hashes(tokenized_dir, exclude=(PROVENANCE_FILE,)))
    code = [sha256_file(path) for path in STEP_CODE]   # the step and the batches
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


def last_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint-<step> folder of a run (the one a rerun resumes from); None if there is none."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def run_completed(checkpoint: Path) -> bool:
    """Whether the run had taken all its steps when it wrote this checkpoint."""
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

