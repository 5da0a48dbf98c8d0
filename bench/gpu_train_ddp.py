"""The train stage on several GPUs of one host (DDP through torchrun, issue 18) against one GPU: tokens/s with the
same per-GPU micro-batch, and the loss curve against one GPU with the same effective batch.

Runs `python -m stages.train` itself, in a project folder beside the repository (params.yaml with the benchmark's
train section; models/base and data/tokenized linked to a random-initialized Llama and rows of random tokens built by
bench/gpu_train_plan.py), as `dvc repro` would:
  1 GPU   train.devices: 1, batch_size = --micro x N, micro_batch_size --micro (N micro-batches accumulated)
  N GPUs  train.devices: N, the same batch_size and micro_batch_size (each GPU one micro-batch of --micro rows)
Both train the same numbers; the N-GPU run computes N micro-batches at once. Speed-up = N-GPU tokens/s over 1-GPU.

    # here (CPU): the payload, as for bench/gpu_families.py
    bash ../shared/gpu/make-gpu-site.sh && .venv/bin/python bench/gpu_pipeline_8b.py --prepare && \\
        .venv/bin/python bench/gpu_families.py --prepare
    .venv/bin/python bench/gpu_train_ddp.py --cpu-smoke --out /tmp/ddp-smoke   # a dry run: 2 CPU processes
    # on a machine with N GPUs (device tool, kind nvidia-h200-x2/x4/x8), carrying .gpu-payload:
    python3 bench/gpu_train_ddp.py --gpus 2 --out $OUT        # then --gpus 4, 8 where lent
Writes gpu_train_ddp.json (commit it as bench/results/gpu_train_ddp.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train_plan as plan_bench  # noqa: E402 - the models, the data and the train params every bench shares


def gpu_environment() -> dict:
    """The Unsloth site, the wheels and llama.cpp's converter (the stage checks the architecture with it), installed
    as bench/gpu_families.py does, once per machine."""
    import gpu_families

    base = gpu_families.root()
    if not (base / "site").exists():
        gpu_families.install(base)
    return gpu_families.environment(base)


def project(root: Path, name: str, model_dir: Path, data_dir: Path, train: dict) -> Path:
    """A project folder for one run: params.yaml with `train`, the model and data linked in."""
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "models").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "models/base").symlink_to(model_dir)
    (folder / "data/tokenized").symlink_to(data_dir)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"] = train
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def run(folder: Path, env: dict, steps: int, warmup: int) -> dict:
    started = time.time()
    with open(folder / "train.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "stages.train"], cwd=folder, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    entry = {"exit": code, "wall_seconds": round(time.time() - started, 1)}
    if code != 0:
        return {**entry, "log_tail": (folder / "train.log").read_text(errors="replace")[-4000:]}
    from ftpipe.model.training import throughput

    metrics = json.loads((folder / "metrics/train.json").read_text())
    run_dir = folder / "models/checkpoints" / metrics["run_fingerprint"]
    curve = json.loads((run_dir / "completed/result.json").read_text())["curve"]
    return {**entry, **throughput(curve, skip_first=warmup), "processes": metrics["processes"],
            "training_plan": metrics["training_plan"]["description"],
            "losses": [round(row["loss"], 5) for row in curve], "steps": len(curve)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="8b")
    parser.add_argument("--micro", type=int, default=4, help="rows per GPU per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--cpu-smoke", action="store_true", help="2 CPU processes, a tiny model, a few steps")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.cpu_smoke:
        args.gpus, args.micro, args.steps, args.warmup, args.seq_len = 2, 2, 4, 1, 64
        os.environ["FTPIPE_TRAIN_PLAN_ROOT"] = str(args.out / "work")
    root = plan_bench.root()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)} if args.cpu_smoke else gpu_environment()
    model_dir, data_dir = root / f"model-{args.model}", root / f"data-{args.model}-ddp"
    smoke = ["--cpu-smoke"] if args.cpu_smoke else []
    if not (model_dir / "provenance.json").exists():
        subprocess.run([sys.executable, plan_bench.__file__, "--build", args.model, *smoke, "--seq-len",
                        str(args.seq_len)], env=env, check=True)
    batch = args.micro * args.gpus
    if not data_dir.exists():
        from ftpipe.model.modeling import load_tokenizer

        plan_bench.build_data(data_dir, batch * args.steps, args.seq_len, len(load_tokenizer(model_dir)))
    train = dataclasses.asdict(plan_bench.train_params(argparse.Namespace(cpu_smoke=args.cpu_smoke, batch=batch),
                                                       {"steps": args.steps}, "auto", args.micro))
    report = {"settings": {"model": args.model, "seq_len": args.seq_len, "micro_batch_per_gpu": args.micro,
                           "batch": batch, "steps": args.steps, "warmup": args.warmup}, "runs": {}}
    for name, devices in (("1gpu", 1), (f"{args.gpus}gpu", args.gpus)):
        folder = project(root, f"ddp-{name}", model_dir, data_dir, {**train, "devices": devices})
        report["runs"][name] = run(folder, env, args.steps, args.warmup)
        print(name, {k: report["runs"][name].get(k) for k in ("exit", "tokens_per_s", "training_plan")}, flush=True)
    one, many = report["runs"]["1gpu"], report["runs"][f"{args.gpus}gpu"]
    if one.get("tokens_per_s") and many.get("tokens_per_s"):
        report["speedup"] = round(many["tokens_per_s"] / one["tokens_per_s"], 3)
        report["largest_loss_difference"] = round(max(abs(a - b) for a, b in zip(one["losses"], many["losses"])), 5)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_train_ddp.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({k: report.get(k) for k in ("speedup", "largest_loss_difference")}))


if __name__ == "__main__":
    main()
