"""Audit the MLflow record of the pipeline: what produced a run or a file, and does the run reproduce.

    python -m ftpipe.audit provenance RUN_ID [--json]         # a pipeline run, or one of its stage runs
    python -m ftpipe.audit provenance --file PATH [--json]    # the run that produced this file
    python -m ftpipe.audit reproduce RUN_ID [--workdir DIR] [--tolerance X] [--keep]
    python -m ftpipe.audit upload-pending [FOLDER]            # = python -m ftpipe.pending (mlflow-pending/)

`provenance` prints the chain a reviewer needs: the pipeline run and its git commit; per stage (in
dvc.yaml order) whether it executed or was skipped (and which run produced its outputs), its params,
its result metrics, its input data sets and its dvc.lock hashes; the data sources with their licenses
and SHA-256 (ingest's provenance.json), the base model (base's provenance.json) and the environment.

`reproduce` checks out the run's commit in a fresh git worktree, writes the run's own params.yaml
there, copies the user data that git does not hold (data/sources, models/source), runs `dvc repro
--force` into the same MLflow store (the new pipeline run is tagged `ftpipe.reproduces`) and compares
every result metric, timings and memory excluded (ftpipe.tracking.is_measurement). The CPU path is
bit-identical, hence the default tolerance 0. Its report (report.json), the dvc log (repro.log) and,
with --keep, the worktree stay in the work folder.

Exit codes: 0 fine; 2 a problem the message names and says how to fix; 3 reproduce: metrics differ.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.errors import PipelineError, run_stage
from ftpipe.io import HASH_CHUNK, sha256_file, write_json
from ftpipe.paths import LOCAL_MODELS_DIR, PROVENANCE_FILE, SOURCES_DIR
from ftpipe.tracking import (INVOCATION, KIND, PARENT, RUN_NAME, STAGE, experiment_name, is_measurement, project_root,
                             tracking_uri)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # one bar per artifact read is noise here
MISMATCH_EXIT = 3
CODE_SUFFIX = ".py"   # a dependency that is code: listed by name per stage, with its md5 once, under Code
USER_DATA_DIRS = (SOURCES_DIR, LOCAL_MODELS_DIR)   # inputs that live outside git: copied into the worktree
ENV_SUMMARY = ("python", "torch", "torch_cuda", "transformers", "peft", "bitsandbytes", "trl", "unsloth",
               "triton", "gpu", "gpu_count", "nvidia_driver", "cpu", "cpu_count", "os")
# Environments differ between stages only if a stage ran on another machine (e.g. train on a GPU host)
ENV_COMPARED = ("python", "torch", "transformers", "peft", "bitsandbytes", "unsloth", "gpu", "cpu", "os")


# --- the store ------------------------------------------------------------------------------------------

def open_store():
    """(client, uri) of the project's MLflow store, read as is: auditing never creates a store."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415 - slow import

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise PipelineError(f"no MLflow store at {uri[len('sqlite:///'):]}: run `dvc repro` first, run this from the "
                            "project root, or set MLFLOW_TRACKING_URI to the store the runs were logged to")
    return MlflowClient(uri), uri


def get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise PipelineError(f"run {run_id}: not found in the MLflow store {tracking_uri()}. Copy the id from "
                            "`python -m ftpipe.mlflow_ui` or set MLFLOW_TRACKING_URI to the store it was logged "
                            "to.") from err


def pipeline_run_of(client, run_id: str):
    """The pipeline run of `run_id`, itself if it is one, its parent if it is a stage run."""
    run = get_run(client, run_id)
    kind = run.data.tags.get(KIND)
    if kind == "stage" and run.data.tags.get(PARENT):
        return get_run(client, run.data.tags[PARENT])
    if kind != "pipeline":
        raise PipelineError(f"run {run_id} ({run.data.tags.get(RUN_NAME, 'unnamed')}) is not a pipeline run nor a "
                            f"stage run of one (tag {KIND} is {kind!r}): runs logged before pipeline runs existed "
                            "have no chain to show. Pass the id of a run made by `dvc repro`.")
    return run


