"""MLflow tracking when the store is unavailable, fails part way or is shared: the stage goes on, keeps
what it could not log in mlflow-pending/, and ftpipe.tracking.pending replays it later, completely and once;
two pipelines writing to one store at once lose nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ftpipe.tracking.pending import UPLOADED_FROM, upload_pending
from ftpipe.tracking.runs import INVOCATION, KIND, PARENT, PENDING_DIR, STAGE, stage_run

REPO = Path(__file__).resolve().parents[2]
UNAVAILABLE = "sqlite:////proc/ftpipe-no-such-dir/mlflow.db"   # /proc refuses new folders, even to root
INVOCATION_KEY = "testhost:4242:1700000000"


@pytest.fixture
def project(in_tmp_project, monkeypatch) -> Path:
    monkeypatch.setenv("DVC_ROOT", str(in_tmp_project))
    monkeypatch.setenv("FTPIPE_INVOCATION", INVOCATION_KEY)
    (in_tmp_project / "report.json").write_text('{"accuracy": 0.5}\n')
    (in_tmp_project / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    return in_tmp_project


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> Path:
    """An empty store with MLflow's tables: creating them takes seconds, copying them none."""
    path = tmp_path_factory.mktemp("schema") / "store.db"
    client_for(f"sqlite:///{path}")   # building a client creates the tables
    return path


def use_store(monkeypatch, folder: Path, schema: Path):
    """From here on the stage logs to a working store (a fresh one in `folder`); its client."""
    shutil.copy(schema, folder / "store.db")
    uri = f"sqlite:///{folder / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return client_for(uri)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def pending_records() -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in sorted(PENDING_DIR.glob("*.json"))]


def assert_warned_once(err: str) -> None:
    """One warning for the failure (not one per operation), plus at most the line naming the file."""
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    failures = [line for line in warnings if "MLflow unavailable" in line or "MLflow logging failed" in line]
    assert len(failures) == 1 and len(warnings) - len(failures) <= 1, err


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))


def artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, folder)}


# --- a. unavailable from the start -----------------------------------------------------------------------

def test_an_unavailable_store_keeps_every_operation_and_upload_creates_the_whole_run(project, schema, monkeypatch,
                                                                                    capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNAVAILABLE)
    (project / "adapter").mkdir()
    (project / "adapter" / "weights.bin").write_bytes(b"\0" * 64)
    with stage_run("train", {"train.learning_rate": 0.001, "train.modules": ["q_proj", "v_proj"]}) as tracker:
        tracker.log_input(project / "train.jsonl", "train", "training")
        for step in range(5):
            tracker.log_metrics({"loss": 2.0 - step / 10}, step=step)
        tracker.log_artifact(project / "report.json")
        tracker.log_artifact(project / "adapter")
    assert_warned_once(capsys.readouterr().err)
    ((path, record),) = pending_records()
    assert record["run_id"] is None and record["status"] == "FINISHED"
    kinds = [op["op"] for op in record["ops"]]   # the stage's params and environment, then its own logging
    assert kinds[0] == "params" and kinds[-9:] == ["input", *["metrics"] * 5, "artifact", "artifact", "end"]

    client = use_store(monkeypatch, project, schema)
    (summary,) = upload_pending()
    assert summary["error"] is None and summary["created"] and summary["changed"] == []
    assert not path.exists()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.learning_rate": "0.001", "train.modules": '["q_proj", "v_proj"]'}
    assert history(client, run.info.run_id, "loss") == [(step, 2.0 - step / 10) for step in range(5)]
    assert artifact_paths(client, run.info.run_id) >= {"report.json", "adapter", "environment"}
    assert artifact_paths(client, run.info.run_id, "adapter") == {"adapter/weights.bin"}
    assert artifact_paths(client, run.info.run_id, "environment") == {
        "environment/environment.json", "environment/pip-freeze.txt"}
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "train"
    assert {tag.key: tag.value for tag in dataset_input.tags}["rows"] == "2"
    tags = run.data.tags
    assert tags[UPLOADED_FROM] == path.name and tags[STAGE] == "train" and tags[INVOCATION] == INVOCATION_KEY
    parent = client.get_run(tags[PARENT])   # the invocation's pipeline run, created by the upload
    assert parent.data.tags[KIND] == "pipeline" and parent.data.tags[INVOCATION] == INVOCATION_KEY
    assert upload_pending() == []


# --- b. failing part way -------------------------------------------------------------------------------------

def fail_after(monkeypatch, method: str, successes: int) -> None:
    """MlflowClient.<method> works `successes` times, then fails as a full disk does."""
    from mlflow.tracking import MlflowClient

    real, calls = getattr(MlflowClient, method), []

    def failing(self, *args, **kwargs):
        calls.append(method)
        if len(calls) > successes:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(MlflowClient, method, failing)


