"""MLflow logging for a stage, imported lazily and never fatal.

The GPU machine has no MLflow: there (or when the store fails) the stage still runs,
warns once, and keeps what it could not log in `mlflow-pending/` for later upload.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from ftpipe.provenance import environment, git_state, pip_freeze, utc_now

PENDING_DIR = Path("mlflow-pending")
DEFAULT_EXPERIMENT = "ftpipe"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    """The MLflow store: $MLFLOW_TRACKING_URI, else a SQLite file at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


class StageTracker:
    def __init__(self, stage: str, params: dict[str, Any]):
        self.stage = stage
        self.params = params
        self.record: dict[str, Any] = {"stage": stage, "params": params, "metrics": [], "artifacts": []}
        self.mlflow = None
        self.run_id: str | None = None

    def start(self) -> None:
        try:
            import mlflow  # noqa: PLC0415 - optional, slow import

            mlflow.set_tracking_uri(tracking_uri())
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
            if mlflow.get_experiment_by_name(name) is None:
                mlflow.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri())
            mlflow.set_experiment(name)
            git = git_state()
            run = mlflow.start_run(run_name=self.stage, tags={
                "stage": self.stage, "dvc.stage": os.environ.get("DVC_STAGE", self.stage),
                "git.commit": str(git["commit"]), "git.dirty": str(git["dirty"]),
            })
            self.run_id = run.info.run_id
            mlflow.log_params({key: _short(value) for key, value in self.params.items()})
            mlflow.log_dict(environment(), "environment/environment.json")
            mlflow.log_text("\n".join(pip_freeze()) + "\n", "environment/pip-freeze.txt")
            self.mlflow = mlflow
        except Exception as err:  # noqa: BLE001 - tracking must never break a stage
            self._warn(f"MLflow unavailable ({type(err).__name__}: {err})")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.record["metrics"].append({"step": step, **numeric})
        self._call(lambda: self.mlflow.log_metrics(numeric, step=step))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.record["artifacts"].append(str(path))
        if Path(path).is_dir():
            self._call(lambda: self.mlflow.log_artifacts(str(path), folder or Path(path).name))
        else:
            self._call(lambda: self.mlflow.log_artifact(str(path), folder))

    def end(self, status: str) -> None:
        if self.mlflow is not None:
            self._call(lambda: self.mlflow.end_run(status=status))
        if self.mlflow is None:   # nothing reached the store: keep the record for later upload
            self.record.update(status=status, ended_at=utc_now())
            PENDING_DIR.mkdir(exist_ok=True)
            pending = PENDING_DIR / f"{self.stage}-{utc_now().replace(':', '')}.json"
            pending.write_text(json.dumps(self.record, indent=2, default=str) + "\n", encoding="utf-8")

    def _call(self, action) -> None:
        if self.mlflow is None:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001
            self._warn(f"MLflow logging failed ({type(err).__name__}: {err})")
            with contextlib.suppress(Exception):
                self.mlflow.end_run(status="FAILED")
            self.mlflow = None

    def _warn(self, message: str) -> None:
        print(f"warning: {message}; the stage goes on and keeps its record in {PENDING_DIR}/",
              file=sys.stderr)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 6000 else text[:5997] + "..."   # MLflow caps a param value at 6000 chars


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[StageTracker]:
    """One MLflow run for one executed stage, closed FAILED if the stage raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = StageTracker(stage, params)
        tracker.start()
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
