"""Drift: this run's metrics against the last released model's.

The baseline file (evaluate.drift.baseline, releases/baseline.json by default) holds the metrics a release was
shipped with and what they were measured on; `python -m ftpipe.release.baseline` writes it from a release's
report.json or from the evaluate stage's MLflow run. Metrics compare only when measured alike: the same test
examples (their ids' SHA-256) and the same general text; otherwise the comparison says why it was skipped.
Task metrics are better higher, losses lower; a regression beyond evaluate.drift.max_regression fails or warns
(evaluate.drift.on_regression).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ftpipe.core.errors import PipelineError
from ftpipe.core.evaluation_params import TASK_METRICS, DriftParams
from ftpipe.evaluation.gates import Check

LOWER_IS_BETTER = ("loss", "general_loss")
BASELINE_ARTIFACT = "baseline_metrics.json"   # on the evaluate stage's MLflow run; in report.json too


def examples_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def drift_metrics(metrics: dict) -> dict:
    """What a baseline keeps of the evaluate stage's metrics: the tuned model's numbers, and what they were
    measured on."""
    tuned = metrics["task"]["overall"]["tuned"]
    return {"metrics": {**{name: tuned[name] for name in TASK_METRICS}, "loss": metrics["tuned"]["loss"],
                        "general_loss": metrics["general_text"]["tuned"]["loss"]},
            "per_source": {source: summary["tuned"] for source, summary in metrics["task"]["per_source"].items()},
            "measured_on": {"test_examples_sha256": metrics["test_examples_sha256"],
                            "general_text_sha256": metrics["general_text"]["set"]["sha256"]}}


def load_baseline(path: Path) -> dict | None:
    """The baseline file, or None where there is none yet (a project's first release)."""
    if not path.is_file():
        return None
    baseline = json.loads(path.read_text(encoding="utf-8"))
    if "metrics" not in baseline or "measured_on" not in baseline:
        raise PipelineError(f"{path}: not a baseline file (no 'metrics' or 'measured_on'); rewrite it with "
                            f"`python -m ftpipe.release.baseline`")
    return baseline


def compare(baseline: dict, current: dict, params: DriftParams) -> dict:
    """Per metric: baseline, current, change (positive is worse), allowance, regressed; and whether the two were
    measured alike. Only metrics measured alike are compared: the general loss needs the same general text."""
    same_test = baseline["measured_on"]["test_examples_sha256"] == current["measured_on"]["test_examples_sha256"]
    same_general = (baseline["measured_on"].get("general_text_sha256")
                    == current["measured_on"]["general_text_sha256"])
    rows, skipped = [], {}
    for metric, allowed in params.max_regression.items():
        comparable = same_general if metric == "general_loss" else same_test
        if metric not in baseline["metrics"] or not comparable:
            skipped[metric] = ("the baseline has no such metric" if metric not in baseline["metrics"] else
                               "measured on other examples than the baseline's")
            continue
        before, now = baseline["metrics"][metric], current["metrics"][metric]
        worse_by = now - before if metric in LOWER_IS_BETTER else before - now
        rows.append({"metric": metric, "baseline": before, "current": now, "worse_by": worse_by,
                     "allowed": allowed, "regressed": worse_by > allowed})
    return {"baseline_release": baseline.get("release", {}), "rows": rows, "skipped": skipped,
            "on_regression": params.on_regression}


def drift_checks(comparison: dict) -> list[Check]:
    """The comparison as gate checks (when evaluate.drift.on_regression is fail)."""
    return [Check("evaluate.drift.max_regression." + row["metric"],
                  f"{row['metric']} worse than the last release by", row["worse_by"], row["allowed"], "max")
            for row in comparison["rows"]]
