"""ftpipe.tracking.runs and the record stage: each executed stage is a child run (params, metrics,
artifacts, dataset inputs, git commit, environment pins) of its invocation's pipeline run; the
record stage closes the pipeline run, records skipped stages with the run that produced their
outputs, and names the run after what changed. Without MLflow a stage goes on and keeps its record."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from ftpipe.tracking.runs import INVOCATION, KIND, PARENT, STAGE, invocation_key, short_param, stage_run
from stages.record import close_pipeline_run, describe_changes, flat_params, outs_digest


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store in tmp_path; the code runs in tmp_path as in a project."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return MlflowClient(uri)


def runs(client, kind: str, invocation: str | None = None):
    experiment = client.get_experiment_by_name("ftpipe").experiment_id
    query = f"tags.`{KIND}` = '{kind}'" + (f" and tags.`{INVOCATION}` = '{invocation}'" if invocation else "")
    return client.search_runs([experiment], query, order_by=["attributes.start_time ASC"])


LOCK = {"ingest": {"cmd": "python -m stages.ingest", "outs": [{"path": "data/raw", "md5": "1111.dir"}]},
        "train": {"cmd": "python -m stages.train", "outs": [{"path": "models/adapter", "md5": "2222.dir"}]}}


def test_a_stage_run_records_params_metrics_artifacts_inputs_and_environment(store, tmp_path, monkeypatch):
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:1:1")
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": 1}\n{"id": 2}\n\n{"id": 3}\n')
    with stage_run("demo", {"demo.rate": 0.5, "demo.modules": ["q_proj", "v_proj"]}) as tracker:
        tracker.log_metrics({"loss": 2.5, "label": "not a number"}, step=1)
        tracker.log_metrics({"loss": 2.0}, step=2)
        tracker.log_artifact(data, "data")
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        tracker.log_artifact(tmp_path / "adapter")
        tracker.log_input(data, "clean/train", "training")
    (parent,) = runs(store, "pipeline")
    (run,) = runs(store, "stage")
    assert run.info.status == "FINISHED" and parent.info.status == "RUNNING"   # record closes it
    assert run.data.tags[PARENT] == parent.info.run_id and run.data.tags[STAGE] == "demo"
    assert run.data.params == {"demo.rate": "0.5", "demo.modules": '["q_proj", "v_proj"]'}
    assert [m.value for m in store.get_metric_history(run.info.run_id, "loss")] == [2.5, 2.0]
    assert "label" not in run.data.metrics
    assert "git.commit" in run.data.tags and run.data.tags["env.python"] == sys.version.split()[0]
    assert run.data.tags["env.torch"] and run.data.tags["env.mlflow"]
    # llama.cpp: the package, and the vendored commit and CMake flags tools/build_llama_cpp.py built it with
    assert run.data.tags["env.llama-cpp-python"] == "0.3.36"
    assert run.data.tags["env.llama_cpp_commit"] == "0c1e57098"
    assert run.data.tags["env.llama_cpp_cmake_args"] == "-DGGML_NATIVE=OFF"
    # the instruction sets that choose the matrix kernels (bf16 results differ between CPU types)
    from ftpipe.core.provenance import NUMERIC_CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    assert run.data.tags["env.cpu_flags"] == " ".join(flags) and set(flags) <= set(NUMERIC_CPU_FLAGS)
    cpuinfo = open("/proc/cpuinfo").read()
    assert ("avx2" in flags) == (" avx2" in cpuinfo) and ("amx_bf16" in flags) == (" amx_bf16" in cpuinfo)
    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"data", "adapter", "environment"} <= artifacts
    freeze = store.download_artifacts(run.info.run_id, "environment/pip-freeze.txt", str(tmp_path / "dl"))
    assert any(line.startswith("torch==") for line in open(freeze))
    (dataset_input,) = run.inputs.dataset_inputs
    from ftpipe.core.io import sha256_file

    assert dataset_input.dataset.name == "clean/train" and dataset_input.dataset.digest == sha256_file(data)[:32]
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    assert tags["sha256"] == sha256_file(data) and tags["rows"] == "3" and tags["mlflow.data.context"] == "training"


def test_a_failing_stage_closes_its_run_and_its_pipeline_run_as_failed(store, monkeypatch):
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:2:2")
    with pytest.raises(ValueError):
        with stage_run("broken", {}):
            raise ValueError("boom")
    (run,) = runs(store, "stage")
    (parent,) = runs(store, "pipeline")
    assert run.info.status == "FAILED" and parent.info.status == "FAILED"
    assert parent.data.tags["mlflow.runName"] == "failed at broken"


def test_runs_left_running_by_a_killed_invocation_are_ended_by_the_next(store, monkeypatch):
    """SIGKILL runs no cleanup: the stage run and its pipeline run stay RUNNING. The next invocation on this
    host sees that their process is gone and ends them as KILLED, saying by whom; a live one is kept."""
    import socket

    from ftpipe.tracking.runs import StageTracker

    dead = f"{socket.gethostname()}:{2**22 + 7}:1"   # above the default pid_max: no such process
    monkeypatch.setenv("FTPIPE_INVOCATION", dead)
    killed = StageTracker("train", {})
    killed.start()   # never ended, as when the process is killed
    import psutil

    monkeypatch.setenv("FTPIPE_INVOCATION",
                       f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time())}")
    alive = StageTracker("ingest", {})
    alive.start()   # this process: alive, must be kept RUNNING
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:9:9")
    with stage_run("base", {}):
        pass
    (old_stage,) = runs(store, "stage", dead)
    (old_pipeline,) = runs(store, "pipeline", dead)
    assert old_stage.info.status == old_pipeline.info.status == "KILLED"
    assert "the process of " + dead + " was gone" in old_stage.data.tags["ftpipe.ended_by"]
    assert old_pipeline.data.tags["mlflow.runName"].startswith("killed (")
    assert store.get_run(alive.run_id).info.status == "RUNNING"
    alive.end("FINISHED")


def test_stages_of_one_invocation_share_one_pipeline_run(store, monkeypatch):
    for invocation in ("host:3:3", "host:3:3", "host:4:4"):
        monkeypatch.setenv("FTPIPE_INVOCATION", invocation)
        with stage_run("ingest", {}):
            pass
    assert len(runs(store, "pipeline")) == 2
    (first, _), (second,) = runs(store, "stage", "host:3:3"), runs(store, "stage", "host:4:4")
    assert first.data.tags[PARENT] != second.data.tags[PARENT]


def test_record_closes_the_pipeline_run_links_skipped_stages_and_names_the_change(store, tmp_path, monkeypatch):
    # run 1: both stages execute
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:5:5")
    for stage in ("ingest", "train"):
        with stage_run(stage, {f"{stage}.x": 1}) as tracker:
            tracker.log_metrics({"loss": 3.0 if stage == "train" else 1.0})
    first = close_pipeline_run("host:5:5", ["ingest", "train"], LOCK, {"train": {"lr": 0.1}}, {"params.yaml": "x"})
    assert first["name"] == "first run" and first["executed"] == ["ingest", "train"] and first["skipped"] == {}
    # run 2: only train executes (new lr); ingest is skipped, its outputs unchanged
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:6:6")
    with stage_run("train", {"train.x": 1}) as tracker:
        tracker.log_metrics({"loss": 2.0})
    lock = {**LOCK, "train": {**LOCK["train"], "outs": [{"path": "models/adapter", "md5": "3333.dir"}]}}
    second = close_pipeline_run("host:6:6", ["ingest", "train"], lock, {"train": {"lr": 0.2}}, {"params.yaml": "y"})
    ingest_run = runs(store, "stage", "host:5:5")[0]
    assert second["name"] == "train.lr=0.2 (was 0.1)"
    assert second["skipped"] == {"ingest": ingest_run.info.run_id}

    parent = store.get_run(second["pipeline_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"] == "train.lr=0.2 (was 0.1)"
    assert parent.data.params["train.lr"] == "0.2"
    assert parent.data.metrics == {"ingest.loss": 1.0, "train.loss": 2.0}
    assert (parent.data.tags["stages.executed"], parent.data.tags["stages.skipped"]) == ("train", "ingest")
    skipped = {run.data.tags[STAGE]: run for run in runs(store, "stage", "host:6:6")}["ingest"]
    assert skipped.data.tags["ftpipe.produced_by"] == ingest_run.info.run_id
    assert skipped.data.params == {"ingest.x": "1"} and skipped.data.metrics == {"loss": 1.0}
    entry = store.download_artifacts(skipped.info.run_id, "dvc/lock-entry.json", str(tmp_path / "dl"))
    assert json.loads(open(entry).read()) == LOCK["ingest"]
    files = {a.path for a in store.list_artifacts(parent.info.run_id, "pipeline")}
    assert files == {"pipeline/params.yaml"}

    # run 3: nothing executes
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:7:7")
    third = close_pipeline_run("host:7:7", ["ingest", "train"], lock, {"train": {"lr": 0.2}}, {})
    assert third["name"] == "nothing changed" and set(third["skipped"]) == {"ingest", "train"}
    assert third["skipped"]["train"] == runs(store, "stage", "host:6:6")[0].info.run_id


def test_describe_changes():
    assert describe_changes({"a": "1"}, None, ["x"]) == "first run"
    assert describe_changes({"a": "2", "b": "x"}, {"a": "1"}, []) == "a=2 (was 1); b=x (new)"
    assert describe_changes({"a": "1"}, {"a": "1"}, ["clean", "train"]) == \
        "same params, reran clean, train (code or data changed)"
    many = {k: "2" for k in "abcde"}
    assert describe_changes(many, {k: "1" for k in "abcde"}, [], "fuzzy-cat") == \
        "exp fuzzy-cat: a=2 (was 1); b=2 (was 1); c=2 (was 1) +2 more"
    assert describe_changes({"a": "1"}, {"a": "1"}, ["train"], reproduces="0123456789abcdef") == "reproduces 01234567"
    # compared as MLflow stores them: a value past its 6000-character cap is stored cut, and still unchanged
    long_list = [f"source-{i}" for i in range(1000)]
    assert describe_changes({"a": long_list}, {"a": short_param(long_list)}, []) == "nothing changed"
    assert describe_changes({"a": 0.001}, {"a": "0.0005"}, []) == "a=0.001 (was 0.0005)"


def test_flat_params_and_outs_digest():
    assert flat_params({"ingest": {"sources": [{"name": "a", "max_rows": None}]}, "train": {"lora": {"r": 8},
                        "modules": ["q", "v"]}}) == {"ingest.sources.0.name": "a", "ingest.sources.0.max_rows": None,
                                                     "train.lora.r": 8, "train.modules": ["q", "v"]}
    assert outs_digest(LOCK["ingest"]) == outs_digest({"outs": [{"path": "data/raw", "md5": "1111.dir"}]})
    assert outs_digest(LOCK["ingest"]) != outs_digest(LOCK["train"]) and outs_digest({}) is None


def test_invocation_key_is_the_dvc_ancestor(monkeypatch):
    import os
    import subprocess

    from tests.conftest import REPO

    monkeypatch.delenv("FTPIPE_INVOCATION", raising=False)
    assert invocation_key().split(":")[1] == str(os.getpid())   # no dvc above pytest: this process alone
    # A stage is a grandchild of `dvc repro` (dvc -> sh -> python): here a shell whose argv[0] is "dvc".
    script = "from ftpipe.tracking.runs import invocation_key; print(invocation_key())"
    done = subprocess.run(["dvc", "-c", f"echo $$; {sys.executable} -c '{script}'"], executable="/bin/bash",
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    dvc_pid, key = done.stdout.split()
    assert key.split(":")[1] == dvc_pid


def test_without_mlflow_the_stage_goes_on_and_keeps_its_record(in_tmp_project, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)   # `import mlflow` now raises ImportError
    with stage_run("offline", {"offline.x": 1}) as tracker:
        tracker.log_metrics({"loss": 1.5}, step=3)
    assert capsys.readouterr().err.count("MLflow unavailable") == 1
    (pending,) = (in_tmp_project / "mlflow-pending").glob("offline-*.json")
    record = json.loads(pending.read_text())
    assert record["status"] == "FINISHED" and record["run_id"] is None
    ops = record["ops"]
    assert ops[0] == {"op": "params", "params": {"offline.x": 1}}
    (metrics,) = [op for op in ops if op["op"] == "metrics"]
    assert (metrics["step"], metrics["metrics"], metrics["timestamp"] > 0) == (3, {"loss": 1.5}, True)
    assert ops[-1] == {"op": "end", "status": "FINISHED"} and record["started_at"] <= record["ended_at"]


def test_the_gpu_is_described_at_the_end_when_torch_was_loaded_during_the_stage(store, monkeypatch):
    """Stages import torch lazily, after their run started: the CUDA and GPU pins are added at the end."""
    import ftpipe.tracking.runs as tracking

    monkeypatch.setenv("FTPIPE_INVOCATION", "host:8:8")
    cpu_only = tracking.environment()
    gpu = {**cpu_only, "torch_cuda": "13.0",
           "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "count": 1, "driver": "580.159.04"}}
    with stage_run("train", {}):
        import torch  # noqa: F401 - what the stage's work loads

        monkeypatch.setattr(tracking, "environment", lambda: gpu)   # as if torch found the GPU meanwhile
    (run,) = runs(store, "stage")
    assert run.data.tags["env.gpu"] == "NVIDIA H100 80GB HBM3" and run.data.tags["env.torch_cuda"] == "13.0"
    assert run.data.tags["env.nvidia_driver"] == "580.159.04" and run.data.tags["env.gpu_memory_gib"] == "79.2"


def test_system_metrics_reach_the_stage_run_and_without_mlflow_its_pending_record(store, tmp_path, monkeypatch,
                                                                                  capsys):
    """The sampler logs into the stage's run; with no MLflow (the GPU machine) into mlflow-pending/,
    GPU metrics included (a fake nvidia-smi on PATH stands in for the driver's)."""
    from tests.tracking.test_system_metrics import fake_nvidia_smi

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_nvidia_smi(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:9:9")
    with stage_run("train", {}, system_metrics_interval_s=0.05):
        time.sleep(0.5)
    (run,) = runs(store, "stage")
    history = store.get_metric_history(run.info.run_id, "system/gpu_0_utilization_percentage")
    assert len(history) >= 3 and [point.step for point in history] == list(range(len(history)))
    assert "system/cpu_utilization_percentage" in run.data.metrics

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with stage_run("train", {}, system_metrics_interval_s=0.05):
        time.sleep(0.3)
    assert "MLflow unavailable" in capsys.readouterr().err
    (pending,) = (tmp_path / "mlflow-pending").glob("train-*.json")
    samples = [op for op in json.loads(pending.read_text())["ops"] if op["op"] == "metrics"]
    assert samples and all(op["metrics"]["system/gpu_0_memory_usage_megabytes"] == 8243.0 for op in samples)