def search_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def stage_runs(client, pipeline) -> dict[str, Any]:
    """Stage name -> its child run of this pipeline run (the first, should DVC have retried one)."""
    children: dict[str, Any] = {}
    for run in search_all(client, [pipeline.info.experiment_id], f"tags.`{PARENT}` = '{pipeline.info.run_id}'",
                          ["attributes.start_time ASC"]):
        children.setdefault(run.data.tags.get(STAGE, run.info.run_name), run)
    return children


def read_artifact(client, run_id: str, path: str) -> str | None:
    """A run's artifact as text, None when it was not logged."""
    with tempfile.TemporaryDirectory(prefix="ftpipe-audit-") as folder:
        try:
            return Path(client.download_artifacts(run_id, path, folder)).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return None


def read_json_artifact(client, run_id: str, path: str) -> Any:
    text = read_artifact(client, run_id, path)
    return json.loads(text) if text else None


def producer_of(client, run):
    """The run that made a stage's outputs: itself if it executed; for a skipped stage, the run record
    named (None if it found none)."""
    produced_by = run.data.tags.get("ftpipe.produced_by", "unknown")
    if run.data.tags.get("ftpipe.skipped") != "true":
        return run
    return get_run(client, produced_by) if produced_by != "unknown" else None


# --- provenance: collecting ----------------------------------------------------------------------------

def collect_provenance(client, pipeline) -> dict[str, Any]:
    """Everything `provenance` shows, as plain data (the --json dump)."""
    tags = pipeline.data.tags
    children = stage_runs(client, pipeline)
    order = stage_order(read_artifact(client, pipeline.info.run_id, "pipeline/dvc.yaml"), list(children))
    stages, producers = [], {}
    for name in order:
        run = children.get(name)
        if run is None:
            stages.append({"stage": name, "status": "not recorded"})
            continue
        producer = producer_of(client, run)
        producers[name] = producer
        stages.append(describe_stage(client, name, run, producer))
    report = {
        "pipeline": {"run_id": pipeline.info.run_id, "name": tags.get(RUN_NAME), "status": pipeline.info.status,
                     "experiment_id": pipeline.info.experiment_id, "tracking_uri": tracking_uri(),
                     "start_time": _iso(pipeline.info.start_time), "end_time": _iso(pipeline.info.end_time),
                     "git_commit": tags.get("git.commit"), "git_dirty": tags.get("git.dirty"),
                     "invocation": tags.get(INVOCATION), "reproduces": tags.get("ftpipe.reproduces"),
                     "dvc_exp_name": tags.get("dvc.exp_name")},
        "stages": stages,
        "data_sources": data_sources(client, producers.get("ingest")),
        "base_model": base_model(client, producers.get("base")),
        "environment": environment_summary(producers),
    }
    report["warnings"] = provenance_warnings(report)
    return report


def stage_order(dvc_yaml: str | None, recorded: list[str]) -> list[str]:
    """The stages in dvc.yaml order (the run's own dvc.yaml), then any recorded stage it does not list."""
    declared = (yaml.safe_load(dvc_yaml) or {}).get("stages", {}) if dvc_yaml else {}
    listed = [name for name in declared if name != "record"]
    return listed + [name for name in recorded if name not in listed]


def describe_stage(client, name: str, run, producer) -> dict[str, Any]:
    """One stage's part of the chain. A skipped run carries its producer's params and metrics (record
    copies them); its data set inputs and environment are the producer's."""
    skipped = run.data.tags.get("ftpipe.skipped") == "true"
    return {
        "stage": name, "run_id": run.info.run_id, "status": "skipped" if skipped else "executed",
        "run_status": run.info.status,
        "produced_by": (producer.info.run_id if producer else None) if skipped else run.info.run_id,
        "params": dict(sorted(run.data.params.items())),
        "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if not is_measurement(k)},
        "measurements": {k: v for k, v in sorted(run.data.metrics.items()) if is_measurement(k)},
        "inputs": dataset_inputs(producer) if producer else [],
        "dvc_lock": lock_hashes(read_json_artifact(client, run.info.run_id, "dvc/lock-entry.json")),
        "environment": {k[len("env."):]: v for k, v in sorted((producer or run).data.tags.items())
                        if k.startswith("env.")},
    }


def dataset_inputs(run) -> list[dict[str, Any]]:
    rows = []
    for item in (run.inputs.dataset_inputs if run.inputs else []):
        tags = {tag.key: tag.value for tag in item.tags}
        rows.append({"name": item.dataset.name, "context": tags.get("mlflow.data.context"),
                     "sha256": tags.get("sha256", item.dataset.digest), "rows": tags.get("rows"),
                     "path": tags.get("path")})
    return rows


