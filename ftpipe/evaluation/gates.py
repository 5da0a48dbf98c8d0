"""Gates: thresholds from params.yaml that a run's metrics must meet before anything is released.

Each check is one metric against one params key; a miss fails its stage with every missed check named (metric,
value, threshold, key), after the stage has written what it measured (the reviewer needs those numbers to see why).
The stage also writes gate.json, the verdict alone: the merge stage depends on it, so nothing downstream runs,
and refuses a verdict that failed or was made for another adapter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ftpipe.core.errors import PipelineError

VERDICT_FILE = "gate.json"


class GateFailed(PipelineError):
    """A run's metrics missed a gate of params.yaml."""


@dataclass(frozen=True)
class Check:
    key: str            # the params.yaml key holding the threshold
    metric: str         # what was measured, in words a reviewer reads
    value: float
    threshold: float
    bound: str          # "min" or "max"

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.bound == "min" else self.value <= self.threshold

    def describe(self) -> str:
        relation = "at least" if self.bound == "min" else "at most"
        verdict = "ok" if self.passed else "MISSED"
        return f"{verdict}: {self.metric} = {self.value:.4f}; {self.key} requires {relation} {self.threshold:g}"


def at_least(key: str, metric: str, value: float, threshold: float | None) -> list[Check]:
    return [] if threshold is None else [Check(key, metric, float(value), float(threshold), "min")]


def at_most(key: str, metric: str, value: float, threshold: float | None) -> list[Check]:
    return [] if threshold is None else [Check(key, metric, float(value), float(threshold), "max")]


def verdict(checks: list[Check], subject: dict) -> dict:
    """The verdict file's content: passed or not, and what it was made for (e.g. the adapter's SHA-256). The checks,
    their values and thresholds are in the stage's metrics file: here they would change the file whenever a
    threshold or a metric moves, and rebuild everything downstream of it though the verdict stayed the same."""
    return {"passed": all(check.passed for check in checks), "subject": subject}


def check_rows(checks: list[Check]) -> list[dict]:
    """The checks with their values, for metrics files and the report."""
    return [{**asdict(check), "passed": check.passed} for check in checks]


def enforce(stage: str, checks: list[Check]) -> None:
    """Print every check; raise GateFailed naming each miss."""
    for check in checks:
        print(f"{stage} gate: {check.describe()}")
    missed = [check for check in checks if not check.passed]
    if missed:
        raise GateFailed(f"{stage}: {len(missed)} gate(s) missed, so nothing downstream is built or released:\n  "
                         + "\n  ".join(check.describe() for check in missed)
                         + f"\nThe measured numbers are in metrics/{stage}.json. Fix the model or data, or, if the "
                           f"threshold is wrong for your task, change the key in params.yaml (a reviewer will see it).")


def require_passed(verdict_path: Path, subject: dict, stage: str) -> None:
    """For a downstream stage: the gate at `verdict_path` passed, for this very `subject`."""
    if not verdict_path.is_file():
        raise PipelineError(f"{stage}: {verdict_path} is missing: run the stage that writes it first (dvc repro)")
    found = json.loads(verdict_path.read_text(encoding="utf-8"))
    if not found.get("passed"):
        raise GateFailed(f"{stage}: {verdict_path} says the gate failed; nothing is released until it passes")
    if found.get("subject") != subject:
        raise GateFailed(f"{stage}: {verdict_path} was made for {found.get('subject')}, not {subject}: "
                         f"rerun the stage that writes it (dvc repro)")


def adapter_subject(adapter_dir: Path) -> dict:
    """What a verdict is about: the adapter, through the SHA-256 of its content.json (its files' SHA-256s)."""
    return {"adapter_content_sha256": hashlib.sha256((adapter_dir / "content.json").read_bytes()).hexdigest()}
