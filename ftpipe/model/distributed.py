"""Training on several GPUs (or CPU processes) with DDP, launched by torchrun.

With train.devices above 1, `python -m stages.train` (what `dvc repro` runs) starts torchrun on itself: one process
per device (`--nproc_per_node`), each rank on its own GPU (LOCAL_RANK) with the 4-bit model loaded there; the
transformers Trainer (through accelerate) wraps the model in DistributedDataParallel and shards each step's rows
among the ranks. Only rank 0 writes outputs, checkpoints, metrics and the MLflow record.

Several hosts use torchrun's own rendezvous, configured by its PET_* environment variables (torchrun reads every
option from PET_<OPTION>): on every host, PET_NNODES (hosts), PET_RDZV_ENDPOINT (host:port of the first host) and
the same PET_RDZV_ID; the first host runs `dvc repro`, the others `python -m stages.train` on the same project.
Without PET_NNODES, one host: `--standalone`.

torch is imported inside the functions, as everywhere in ftpipe.model.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from ftpipe.core.errors import PipelineError

MULTI_HOST_ENV = ("PET_NNODES", "PET_RDZV_ENDPOINT")


def under_launcher() -> bool:
    """Is this process a rank that torchrun started?"""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if under_launcher() else 1


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if under_launcher() else 0


def is_main_process() -> bool:
    return rank() == 0


def resolve_devices(requested: int | str, on_gpu: bool) -> int:
    """train.devices on this machine: auto is every visible GPU, or 1 on the CPU; a number above the visible GPUs is
    an error naming them (on the CPU a number is that many processes, for tests and for CPUs with many cores)."""
    if not on_gpu:
        return 1 if requested == "auto" else int(requested)
    import torch

    visible = torch.cuda.device_count()
    if requested == "auto":
        return max(visible, 1)
    if int(requested) > visible:
        raise PipelineError(f"params.yaml train.devices is {requested}, but {visible} GPU(s) are visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                            f"Set train.devices: auto (every visible GPU) or at most {visible}.")
    return int(requested)


def per_process_rows(batch_size: int, processes: int) -> int:
    """Each process's rows of a step: the batch shared evenly, or an error naming the keys."""
    if batch_size % processes:
        raise PipelineError(f"params.yaml train.batch_size is {batch_size}, which {processes} processes "
                            f"(train.devices x hosts) cannot share evenly; set it to a multiple of {processes}, "
                            f"e.g. {batch_size + processes - batch_size % processes}.")
    return batch_size // processes


def multi_host() -> bool:
    """Is torchrun's multi-host rendezvous configured (PET_NNODES or PET_RDZV_ENDPOINT set)?"""
    return any(os.environ.get(name) for name in MULTI_HOST_ENV)


def torchrun_command(module: str, processes: int) -> list[str]:
    rendezvous = [] if multi_host() else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={processes}",
            "-m", module]


def launch(module: str, processes: int) -> int:
    """Run `python -m module` under torchrun with `processes` ranks on this host and wait; Ctrl-C and SIGTERM reach
    every rank (torchrun forwards them). Returns torchrun's exit code."""
    command = torchrun_command(module, processes)
    print(f"train: {processes} processes on this host, DDP through torchrun: {' '.join(command[1:])}", flush=True)
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    try:
        return process.wait()
    except KeyboardInterrupt:   # torchrun got the same SIGINT from the terminal; let it stop its ranks
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def gather(value):
    """`value` from every rank, in rank order (a list of one outside DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