def lock_hashes(entry: dict | None) -> dict[str, list[dict[str, Any]]] | None:
    """A dvc.lock stage entry's dependency and output hashes (params are shown apart)."""
    if entry is None:
        return None
    keep = ("path", "md5", "size", "nfiles")
    return {side: [{k: item[k] for k in keep if k in item} for item in entry.get(side, [])]
            for side in ("deps", "outs")}


def data_sources(client, ingest_run) -> list[dict[str, Any]]:
    record = read_json_artifact(client, ingest_run.info.run_id, PROVENANCE_FILE) if ingest_run else None
    return [{"name": s.get("name"), "license": s.get("license"), "rows": s.get("rows"), "sha256": s.get("sha256"),
             "origin": s.get("origin")} for s in (record or {}).get("sources", [])]


def base_model(client, base_run) -> dict[str, Any] | None:
    record = read_json_artifact(client, base_run.info.run_id, PROVENANCE_FILE) if base_run else None
    if not record:
        return None
    source = record.get("source", {})
    return {"model_id": source.get("model_id") or record.get("params", {}).get("base.model"),
            "license": record.get("license"), "digest": record.get("digest"), "dtype": record.get("dtype"),
            "parameters": record.get("parameters"), "source": source}


def environment_summary(producers: dict[str, Any]) -> dict[str, Any]:
    """The training environment (train's run: the one that loads torch and sees the GPU), and the stages
    whose key versions differ from it."""
    envs = {name: {k[len("env."):]: v for k, v in run.data.tags.items() if k.startswith("env.")}
            for name, run in producers.items() if run is not None}
    envs = {name: env for name, env in envs.items() if env}
    if not envs:
        return {}
    source = "train" if "train" in envs else next(iter(envs))
    reference = envs[source]
    # only what a stage recorded: the GPU, say, is known only to stages that load torch
    differing = {name: {k: env[k] for k in ENV_COMPARED if k in env and env[k] != reference.get(k)}
                 for name, env in envs.items() if name != source}
    return {"from_stage": source, **{k: reference[k] for k in ENV_SUMMARY if k in reference},
            "differs": {name: diff for name, diff in differing.items() if diff}}


def provenance_warnings(report: dict[str, Any]) -> list[str]:
    pipeline, warnings = report["pipeline"], []
    if pipeline["status"] != "FINISHED":
        warnings.append(f"the pipeline run is {pipeline['status']}: `dvc repro` stopped before the record stage "
                        "closed it, so skipped stages and final metrics may be missing")
    if pipeline["git_dirty"] == "True":
        warnings.append("made from a git tree with uncommitted changes: commit "
                        f"{pipeline['git_commit']} alone may not reproduce it")
    for stage in report["stages"]:
        if stage["status"] == "skipped" and not stage["produced_by"]:
            warnings.append(f"stage {stage['stage']}: skipped, and no recorded run produced its current outputs")
    return warnings


def _iso(millis: int | None) -> str | None:
    if not millis:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(millis / 1000))


# --- provenance: which run produced a file ---------------------------------------------------------

def md5_file(path: Path) -> str:
    """The md5 DVC 3 records for a file (of its bytes, as is)."""
    digest = hashlib.md5()   # noqa: S324 - DVC's content address, not a security hash
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_listing(cache: Path, dir_md5: str) -> list[dict] | None:
    """DVC's listing of a folder output (relpath and md5 of each file), from the cache, None if gone."""
    path = cache / "files" / "md5" / dir_md5[:2] / dir_md5[2:]
    return json.loads(path.read_text()) if path.exists() else None


def outputs_matching(entry: dict | None, md5: str, cache: Path) -> list[str]:
    """The paths, in one dvc.lock stage entry's outputs, of files with this md5."""
    found = []
    for out in (entry or {}).get("outs", []):
        out_md5 = out.get("md5", "")
        if out_md5 == md5:
            found.append(out["path"])
        elif out_md5.endswith(".dir"):
            found += [f"{out['path']}/{item['relpath']}" for item in dir_listing(cache, out_md5) or []
                      if item.get("md5") == md5]
    return found


