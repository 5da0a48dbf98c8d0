"""Stage `record` (always last, always run): closes this `dvc repro`'s MLflow pipeline run.

The stages that executed each opened a child run under the pipeline run (ftpipe/tracking/runs.py). This
stage, which DVC runs last and on every invocation (`always_changed`), adds what only exists once
they are done: each executed stage's `dvc.lock` entry (input and output hashes); a child run for
every stage DVC skipped, pointing at the run that produced its current outputs (found by their
hashes) and carrying that run's params and final metrics; on the pipeline run, every param, every
stage's final metrics, params.yaml, dvc.yaml and dvc.lock; and a name saying what changed since the
previous pipeline run (e.g. `train.learning_rate=0.001 (was 0.0005)`).

    python -m stages.record          # what dvc runs; writes metrics/record.json
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import run_stage
from ftpipe.core.io import read_json, write_json
from ftpipe.core.params import Params, flatten, load_params
from ftpipe.core.paths import PARAMS_FILE, PROVENANCE_FILE, STAGE_OUTPUTS, metrics_file
from ftpipe.tracking.runs import (
    INVOCATION,
    KIND,
    PARENT,
    RUN_NAME,
    STAGE,
    connect,
    experiment_name,
    invocation_key,
    log_batch,
    metric_points,
    pipeline_run_id,
    short_param,
    store_failure,
)

DVC_YAML, DVC_LOCK = Path("dvc.yaml"), Path("dvc.lock")
OUTS_TAG = "dvc.outs_md5"
MAX_NAMED_CHANGES = 3


# --- the pure part -------------------------------------------------------------------------------------

def outs_digest(lock_entry: dict | None) -> str | None:
    """One digest of a stage's outputs as dvc.lock records them (path and md5 of each)."""
    if not lock_entry or not lock_entry.get("outs"):
        return None
    outs = sorted((out["path"], out.get("md5") or out.get("hash", "")) for out in lock_entry["outs"])
    return hashlib.sha256(json.dumps(outs).encode()).hexdigest()[:32]


