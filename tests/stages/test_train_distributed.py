"""Stage `train` on several processes (DDP through torchrun, gloo on the CPU): `python -m stages.train` with
train.devices: 2 runs itself under torchrun, each process takes half of every step's rows, and the run trains the
numbers of one process with the same batch; only rank 0 writes outputs, metrics and the one MLflow run; a run
interrupted on one process count resumes on another; two "hosts" (two torchrun launches with --nnodes 2) join
through torchrun's rendezvous. The GPU runs are in bench/ (issue 18)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftpipe.core.io import read_json
from tests.model_fixtures import TOKENIZE, TRAIN, train_tiny

REPO = Path(__file__).resolve().parents[2]
# float32 on the CPU: the processes' gradients are summed in another order than one process's (gloo all-reduce)
LOSS_TOLERANCE = 1e-4


def new_project(folder: Path, tiny_base: Path, tiny_data) -> Path:
    """A project with the tiny base and data, params.yaml's train section set to TRAIN (train_tiny's run), and an
    MLflow store of its own."""
    shutil.copytree(tiny_base, folder / "models/base")
    shutil.copytree(tiny_data[1], folder / "data/tokenized")
    write_train_params(folder, devices="auto")
    return folder


@pytest.fixture
def project(tmp_path, tiny_base, tiny_data) -> Path:
    return new_project(tmp_path / "project", tiny_base, tiny_data)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_base, tiny_data) -> tuple[Path, str]:
    """One run with train.devices: 2 (its project and output), shared by the tests that read it."""
    folder = new_project(tmp_path_factory.mktemp("ddp") / "project", tiny_base, tiny_data)
    write_train_params(folder, devices=2)
    return folder, finished(run_stage(folder))


def write_train_params(project: Path, **train) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenize"]["max_seq_length"] = TOKENIZE.max_seq_length
    params["train"] = {**dataclasses.asdict(TRAIN), **train}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_stage(project: Path, **env) -> subprocess.Popen:
    """`python -m stages.train` in the project, as dvc repro runs it (the repository's code on the path)."""
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                 "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", **env})


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    return output


def losses(project: Path) -> list[float]:
    lines = (project / "metrics/plots/train_loss.csv").read_text().splitlines()
    column = lines[0].split(",").index("loss")
    return [float(line.split(",")[column]) for line in lines[1:]]


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_training(project: Path, reference: dict) -> None:
    """The curve and the adapter of train_tiny's one-process run with the same batch."""
    import torch

    assert losses(project) == pytest.approx([row["loss"] for row in reference["result"]["curve"]], rel=LOSS_TOLERANCE)
    tensors, expected = adapter_tensors(project / "models/adapter"), adapter_tensors(reference["adapter"])
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(tensors[name], tensor, rtol=1e-3, atol=1e-5, msg=name)


def train_runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ftpipe")
    return client.search_runs([experiment.experiment_id], "tags.`ftpipe.stage` = 'train'"), client


def test_two_processes_train_the_numbers_of_one_and_rank_0_alone_records_them(two_process_run, tiny_trained):
    project, output = two_process_run
    assert "train: 2 processes on this host, DDP through torchrun: -m torch.distributed.run --standalone " \
           "--nproc_per_node=2 -m stages.train" in output
    assert_same_training(project, tiny_trained)
    metrics = read_json(project / "metrics/train.json")
    assert metrics["processes"] == 2
    # each process ran its half of each step's rows: 2 of the 4
    assert metrics["training_plan"]["final"]["micro_batch_size"] == TRAIN.batch_size // 2
    assert metrics["training_plan"]["description"] == "micro-batch 2 (the whole batch), no recomputation"
    reference = tiny_trained["result"]["curve"]
    curve = read_json(project / "models/checkpoints" / metrics["run_fingerprint"] / "completed/result.json")["curve"]
    assert [row["useful_tokens"] for row in curve] == [row["useful_tokens"] for row in reference]   # all ranks'
    (run,), client = train_runs(project)   # one MLflow run, by rank 0
    history = client.get_metric_history(run.info.run_id, "rank1/tokens")
    assert len(history) == TRAIN.max_steps and all(point.value > 0 for point in history)
    assert sorted(path.name for path in (project / "models").iterdir()) == ["adapter", "base", "checkpoints"]


def assert_resumes_on(project: Path, processes: int, reference: dict) -> None:
    """The stage on `processes` processes resumes the run from its checkpoint-2 and ends where one uninterrupted
    process ends."""
    write_train_params(project, devices=processes)
    finished(run_stage(project))
    metrics = read_json(project / "metrics/train.json")
    assert (metrics["resumed_from"], metrics["processes"]) == ("checkpoint-2", processes)
    assert_same_training(project, reference)


def test_a_run_interrupted_on_one_process_resumes_on_two(project, tiny_trained):
    from tests.stages.test_train import interrupt_at

    with pytest.raises(KeyboardInterrupt):
        train_tiny(TRAIN, project / "models/base", project / "data/tokenized", project / "models/checkpoints",
                   project / "interrupted", [interrupt_at(3)])
    shutil.rmtree(project / "interrupted")
    assert_resumes_on(project, 2, tiny_trained)


def test_a_run_interrupted_on_two_processes_resumes_on_one(two_process_run, tmp_path, tiny_trained):
    project = tmp_path / "project"
    shutil.copytree(two_process_run[0], project, symlinks=True)
    (project / "mlflow.db").unlink()
    run_dir = next((project / "models/checkpoints").iterdir())
    for name in ("completed", "checkpoint-4", "checkpoint-6"):   # as if killed after checkpoint-2
        shutil.rmtree(run_dir / name)
    shutil.rmtree(project / "models/adapter")
    assert_resumes_on(project, 1, tiny_trained)


def test_two_hosts_join_through_torchrun_rendezvous(project, tiny_trained):
    """Two torchrun launches with --nnodes 2 (PET_NNODES), one process each, on one machine: the first "host" (node
    rank 0) runs the stage as dvc repro would, the second the same command; they meet at PET_MASTER_ADDR:PORT."""
    write_train_params(project, devices=1)
    rendezvous = {"PET_NNODES": "2", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    hosts = [run_stage(project, **rendezvous, PET_NODE_RANK=str(node)) for node in (0, 1)]
    outputs = [finished(host) for host in hosts]
    assert all("train: 1 processes on this host, DDP through torchrun: -m torch.distributed.run "
               "--nproc_per_node=1 -m stages.train" in output for output in outputs)
    assert read_json(project / "metrics/train.json")["processes"] == 2
    assert_same_training(project, tiny_trained)
    runs, _ = train_runs(project)
    assert len(runs) == 1