def artifacts_matching(client, run_id: str, size: int, sha256: str, folder: str | None = None) -> list[str]:
    """The run's logged artifacts with this SHA-256 (only those of the same size are read)."""
    found = []
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            found += artifacts_matching(client, run_id, size, sha256, item.path)
        elif item.file_size == size:
            with tempfile.TemporaryDirectory(prefix="ftpipe-audit-") as tmp:
                if sha256_file(Path(client.download_artifacts(run_id, item.path, tmp))) == sha256:
                    found.append(item.path)
    return found


def find_producers(client, path: Path, cache: Path) -> dict[str, Any]:
    """The executed stage runs whose outputs (dvc.lock md5s) or artifacts (SHA-256) hold this file's
    content, latest first."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file. Pass a file an executed stage wrote (e.g. "
                            "models/adapter/adapter_model.safetensors), not a folder.")
    md5, sha256, size = md5_file(path), sha256_file(path), path.stat().st_size
    experiment = client.get_experiment_by_name(experiment_name())
    runs = search_all(client, [experiment.experiment_id] if experiment else [], f"tags.`{KIND}` = 'stage'",
                      ["attributes.start_time DESC"]) if experiment else []
    matches = []
    for run in runs:
        if run.data.tags.get("ftpipe.skipped") == "true":
            continue
        hits = [(out, "dvc.lock md5") for out in
                outputs_matching(read_json_artifact(client, run.info.run_id, "dvc/lock-entry.json"), md5, cache)]
        hits += [(artifact, "artifact sha256")
                 for artifact in artifacts_matching(client, run.info.run_id, size, sha256)]
        for where, how in hits:
            matches.append({"run_id": run.info.run_id, "stage": run.data.tags.get(STAGE),
                            "pipeline_run_id": run.data.tags.get(PARENT), "path": where, "matched_by": how,
                            "start_time": _iso(run.info.start_time)})
    return {"file": str(path), "md5": md5, "sha256": sha256, "bytes": size, "stage_runs_checked": len(runs),
            "matches": matches}


# --- provenance: text -------------------------------------------------------------------------------------

def format_provenance(report: dict[str, Any]) -> str:
    p = report["pipeline"]
    lines = [f"Pipeline run {p['run_id']}  \"{p['name']}\"  {p['status']}"]
    lines += _fields([("store", p["tracking_uri"]), ("started", p["start_time"]), ("ended", p["end_time"]),
                      ("git commit", f"{p['git_commit']}  (uncommitted changes: {_yes_no(p['git_dirty'])})"),
                      ("invocation", p["invocation"]), ("reproduces", p["reproduces"]),
                      ("dvc exp", p["dvc_exp_name"])])
    lines += ["", "Stages (dvc.yaml order)"]
    for stage in report["stages"]:
        lines += format_stage(stage)
    code = code_hashes(report["stages"])
    lines += ["", "Code (md5 in dvc.lock)"]
    lines += [f"  {path:<{max(map(len, code))}}  md5 {' / '.join(sorted(md5s))}"
              for path, md5s in code.items()] or ["  (no dvc.lock entries)"]
    lines += ["", "Data sources"]
    lines += [f"  {s['name']:<24} {s['license'] or '?':<14} {str(s['rows']) + ' rows':<12} sha256 {s['sha256']}"
              for s in report["data_sources"]] or ["  (ingest's provenance.json was not found)"]
    lines += ["", "Base model"]
    base = report["base_model"]
    if base:
        source = base["source"]
        lines += _fields([("model", base["model_id"]), ("license", base["license"]),
                          ("digest", f"{base['digest']}  (sha256 of its files, {base['dtype']})"),
                          ("from", f"{source['package']}=={source.get('version')}, file {source.get('file')}"
                           if source.get("package") else source.get("path")),
                          ("file sha256", source.get("file_sha256"))])
    else:
        lines.append("  (base's provenance.json was not found)")
    env = report["environment"]
    lines += ["", f"Environment (the {env.get('from_stage', '?')} stage's run)"]
    lines += _fields([(key, env[key]) for key in ENV_SUMMARY if key in env]
                     + ([("gpu", "none (CPU)")] if env and "gpu" not in env else []))
    lines += [f"  differs in {name}: " + ", ".join(f"{k}={v}" for k, v in diff.items())
              for name, diff in env.get("differs", {}).items()]
    if report["warnings"]:
        lines += ["", "Warnings"] + [f"  ! {warning}" for warning in report["warnings"]]
    return "\n".join(lines)


def code_hashes(stages: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Each code file the stages depend on, with its md5 (several if stages saw different versions)."""
    code: dict[str, set[str]] = {}
    for stage in stages:
        for dep in (stage.get("dvc_lock") or {}).get("deps", []):
            if dep["path"].endswith(CODE_SUFFIX):
                code.setdefault(dep["path"], set()).add(str(dep.get("md5")))
    return dict(sorted(code.items()))