def test_a_store_failing_part_way_keeps_the_rest_and_upload_completes_the_same_run_once(project, schema, monkeypatch,
                                                                                        capsys):
    client = use_store(monkeypatch, project, schema)
    with monkeypatch.context() as patch:
        fail_after(patch, "log_batch", successes=5)   # the params, then steps 0-3
        with stage_run("train", {"train.learning_rate": 0.001}) as tracker:
            for step in range(10):
                tracker.log_metrics({"loss": 1 / (step + 1), "grad_norm": float(step)}, step=step)
            tracker.log_artifact(project / "report.json")
    assert_warned_once(capsys.readouterr().err)
    ((path, record),) = pending_records()
    assert [op["op"] for op in record["ops"]] == [*["metrics"] * 6, "artifact", "end"]
    assert [op["step"] for op in record["ops"][:6]] == [4, 5, 6, 7, 8, 9]
    run_id = record["run_id"]
    assert history(client, run_id, "loss") == [(step, 1 / (step + 1)) for step in range(4)]
    original = path.read_text()

    # the upload itself fails part way: what it replayed is taken out of the file
    with monkeypatch.context() as patch:
        fail_after(patch, "log_artifact", successes=0)
        (summary,) = upload_pending()
    assert summary["error"].startswith("OSError") and summary["run_id"] == run_id and not summary["created"]
    assert [op["op"] for op in json.loads(path.read_text())["ops"]] == ["artifact", "end"]
    (summary,) = upload_pending()
    assert summary["error"] is None and summary["run_id"] == run_id and not path.exists()

    expected = [(step, 1 / (step + 1)) for step in range(10)]
    assert history(client, run_id, "loss") == expected
    assert history(client, run_id, "grad_norm") == [(step, float(step)) for step in range(10)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[UPLOADED_FROM] == path.name
    assert "report.json" in artifact_paths(client, run_id)

    # even a file replayed again from the start (an upload killed before it could rewrite it) adds nothing
    path.write_text(original)
    (summary,) = upload_pending()
    assert summary["error"] is None and summary["run_id"] == run_id
    assert history(client, run_id, "loss") == expected
    assert len(client.search_runs([run.info.experiment_id], f"tags.`{KIND}` = 'stage'")) == 1


# --- c. an artifact changed before upload ----------------------------------------------------------------

def test_an_artifact_changed_after_the_failure_is_not_uploaded_under_its_old_name(project, schema, monkeypatch,
                                                                                  capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNAVAILABLE)
    (project / "kept.txt").write_text("unchanged\n")
    (project / "gone.txt").write_text("deleted before upload\n")
    with stage_run("evaluate", {}) as tracker:
        for name in ("report.json", "kept.txt", "gone.txt"):
            tracker.log_artifact(project / name)
    capsys.readouterr()
    (project / "report.json").write_text('{"accuracy": 0.9}\n')   # e.g. the stage ran again, offline
    (project / "gone.txt").unlink()

    client = use_store(monkeypatch, project, schema)
    (summary,) = upload_pending()
    assert summary["error"] is None and not PENDING_DIR.joinpath(summary["file"]).exists()
    assert sorted(summary["changed"]) == [str(project / "gone.txt"), str(project / "report.json")]
    run_id = summary["run_id"]
    assert "kept.txt" in artifact_paths(client, run_id)
    assert not {"report.json", "gone.txt"} & artifact_paths(client, run_id)
    assert artifact_paths(client, run_id, "pending") == {"pending/changed-report.json.txt",
                                                         "pending/changed-gone.txt.txt"}
    note = Path(client.download_artifacts(run_id, "pending/changed-report.json.txt", str(project / "dl"))).read_text()
    assert "report.json" in note and "not uploaded" in note


# --- d. two pipelines at once on a fresh store -------------------------------------------------------------

# 2 x 3 x 60 commits interleaved keep this test near 35 s on a loaded 2-core machine (each commit
# syncs to disk); it passes unchanged with 200 steps
STAGES, STEPS = ("ingest", "clean", "train"), 60

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    import ftpipe
    import mlflow  # noqa: F401 - imported before the barrier, so that both really log at once
    from ftpipe.tracking.runs import invocation_key, stage_run
    from stages.record import close_pipeline_run

    stages, steps, barrier = sys.argv[1].split(","), int(sys.argv[2]), Path(sys.argv[3])
    Path("ready").touch()
    while not barrier.exists():
        time.sleep(0.005)
    for stage in stages:
        output = Path(f"{stage}.txt")
        output.write_text(f"{stage} of {invocation_key()}\\n")
        with stage_run(stage, {f"{stage}.seed": 1}) as tracker:
            for step in range(steps):
                tracker.log_metrics({"loss": 1 / (step + 1), "learning_rate": 0.001}, step=step)
            tracker.log_artifact(output)
    lock = {stage: {"outs": [{"path": f"{stage}.txt", "md5": "0" * 32}]} for stage in stages}
    close_pipeline_run(invocation_key(), stages, lock, {"seed": 1}, {"params.yaml": "seed: 1\\n"})
""")


def test_two_pipelines_sharing_a_fresh_store_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared' / 'store.db'}"   # no schema yet: both race to create it
    (tmp_path / "shared").mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    barrier = tmp_path / "go"
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    env.update(MLFLOW_TRACKING_URI=uri, DVC_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    workers = {}
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        workers[name] = subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), ",".join(STAGES), str(STEPS), str(barrier)],
            cwd=folder, env={**env, "FTPIPE_INVOCATION": f"pipeline-{name}"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / name / "ready").exists() for name in workers):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers.values()), "a worker died"
        time.sleep(0.01)
    barrier.touch()
    results = {name: (worker.wait(timeout=120), *worker.communicate()) for name, worker in workers.items()}

    for name, (code, _, err) in results.items():
        assert code == 0, f"pipeline {name}:\n{err}"
        assert "warning" not in err.lower(), f"pipeline {name}:\n{err}"
        assert not list((tmp_path / name).glob("mlflow-pending/*")), f"pipeline {name} kept operations"
    client = client_for(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "ftpipe"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    pipelines = {run.data.tags[INVOCATION]: run for run in runs if run.data.tags.get(KIND) == "pipeline"}
    assert sorted(pipelines) == ["pipeline-a", "pipeline-b"]
    for invocation, pipeline in pipelines.items():
        assert pipeline.info.status == "FINISHED"
        assert pipeline.data.tags["stages.executed"] == ",".join(STAGES)
        children = [run for run in runs if run.data.tags.get(PARENT) == pipeline.info.run_id]
        assert sorted(run.data.tags[STAGE] for run in children) == sorted(STAGES)
        for child in children:
            stage, run_id = child.data.tags[STAGE], child.info.run_id
            assert child.info.status == "FINISHED" and child.data.tags[INVOCATION] == invocation
            assert history(client, run_id, "loss") == [(step, 1 / (step + 1)) for step in range(STEPS)]
            assert len(client.get_metric_history(run_id, "learning_rate")) == STEPS
            sizes = {item.path: item.file_size for item in client.list_artifacts(run_id)}
            assert sizes[f"{stage}.txt"] == len(f"{stage} of {invocation}\n") and {"environment", "dvc"} <= set(sizes)


# --- e. the GPU machine's record -----------------------------------------------------------------------

def test_the_gpu_machines_committed_record_uploads_with_its_gpu_system_metrics(project, schema, monkeypatch):
    """bench/results/train-mlflow-pending.json is what the train stage kept on the H200 (no MLflow
    there; bench/gpu_train_smoke.py). Uploaded here, it becomes a finished train run with the GPU's
    utilization, memory and power per sample; its artifacts, on the GPU machine's disk, are noted
    as missing, not uploaded."""
    recorded = json.loads((REPO / "bench/results/train-mlflow-pending.json").read_text())
    PENDING_DIR.mkdir()
    shutil.copy(REPO / "bench/results/train-mlflow-pending.json", PENDING_DIR / "train-gpu.json")
    client = use_store(monkeypatch, project, schema)
    (summary,) = upload_pending()
    assert summary["error"] is None and summary["created"] and summary["remaining"] == 0
    run = client.get_run(summary["run_id"])
    assert run.info.status == recorded["status"] == "FINISHED"
    assert run.data.tags["env.gpu"].startswith("NVIDIA H200") and run.data.tags["env.torch_cuda"]
    # the resumed run says what it resumed (the interrupted one had no MLflow either: no run id to name)
    assert run.data.tags["ftpipe.resumed_from_checkpoint"] == "checkpoint-20"
    samples = [op for op in recorded["ops"] if op["op"] == "metrics"
               and "system/gpu_0_utilization_percentage" in op["metrics"]]
    assert len(samples) >= 5   # one per 5 s while training (9 in the ~45 s the H200 took)
    for key in ("system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes",
                "system/gpu_0_power_usage_watts", "system/gpu_0_torch_reserved_megabytes",
                "system/cpu_utilization_percentage"):
        points = history(client, run.info.run_id, key)
        expected = sorted((op["step"], op["metrics"][key]) for op in recorded["ops"]
                          if op["op"] == "metrics" and key in op["metrics"])
        assert points == expected and len(points) >= 5, key   # torch's: once the stage started CUDA
    assert max(value for _, value in history(client, run.info.run_id, "system/gpu_0_memory_usage_megabytes")) > 1000
    assert summary["changed"] and all(path.startswith("/") for path in summary["changed"])   # not on this disk
