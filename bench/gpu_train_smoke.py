"""Run the `train` stage on a CUDA GPU (Unsloth backend), interrupt it after its first
checkpoint, rerun it, and record that it resumed. Writes bench/results/gpu_train_smoke.json.

No model can be downloaded on the GPU machine and the embedded GGUF (94 MiB) does not fit the
64 MiB that travels there, so models/base/ is built on the spot: the embedded model's own config
and tokenizer (carried in .gpu-payload/base-skeleton, made by `--prepare` here) with random
weights. Speed and memory are those of the real SmolLM2-135M; the loss is not.

    # here (CPU): build the carried folders
    bash ../shared/gpu/make-gpu-site.sh && python bench/gpu_train_smoke.py --prepare
    # on the GPU machine (device tool), carrying .gpu-site and .gpu-payload:
    PYTHONPATH=$PWD/.gpu-site:$PWD python3 bench/gpu_train_smoke.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SKELETON = Path(".gpu-payload/base-skeleton")
SMOKE_PARAMS = {"max_steps": 60, "checkpoint_every": 20, "batch_size": 8}


def prepare() -> None:
    """CPU side: the embedded model's config + tokenizer, without weights."""
    from stages.base import embedded_gguf, load_embedded

    model, tokenizer = load_embedded(embedded_gguf()[0], "bfloat16")
    shutil.rmtree(SKELETON, ignore_errors=True)
    SKELETON.mkdir(parents=True)
    model.config.save_pretrained(SKELETON)
    model.generation_config.save_pretrained(SKELETON)
    tokenizer.save_pretrained(SKELETON)
    print(f"wrote {SKELETON}: {sorted(p.name for p in SKELETON.iterdir())}")


def build_random_base() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftpipe.core.io import write_content_record, write_json

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SKELETON), dtype=torch.bfloat16)
    base = Path("models/base")
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(SKELETON, base)
    model.save_pretrained(base)
    record = write_content_record(base, source={"kind": "random-init", "config": "SmolLM2-135M-Instruct"},
                                  dtype="bfloat16")
    write_json(base / "provenance.json", record)


def set_train_params() -> None:
    import yaml

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"].update(SMOKE_PARAMS)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage(name: str, log: Path, stop_at_checkpoint: str | None = None) -> dict:
    """Run one stage; with stop_at_checkpoint, send it Ctrl-C as soon as that checkpoint exists."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], stdout=out, stderr=subprocess.STDOUT)
        while stop_at_checkpoint and proc.poll() is None:
            if list(Path("models/checkpoints").glob(f"*/{stop_at_checkpoint}/trainer_state.json")):
                time.sleep(2)   # let the checkpoint finish writing
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.5)
        code = proc.wait()
    return {"stage": name, "exit": code, "seconds": round(time.time() - started, 1),
            "log_tail": log.read_text()[-1500:]}


def system_metrics_of_pending_records(out: Path) -> dict:
    """The GPU machine has no MLflow: each train run's whole record, system metrics included, is in
    mlflow-pending/. Copies the resumed run's record to `out` and summarizes its samples."""
    records = sorted(Path("mlflow-pending").glob("train-*.json"))
    if not records:
        return {"samples": 0, "max": {}, "record": None}
    shutil.copy2(records[-1], out / "train-mlflow-pending.json")
    ops = json.loads(records[-1].read_text())["ops"]
    samples = [op["metrics"] for op in ops
               if op["op"] == "metrics" and any(k.startswith("system/") for k in op["metrics"])]
    keys = sorted({key for sample in samples for key in sample})
    return {"samples": len(samples), "record": "train-mlflow-pending.json",
            "max": {key: max(sample[key] for sample in samples if key in sample) for key in keys},
            "first": samples[0] if samples else None, "last": samples[-1] if samples else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="CPU side: write .gpu-payload/base-skeleton")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if args.prepare:
        return prepare()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    build_random_base()
    set_train_params()
    runs = [stage(name, args.out / f"{name}.log") for name in ("ingest", "clean", "tokenize")]
    runs.append(stage("train", args.out / "train-interrupted.log", stop_at_checkpoint="checkpoint-20"))
    runs.append(stage("train", args.out / "train-resumed.log"))
    metrics = json.loads(Path("metrics/train.json").read_text()) if Path("metrics/train.json").exists() else None
    curve = Path("metrics/plots/train_loss.csv").read_text().splitlines() if metrics else []
    from ftpipe.core.provenance import environment

    system = system_metrics_of_pending_records(args.out)

    result = {
        "what": "train stage on CUDA via Unsloth: interrupted after checkpoint-20, rerun resumes",
        "params": SMOKE_PARAMS, "environment": environment(), "gpu": torch.cuda.get_device_name(0),
        "runs": runs, "train_metrics": metrics, "curve_head": curve[:4], "curve_tail": curve[-3:],
        "checks": {
            "interrupted_run_exit_130": runs[3]["exit"] == 130,
            "resumed_run_exit_0": runs[4]["exit"] == 0,
            "backend_unsloth": bool(metrics) and metrics["backend"] == "unsloth",
            "resumed_from_checkpoint": bool(metrics) and bool(metrics["resumed_from"]),
            "all_steps_in_curve": len(curve) - 1 == SMOKE_PARAMS["max_steps"],
            "adapter_written": Path("models/adapter/adapter_model.safetensors").exists(),
            "gpu_system_metrics_sampled": (system["samples"] > 0
                                           and "system/gpu_0_utilization_percentage" in system["max"]),
        },
        "system_metrics": system,
    }
    (args.out / "gpu_train_smoke.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result["checks"], indent=2), json.dumps(metrics, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