def format_stage(stage: dict[str, Any]) -> list[str]:
    if stage["status"] == "not recorded":
        return [f"  {stage['stage']:<10} not recorded (no run of this stage under the pipeline run)"]
    if stage["status"] == "skipped":
        head = f"skipped   outputs made by run {stage['produced_by'] or 'unknown'}  (this record: {stage['run_id']})"
    else:
        head = f"executed  run {stage['run_id']}  {stage['run_status']}"
    lines = [f"  {stage['stage']:<10} {head}"]
    rows = [("params", f"{k} = {v}") for k, v in stage["params"].items()]
    rows += [("metrics", f"{k} = {_number(v)}") for k, v in stage["metrics"].items()]
    rows += [("input", f"{i['name']} [{i['context']}]  " + (f"{i['rows']} rows  " if i["rows"] else "")
              + f"sha256 {i['sha256']}") for i in stage["inputs"]]
    lock = stage["dvc_lock"] or {}
    data = [d for d in lock.get("deps", []) if not d["path"].endswith(CODE_SUFFIX)] + lock.get("outs", [])
    width = max([len(item["path"]) for item in data] + [0])
    rows += [("dvc dep", f"{d['path']:<{width}}  md5 {d.get('md5')}") for d in lock.get("deps", []) if d in data]
    rows += [("dvc out", f"{o['path']:<{width}}  md5 {o.get('md5')}"
              + (f"  ({o['nfiles']} files)" if "nfiles" in o else "")) for o in lock.get("outs", [])]
    code = [d["path"] for d in lock.get("deps", []) if d not in data]
    rows += [("code", line) for line in textwrap.wrap(", ".join(code), 100)]
    if stage["dvc_lock"] is None:
        rows.append(("dvc", "no dvc/lock-entry.json: the record stage did not run for this invocation"))
    previous = None
    for label, text in rows:   # the label once per group, aligned
        lines.append(f"    {label if label != previous else '':<9} {text}")
        previous = label
    return lines


def _fields(pairs: list[tuple[str, Any]]) -> list[str]:
    return [f"  {key:<13}{value}" for key, value in pairs if value not in (None, "", "None")]


def _yes_no(flag: str | None) -> str:
    return {"True": "yes", "False": "no"}.get(str(flag), "unknown")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def format_matches(found: dict[str, Any]) -> str:
    lines = [f"File {found['file']}", f"  sha256 {found['sha256']}   md5 {found['md5']}   {found['bytes']} bytes"]
    for number, match in enumerate(found["matches"]):
        lead = "produced by" if number == 0 else "also in    "
        lines.append(f"  {lead} stage {match['stage']}, run {match['run_id']} ({match['start_time']}) as "
                     f"{match['path']} [{match['matched_by']}], pipeline run {match['pipeline_run_id']}")
    return "\n".join(lines)


# --- reproduce: comparing ----------------------------------------------------------------------------------

def compare_metrics(recorded: dict[str, float], reproduced: dict[str, float], tolerance: float) -> list[dict]:
    """One row per result metric of the recorded run (measurements of time and memory left out): ok when
    |reproduced - recorded| <= tolerance (two NaNs agree); a metric the reproduction lacks fails. A
    metric only the reproduction has is listed, ok (it says nothing about the recorded results)."""
    rows = []
    for name in sorted(set(recorded) | set(reproduced)):
        if is_measurement(name):
            continue
        old, new = recorded.get(name), reproduced.get(name)
        if old is None:
            rows.append({"metric": name, "recorded": None, "reproduced": new, "difference": None, "ok": True,
                         "note": "only in the reproduction"})
        elif new is None:
            rows.append({"metric": name, "recorded": old, "reproduced": None, "difference": None, "ok": False,
                         "note": "missing from the reproduction"})
        else:
            both_nan = math.isnan(old) and math.isnan(new)
            difference = 0.0 if both_nan else abs(new - old)
            rows.append({"metric": name, "recorded": old, "reproduced": new, "difference": difference,
                         "ok": both_nan or difference <= tolerance, "note": None})
    return rows