def flat_params(raw: dict) -> dict[str, Any]:
    """params.yaml as dotted leaf keys (lists of mappings indexed: ingest.sources.0.name)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
            for index, item in enumerate(node):
                walk(item, f"{prefix}.{index}")
        else:
            out[prefix] = node
    walk(raw, "")
    return out


def describe_changes(current: dict[str, Any], previous: dict[str, str] | None, executed: list[str],
                     exp_name: str | None = None, reproduces: str | None = None) -> str:
    """The pipeline run's name: the params that changed since the previous pipeline run, else which
    stages reran, else that nothing did; a reproduction says which run it reproduces."""
    if previous is None:
        name = "first run"
    else:
        changed = [f"{key}={short_param(current[key])} (was {previous[key]})" if key in previous
                   else f"{key}={short_param(current[key])} (new)"
                   for key in sorted(current) if short_param(current[key]) != previous.get(key)]
        changed += [f"{key} removed" for key in sorted(set(previous) - set(current))]
        if changed:
            name = "; ".join(changed[:MAX_NAMED_CHANGES]) + (
                f" +{len(changed) - MAX_NAMED_CHANGES} more" if len(changed) > MAX_NAMED_CHANGES else "")
        elif executed:
            name = f"same params, reran {', '.join(executed)} (code or data changed)"
        else:
            name = "nothing changed"
    if reproduces:
        name = f"reproduces {reproduces[:8]}"
    return f"exp {exp_name}: {name}" if exp_name else name


# --- MLflow -------------------------------------------------------------------------------------------------

def close_pipeline_run(invocation: str, stage_names: list[str], lock: dict, params_raw: dict,
                       files: dict[str, str]) -> dict:
    """Complete the pipeline run of `invocation` (see the module docstring); returns the summary."""
    mlflow, client, experiment_id = connect()
    parent = pipeline_run_id(client, experiment_id, invocation)
    children = {}
    for run in client.search_runs([experiment_id], f"tags.`{KIND}` = 'stage' and tags.`{INVOCATION}` = '{invocation}'",
                                  order_by=["attributes.start_time ASC"]):
        children.setdefault(run.data.tags[STAGE], run)   # a stage runs once per invocation
    executed = [name for name in stage_names if name in children]
    now = int(time.time() * 1000)
    stage_runs: dict[str, str] = {}
    skipped: dict[str, str | None] = {}
    stage_metrics: dict[str, float] = {}
    for name in stage_names:
        entry = lock.get(name)
        digest = outs_digest(entry)
        if name in children:
            run = children[name]
            stage_runs[name] = run.info.run_id
            client.set_tag(run.info.run_id, OUTS_TAG, str(digest))
            client.log_dict(run.info.run_id, entry or {}, "dvc/lock-entry.json")
            source = client.get_run(run.info.run_id)
        else:
            source = _producer(client, experiment_id, name, digest)
            skipped[name] = source.info.run_id if source else None
            tags = {PARENT: parent, KIND: "stage", STAGE: name, INVOCATION: invocation, RUN_NAME: f"{name} (skipped)",
                    "ftpipe.skipped": "true", "ftpipe.produced_by": skipped[name] or "unknown", OUTS_TAG: str(digest)}
            run_id = stage_runs[name] = client.create_run(experiment_id, run_name=f"{name} (skipped)",
                                                          tags=tags).info.run_id
            client.log_dict(run_id, entry or {}, "dvc/lock-entry.json")
            if source:   # its params and results, so that pipeline runs compare stage by stage
                log_batch(client, run_id, source.data.params, metric_points(source.data.metrics, now, 0))
            client.set_terminated(run_id, "FINISHED")
        if source:
            stage_metrics.update({f"{name}.{key}": value for key, value in source.data.metrics.items()})

    current = {key: short_param(value) for key, value in flat_params(params_raw).items()}   # as MLflow stores them
    previous = _previous_params(client, experiment_id, parent)
    exp_name = os.environ.get("DVC_EXP_NAME")
    name = describe_changes(current, previous, executed, exp_name, os.environ.get("FTPIPE_REPRODUCES"))
    log_batch(client, parent, current, metric_points(stage_metrics, now, 0))
    for file_name, text in files.items():
        client.log_text(parent, text, f"pipeline/{file_name}")
    for key, value in {RUN_NAME: name, "stages.executed": ",".join(executed) or "-",
                       "stages.skipped": ",".join(skipped) or "-"}.items():
        client.set_tag(parent, key, value)
    for stage, run_id in stage_runs.items():   # on a compare page, "train" of which pipeline run
        skipped_mark = " (skipped)" if stage in skipped else ""
        client.set_tag(run_id, RUN_NAME, f"{stage}{skipped_mark} · {name}"[:250])
    client.set_terminated(parent, "FINISHED")
    return {"pipeline_run_id": parent, "experiment": experiment_name(), "name": name, "executed": executed,
            "skipped": skipped, "tracking_uri": mlflow.get_tracking_uri()}


def _producer(client, experiment_id: str, stage: str, digest: str | None):
    """The run that made `stage`'s current outputs: the one their provenance.json names (it is there even when
    the pipeline run it belonged to failed later, before this stage could tag it), else the latest run of
    `stage` whose outputs had this digest."""
    output_dir = STAGE_OUTPUTS.get(stage)
    record = output_dir / PROVENANCE_FILE if output_dir else None
    if record and record.exists():
        with contextlib.suppress(Exception):   # an unreadable record or an unknown run: fall back on the digest
            run_id = (read_json(record).get("mlflow") or {}).get("run_id")
            if run_id:
                run = client.get_run(run_id)
                if run.info.experiment_id == experiment_id:
                    return run
    if digest is None:
        return None
    found = client.search_runs([experiment_id], f"tags.`{KIND}` = 'stage' and tags.`{STAGE}` = '{stage}' and "
                                                f"tags.`{OUTS_TAG}` = '{digest}'",
                               order_by=["attributes.start_time DESC"])
    # (a missing tag never matches a != filter in MLflow, so the skipped records are left out here)
    return next((run for run in found if run.data.tags.get("ftpipe.skipped") != "true"), None)


def _previous_params(client, experiment_id: str, parent: str) -> dict[str, str] | None:
    runs = client.search_runs([experiment_id], f"tags.`{KIND}` = 'pipeline' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    previous = [run for run in runs if run.info.run_id != parent]
    return previous[0].data.params if previous else None


def tracked_params(params: Params) -> dict:
    """None listed in dvc.yaml: the stage runs on every invocation (always_changed) and logs all of them."""
    return {}


def as_the_stages_read_them(raw: Any, typed: dict[str, Any], prefix: str = "") -> Any:
    """params.yaml's values, with a YAML boolean where the stages read a word in its place: YAML 1.1 reads a bare
    `on`/`off` as true/false (train.gradient_checkpointing), and `dvc exp run -S` writes a quoted 'on' back bare, so
    the raw value would show as a change that is none."""
    if isinstance(raw, dict):
        return {key: as_the_stages_read_them(value, typed, f"{prefix}.{key}" if prefix else str(key))
                for key, value in raw.items()}
    if isinstance(raw, bool) and isinstance(typed.get(prefix), str):
        return typed[prefix]
    return raw


def main() -> None:
    params = load_params()   # a broken params.yaml fails here with its usual message, not inside MLflow
    params_raw = as_the_stages_read_them(yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8")), flatten(params))
    stage_names = [name for name in yaml.safe_load(DVC_YAML.read_text())["stages"] if name != "record"]
    lock = yaml.safe_load(DVC_LOCK.read_text())["stages"] if DVC_LOCK.exists() else {}
    files = {path.name: path.read_text(encoding="utf-8") for path in (PARAMS_FILE, DVC_YAML, DVC_LOCK) if path.exists()}
    invocation = invocation_key()
    try:
        summary = close_pipeline_run(invocation, stage_names, lock, params_raw, files)
    except Exception as err:
        if not store_failure(err):
            raise
        print(f"warning: MLflow unavailable ({type(err).__name__}: {str(err)[:300]}); the pipeline run of "
              f"{invocation} stays open", file=sys.stderr)
        summary = {"pipeline_run_id": None, "invocation": invocation, "error": f"{type(err).__name__}: {err}"}
    write_json(metrics_file("record"), summary)
    if summary.get("pipeline_run_id"):
        print(f"record: MLflow pipeline run {summary['pipeline_run_id']} \"{summary['name']}\": ran "
              f"{', '.join(summary['executed']) or 'nothing'}; skipped {len(summary['skipped'])}")


if __name__ == "__main__":
    run_stage(main)
