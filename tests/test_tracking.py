"""ftpipe.tracking: each stage's MLflow run holds its params, metrics, artifacts, git commit and
environment; when MLflow is missing (as on the GPU machine) the stage goes on and keeps its record."""
from __future__ import annotations

import json
import sys

import pytest

from ftpipe.tracking import stage_run


def test_a_stage_run_records_params_metrics_artifacts_and_environment(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    report = tmp_path / "report.json"
    report.write_text('{"ok": true}')
    with stage_run("demo", {"demo.rate": 0.5, "demo.modules": ["q_proj", "v_proj"]}) as tracker:
        tracker.log_metrics({"loss": 2.5, "label": "not a number"}, step=1)
        tracker.log_metrics({"loss": 2.0}, step=2)
        tracker.log_artifact(report)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ftpipe").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"demo.rate": "0.5", "demo.modules": '["q_proj", "v_proj"]'}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.5, 2.0]
    assert "label" not in run.data.metrics
    assert run.data.tags["stage"] == "demo" and "git.commit" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "environment"} <= artifacts
    environment = {a.path for a in client.list_artifacts(run.info.run_id, "environment")}
    assert environment == {"environment/environment.json", "environment/pip-freeze.txt"}
    freeze = client.download_artifacts(run.info.run_id, "environment/pip-freeze.txt", str(tmp_path))
    assert any(line.startswith("torch==") for line in open(freeze))


def test_a_failing_stage_closes_its_run_as_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ValueError):
        with stage_run("broken", {}):
            raise ValueError("boom")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ftpipe").experiment_id])
    assert run.info.status == "FAILED"


def test_without_mlflow_the_stage_goes_on_and_keeps_its_record(in_tmp_project, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)   # `import mlflow` now raises ImportError
    with stage_run("offline", {"offline.x": 1}) as tracker:
        tracker.log_metrics({"loss": 1.5}, step=3)
    assert "MLflow unavailable" in capsys.readouterr().err
    (pending,) = (in_tmp_project / "mlflow-pending").glob("offline-*.json")
    record = json.loads(pending.read_text())
    assert record["status"] == "FINISHED" and record["params"] == {"offline.x": 1}
    assert record["metrics"] == [{"step": 3, "loss": 1.5}]