def external_dep_changes(recorded_lock: dict | None, reproduced_lock: dict | None) -> list[dict]:
    """Dependencies no stage produces (code, data/sources, models/source) whose hash differs between the
    two runs' dvc.lock: what a dirty tree or changed user data changed."""
    if not recorded_lock or not reproduced_lock:
        return []

    def external(lock: dict) -> dict[str, str]:
        stages = lock.get("stages", {})
        outs = {out["path"] for entry in stages.values() for out in entry.get("outs", [])}
        return {dep["path"]: dep.get("md5") for entry in stages.values() for dep in entry.get("deps", [])
                if not any(dep["path"] == out or dep["path"].startswith(out + "/") for out in outs)}
    old, new = external(recorded_lock), external(reproduced_lock)
    return [{"path": path, "recorded": old.get(path), "reproduced": new.get(path)}
            for path in sorted(set(old) | set(new)) if old.get(path) != new.get(path)]


def format_comparison(rows: list[dict], tolerance: float) -> str:
    width = max([len(row["metric"]) for row in rows] + [6])
    lines = [f"{'metric':<{width}}  {'recorded':>16}  {'reproduced':>16}  {'difference':>11}  ok"]
    for row in rows:
        cells = [_cell(row[k]) for k in ("recorded", "reproduced")] + [_cell(row["difference"], ".3g")]
        mark = "yes" if row["ok"] else "NO"
        lines.append(f"{row['metric']:<{width}}  {cells[0]:>16}  {cells[1]:>16}  {cells[2]:>11}  {mark}"
                     + (f"  ({row['note']})" if row["note"] else ""))
    failed = sum(not row["ok"] for row in rows)
    lines.append(f"{len(rows) - failed} of {len(rows)} result metrics agree within {tolerance:g}"
                 + (f"; {failed} differ" if failed else ""))
    return "\n".join(lines)


def _cell(value: float | None, spec: str = ".10g") -> str:
    return "-" if value is None else format(value, spec)


# --- reproduce: running ------------------------------------------------------------------------------------

def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"`git {' '.join(args)}` failed in {root}: {done.stderr.strip()}")
    return done.stdout.strip()


def check_commit(root: Path, run_id: str, commit: str | None) -> None:
    if not commit or commit == "None":
        raise PipelineError(f"run {run_id} recorded no git commit (was it run outside a git repository?): there is "
                            "no code to restore, so it cannot be reproduced")
    known = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        raise PipelineError(f"run {run_id} was made from commit {commit}, which the git repository at {root} does not "
                            "have: `git fetch` the branch holding it (or run this in the clone it was made in)")


def prepare_worktree(root: Path, commit: str, worktree: Path, params_text: str) -> Path:
    """A fresh worktree of `commit` holding the run's params.yaml and the user data; returns the project
    folder inside it (the project may sit in a subfolder of the git repository)."""
    top = Path(git(root, "rev-parse", "--show-toplevel")).resolve()
    if worktree.exists() and any(worktree.iterdir()):
        raise PipelineError(f"{worktree}: the worktree folder exists and is not empty; pass another --workdir "
                            "or remove it")
    git(root, "worktree", "add", "--detach", str(worktree), commit)
    project = worktree / root.relative_to(top)
    (project / "params.yaml").write_text(params_text, encoding="utf-8")
    for folder in USER_DATA_DIRS:
        if (root / folder).is_dir():
            shutil.copytree(root / folder, project / folder, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".git"))
    return project


def remove_worktree(root: Path, worktree: Path) -> None:
    subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    shutil.rmtree(worktree, ignore_errors=True)   # what `worktree remove` left (e.g. git-ignored outputs)
    subprocess.run(["git", "-C", str(root), "worktree", "prune"], capture_output=True)


