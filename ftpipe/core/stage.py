"""The frame every stage runs in, written once: params.yaml read and validated, the MLflow run of the stage
(ftpipe.tracking.runs), its output folder written atomically with its provenance.json, and its metrics file.

    def main() -> None:
        with Stage("clean", tracked_params) as stage:
            splits, rejected, summary = clean_sources(RAW_DIR, stage.params.clean)
            with stage.output() as out_dir:            # STAGE_OUTPUTS["clean"], renamed into place at the end
                write_jsonl(out_dir / "train.jsonl", splits["train"])
                stage.record["split_salt"] = ...       # more for provenance.json, written last
            stage.finish({"rows_in": ...})              # metrics/clean.json and the run's metrics

A stage module then holds only what the stage does. `tracked` names the params.yaml keys that can change
the stage's result (dvc.yaml lists the same); `settings`, the keys it reads that change none (logged to
MLflow, not in dvc.yaml).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from ftpipe.core.io import atomic_dir, write_json
from ftpipe.core.params import Params, load_params
from ftpipe.core.paths import PROVENANCE_FILE, STAGE_OUTPUTS, metrics_file
from ftpipe.core.provenance import stage_record
from ftpipe.tracking.runs import StageTracker, stage_run


class Stage:
    """One run of one stage (a context manager; see the module docstring)."""

    def __init__(self, name: str, tracked: Callable[[Params], dict[str, Any]],
                 settings: Callable[[Params], dict[str, Any]] | None = None, system_metrics: bool = False):
        self.name = name
        self.output_dir = STAGE_OUTPUTS.get(name)
        self.params = load_params()   # a bad params.yaml fails here, before MLflow or any output
        self.tracked = tracked(self.params)
        self.settings = settings(self.params) if settings else {}
        self.system_metrics_interval_s = self.params.tracking.system_metrics_interval_s if system_metrics else None
        self.record: dict[str, Any] = {}   # extra provenance.json fields
        self.tracker: StageTracker | None = None
        self._run: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> "Stage":
        self._run = stage_run(self.name, {**self.tracked, **self.settings}, self.system_metrics_interval_s)
        self.tracker = self._run.__enter__()
        return self

    def __exit__(self, *exc_info) -> bool | None:
        return self._run.__exit__(*exc_info)

    @contextlib.contextmanager
    def output(self, folder: Path | None = None, provenance_first: bool = False) -> Iterator[Path]:
        """The stage's output folder as a temporary sibling; provenance.json (the tracked params, the MLflow
        run, git, environment and `self.record`) is written last, then the folder is renamed into place. With
        `provenance_first` it is written before the body runs (the report hashes it into its manifest)."""
        with atomic_dir(folder or self.output_dir) as out_dir:
            if provenance_first:
                self._write_provenance(out_dir)
            yield out_dir
            if not provenance_first:
                self._write_provenance(out_dir)

    def _write_provenance(self, out_dir: Path) -> None:
        write_json(out_dir / PROVENANCE_FILE, stage_record(self.name, self.tracked, mlflow=self.tracker.reference(),
                                                           **self.record))

    def finish(self, metrics: dict[str, Any], log: dict[str, Any] | None = None) -> None:
        """metrics/<stage>.json, and the numeric values (or `log`, when the run wants other names) on the run."""
        write_json(metrics_file(self.name), metrics)
        self.tracker.log_metrics(metrics if log is None else log)
