"""`python -m ftpipe.release.baseline`: make a release the baseline the next runs' drift is measured against.

    python -m ftpipe.release.baseline                                # the release in models/release/
    python -m ftpipe.release.baseline --report path/to/report.json  # another release's report
    python -m ftpipe.release.baseline --mlflow-run RUN_ID            # the evaluate stage's MLflow run of a release

Writes evaluate.drift.baseline (releases/baseline.json by default): the metrics the release was shipped with
(ftpipe.evaluation.drift.drift_metrics: the tuned model's task metrics, test loss and general-text loss, per
source too), what they were measured on, and which release it was. Commit the file: the evaluate stage depends on
it, and the next `dvc repro` compares against it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import atomic_write_text
from ftpipe.core.params import load_params
from ftpipe.core.paths import RELEASE_DIR
from ftpipe.evaluation.drift import BASELINE_ARTIFACT

REPORT = RELEASE_DIR / "report.json"


def from_report(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the pipeline to a release first (dvc repro), or name a "
                            f"release's report.json with --report")
    report = json.loads(path.read_text(encoding="utf-8"))
    metrics = report.get("evaluation", {}).get("baseline_metrics")
    if metrics is None:
        raise PipelineError(f"{path}: no evaluation.baseline_metrics (a report from before drift checks); rerun the "
                            f"pipeline, or use --mlflow-run with that release's evaluate run")
    project = report.get("project", {})
    return {**metrics, "release": {"report": str(path), "report_created_at": report.get("created_at"),
                                   "mlflow": report.get("mlflow"), "git_commit": project.get("git_commit")}}


def from_mlflow(run_id: str) -> dict:
    import mlflow

    from ftpipe.tracking.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        metrics = mlflow.artifacts.load_dict(f"runs:/{run_id}/{BASELINE_ARTIFACT}")
    except Exception as err:
        raise PipelineError(f"MLflow run {run_id}: no {BASELINE_ARTIFACT} ({err.__class__.__name__}: {err}); name "
                            f"the evaluate stage's run of the release (the MLflow UI lists it)") from err
    return {**metrics, "release": {"mlflow_run_id": run_id}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--report", type=Path, default=REPORT, help="a release's report.json")
    source.add_argument("--mlflow-run", help="the evaluate stage's MLflow run id of a release")
    parser.add_argument("--out", type=Path, help="default: params.yaml evaluate.drift.baseline")
    args = parser.parse_args(argv)
    out = args.out or load_params().evaluate.drift.baseline
    if out is None:
        raise PipelineError("params.yaml evaluate.drift.baseline is null: set it (e.g. releases/baseline.json) or "
                            "pass --out")
    baseline = from_mlflow(args.mlflow_run) if args.mlflow_run else from_report(args.report)
    atomic_write_text(Path(out), json.dumps(baseline, indent=2, sort_keys=True) + "\n")
    shown = ", ".join(f"{key} {value:.4f}" for key, value in baseline["metrics"].items())
    print(f"wrote {out}: {shown}. Commit it; the next `dvc repro` compares against it.", file=sys.stdout)


if __name__ == "__main__":
    run_stage(main)