def repro_env(uri: str, experiment: str, run_id: str) -> dict[str, str]:
    """The environment of the `dvc repro`: same store and experiment, tagged as a reproduction, the venv's
    python first (stages run `python -m ...`), and nothing that would join it to another invocation."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FTPIPE_INVOCATION", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "FTPIPE_REPRODUCES")}
    # a relative SQLite path is relative to here, not to the worktree the stages run in
    if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=experiment, FTPIPE_REPRODUCES=run_id,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def run_dvc_repro(project: Path, env: dict[str, str], log: Path) -> int:
    """`dvc repro --force` (everything from scratch), its output shown and kept in `log`."""
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force"], cwd=project, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            handle.write(line)
        return process.wait()


def reproduced_run(client, experiment_id: str, project: Path, run_id: str, since_ms: int):
    """The pipeline run the reproduction made: record.json names it; else the latest tagged as reproducing."""
    record = project / "metrics" / "record.json"
    if record.exists() and json.loads(record.read_text()).get("pipeline_run_id"):
        return get_run(client, json.loads(record.read_text())["pipeline_run_id"])
    found = [run for run in client.search_runs(
        [experiment_id], f"tags.`{KIND}` = 'pipeline' and tags.`ftpipe.reproduces` = '{run_id}'",
        order_by=["attributes.start_time DESC"], max_results=1) if run.info.start_time >= since_ms]
    if not found:
        raise PipelineError(f"dvc repro finished, but no pipeline run tagged ftpipe.reproduces={run_id} is in "
                            f"{tracking_uri()}: was MLflow unavailable (look for mlflow-pending/ in {project})?")
    return found[0]


def recorded_run(client, run_id: str) -> tuple[Any, str]:
    """The pipeline run to reproduce (run_id may name one of its stage runs) and its params.yaml."""
    original = pipeline_run_of(client, run_id)
    run_id = original.info.run_id
    if original.info.status != "FINISHED":
        raise PipelineError(f"run {run_id} is {original.info.status}: only a pipeline run the record stage closed "
                            "holds final metrics to compare; pick a FINISHED one")
    params_text = read_artifact(client, run_id, "pipeline/params.yaml")
    if params_text is None:
        raise PipelineError(f"run {run_id} has no pipeline/params.yaml artifact (the record stage logs it): its "
                            "params cannot be restored")
    if original.data.tags.get("git.dirty") == "True":
        print(f"warning: run {run_id} was made from a tree with uncommitted changes: commit "
              f"{original.data.tags.get('git.commit')} may not hold the code it ran, so results may differ",
              file=sys.stderr)
    return original, params_text


def reproduction_report(client, original, new, tolerance: float) -> dict[str, Any]:
    rows = compare_metrics(original.data.metrics, new.data.metrics, tolerance)
    locks = [_yaml(read_artifact(client, run.info.run_id, "pipeline/dvc.lock")) for run in (original, new)]
    return {"recorded_run_id": original.info.run_id, "reproduced_run_id": new.info.run_id,
            "commit": original.data.tags["git.commit"], "recorded_git_dirty": original.data.tags.get("git.dirty"),
            "tolerance": tolerance, "agree": all(row["ok"] for row in rows), "metrics": rows,
            "dependency_changes": external_dep_changes(*locks)}


def reproduce(run_id: str, workdir: Path | None, tolerance: float, keep: bool) -> dict[str, Any]:
    client, uri = open_store()
    original, params_text = recorded_run(client, run_id)
    run_id, commit, root = original.info.run_id, original.data.tags.get("git.commit"), project_root()
    check_commit(root, run_id, commit)
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"ftpipe-reproduce-{run_id[:8]}-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    worktree = workdir / "worktree"
    project = prepare_worktree(root, commit, worktree, params_text)
    print(f"reproduce: run {run_id} at commit {commit[:12]} in {project}", file=sys.stderr)
    started = int(time.time() * 1000)
    experiment = client.get_experiment(original.info.experiment_id).name
    code = run_dvc_repro(project, repro_env(uri, experiment, run_id), workdir / "repro.log")
    if code != 0:   # the worktree is kept, to look into
        raise PipelineError(f"dvc repro failed (exit {code}) reproducing run {run_id}; its output is in "
                            f"{workdir / 'repro.log'} and the worktree is kept at {worktree} (remove it with "
                            f"`git worktree remove --force {worktree}`)")
    new = reproduced_run(client, original.info.experiment_id, project, run_id, started)
    report = {**reproduction_report(client, original, new, tolerance), "workdir": str(workdir),
              "worktree": str(worktree) if keep else None}
    write_json(workdir / "report.json", report)
    _record_outcome(client, new.info.run_id, report)
    if not keep:
        remove_worktree(root, worktree)
    return report


def _record_outcome(client, run_id: str, report: dict) -> None:
    """The verdict on the reproducing run itself, so the MLflow UI shows it."""
    client.set_tag(run_id, "ftpipe.reproduced", "agrees" if report["agree"] else "differs")
    client.log_dict(run_id, report, "reproduce/report.json")


def _yaml(text: str | None) -> dict | None:
    return yaml.safe_load(text) if text else None


def format_reproduction(report: dict[str, Any]) -> str:
    lines = [f"Reproduction of run {report['recorded_run_id']} by run {report['reproduced_run_id']} "
             f"(commit {report['commit']})", format_comparison(report["metrics"], report["tolerance"])]
    if report["dependency_changes"]:
        lines.append("Inputs outside the pipeline that differ from the recorded run (a likely cause of a difference):")
        lines += [f"  {c['path']}: recorded md5 {c['recorded']}, reproduced {c['reproduced']}"
                  for c in report["dependency_changes"]]
    lines.append(f"report: {report['workdir']}/report.json" + (f"; worktree kept at {report['worktree']}"
                                                                 if report["worktree"] else ""))
    return "\n".join(lines)


# --- the command line ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftpipe.audit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prov = commands.add_parser("provenance", help="the chain that produced a run, or a file")
    prov.add_argument("run_id", nargs="?", help="a pipeline run id, or a stage run id (its pipeline run is shown)")
    prov.add_argument("--file", type=Path, help="show the run whose outputs hold this file's content instead")
    prov.add_argument("--json", action="store_true", help="print machine-readable JSON")
    rep = commands.add_parser("reproduce", help="rerun a pipeline run from its commit and params; compare metrics")
    rep.add_argument("run_id")
    rep.add_argument("--workdir", type=Path, help="where the worktree, repro.log and report.json go (default: a new "
                                                  "temporary folder)")
    rep.add_argument("--tolerance", type=float, default=0.0, help="allowed |reproduced - recorded| (default 0)")
    rep.add_argument("--keep", action="store_true", help="keep the worktree afterwards")
    commands.add_parser("upload-pending", help="log what stages kept in mlflow-pending/ (python -m ftpipe.pending)")
    args = parser.parse_args(argv)
    if args.command == "provenance" and (args.run_id is None) == (args.file is None):
        parser.error("provenance takes a RUN_ID or --file PATH (one of them)")
    if args.command == "reproduce" and args.tolerance < 0:
        parser.error("--tolerance must be >= 0")
    return args


def provenance_command(args: argparse.Namespace) -> None:
    client, _ = open_store()
    found = None
    if args.file:
        found = find_producers(client, args.file, project_root() / ".dvc" / "cache")
        if not found["matches"]:
            raise PipelineError(
                f"{args.file}: no stage run in {tracking_uri()} produced this content (sha256 {found['sha256']}, "
                f"md5 {found['md5']}; {found['stage_runs_checked']} stage runs checked against their dvc.lock "
                "outputs and logged artifacts). Was it made by `dvc repro` with this store, and is .dvc/cache the "
                "one it was made with (folder outputs are matched through it)?")
        args.run_id = found["matches"][0]["run_id"]
    report = collect_provenance(client, pipeline_run_of(client, args.run_id))
    if args.json:
        print(json.dumps({"file": found, **report} if found else report, indent=2, default=str))
    else:
        print((format_matches(found) + "\n\n" if found else "") + format_provenance(report))


def reproduce_command(args: argparse.Namespace) -> None:
    report = reproduce(args.run_id, args.workdir, args.tolerance, args.keep)
    print(format_reproduction(report))
    if not report["agree"]:
        sys.exit(MISMATCH_EXIT)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upload-pending"]:   # ftpipe.pending's own command line, under the name tracking's warnings give
        from ftpipe import pending  # noqa: PLC0415

        sys.exit(pending.main(argv[1:]))
    args = parse_args(argv)
    {"provenance": provenance_command, "reproduce": reproduce_command}[args.command](args)


if __name__ == "__main__":
    run_stage(main)
