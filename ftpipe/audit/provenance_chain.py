"""The provenance chain of a pipeline run, read from the project's MLflow store (`python -m ftpipe.audit
provenance`; not to be confused with ftpipe.core.provenance, which writes provenance.json next to outputs).

The store: read-only access to the runs the pipeline logged (the pipeline run of a run id, its stage
runs, their artifacts, the run that produced a skipped stage's outputs).

Collecting: the chain a reviewer needs, as plain data (collect_provenance, the --json dump): the
pipeline run and its git commit; per stage (in dvc.yaml order) whether it executed or was skipped (and
which run produced its outputs), its params, its result metrics, its input data sets and its dvc.lock
hashes; the data sources with their licenses and SHA-256 (ingest's provenance.json), the base model
(base's provenance.json) and the environment.

Which run produced a file (find_producers): the executed stage runs whose dvc.lock outputs (md5, folder
outputs through the DVC cache) or logged artifacts (SHA-256) hold its content.

Text: format_provenance and format_matches, what the command prints without --json.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.compliance.licenses import commercial_use_of
from ftpipe.core.errors import PipelineError
from ftpipe.core.io import HASH_CHUNK, sha256_file
from ftpipe.core.paths import PROVENANCE_FILE
from ftpipe.tracking.runs import (
    INVOCATION,
    KIND,
    PARENT,
    RUN_NAME,
    STAGE,
    experiment_name,
    is_measurement,
    tracking_uri,
)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # one bar per artifact read is noise here
CODE_SUFFIX = ".py"   # a dependency that is code: listed by name per stage, with its md5 once, under Code
ENV_SUMMARY = ("python", "torch", "torch_cuda", "transformers", "peft", "bitsandbytes", "trl", "unsloth",
               "triton", "gpu", "gpu_count", "nvidia_driver", "cpu", "cpu_count", "os")
# Environments differ between stages only if a stage ran on another machine (e.g. train on a GPU host)
ENV_COMPARED = ("python", "torch", "transformers", "peft", "bitsandbytes", "unsloth", "gpu", "cpu", "os")


# --- the store ------------------------------------------------------------------------------------------

def open_store():
    """(client, uri) of the project's MLflow store, read as is: auditing never creates a store."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise PipelineError(f"no MLflow store at {uri[len('sqlite:///'):]}: run `dvc repro` first, run this from the "
                            "project root, or set MLFLOW_TRACKING_URI to the store the runs were logged to")
    return MlflowClient(uri), uri


def get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise PipelineError(f"run {run_id}: not found in the MLflow store {tracking_uri()}. Copy the id from "
                            "`python -m ftpipe.tracking.mlflow_ui` or set MLFLOW_TRACKING_URI to the store it was "
                            "logged to.") from err


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
    licenses = declared_licenses(client, producers.get("compliance"))
    report = {
        "pipeline": {"run_id": pipeline.info.run_id, "name": tags.get(RUN_NAME), "status": pipeline.info.status,
                     "experiment_id": pipeline.info.experiment_id, "tracking_uri": tracking_uri(),
                     "start_time": _iso(pipeline.info.start_time), "end_time": _iso(pipeline.info.end_time),
                     "git_commit": tags.get("git.commit"), "git_dirty": tags.get("git.dirty"),
                     "invocation": tags.get(INVOCATION), "reproduces": tags.get("ftpipe.reproduces"),
                     "dvc_exp_name": tags.get("dvc.exp_name")},
        "stages": stages,
        "data_sources": data_sources(client, producers.get("ingest"), licenses),
        "base_model": base_model(client, producers.get("base"), licenses),
        "license_conclusion": licenses.get("conclusion"),
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


def declared_licenses(client, compliance_run) -> dict[str, Any]:
    """The licenses the compliance stage checked (declared in params.yaml, not by ingest or base) and its
    conclusion, from the conclusion.json it logged."""
    record = (read_json_artifact(client, compliance_run.info.run_id, "compliance/conclusion.json")
              if compliance_run else None)
    if not record:
        return {}
    declared = record["declarations"]
    conclusion = record["conclusion"]
    return {"sources": {source["name"]: source["license"] for source in declared["sources"]},
            "base_model": declared["base_model"]["license"],
            "conclusion": {key: conclusion[key] for key in ("verdict", "concluded_license", "commercial_use_allowed")}
            | {"intended_use": conclusion["policy"]["intended_use"], "commercial_use": commercial_use_of(conclusion)}}


def data_sources(client, ingest_run, licenses: dict[str, Any]) -> list[dict[str, Any]]:
    record = read_json_artifact(client, ingest_run.info.run_id, PROVENANCE_FILE) if ingest_run else None
    return [{"name": s.get("name"), "license": licenses.get("sources", {}).get(s.get("name")), "rows": s.get("rows"),
             "sha256": s.get("sha256"), "origin": s.get("origin")} for s in (record or {}).get("sources", [])]


def base_model(client, base_run, licenses: dict[str, Any]) -> dict[str, Any] | None:
    record = read_json_artifact(client, base_run.info.run_id, PROVENANCE_FILE) if base_run else None
    if not record:
        return None
    source = record.get("source", {})
    return {"model_id": source.get("model_id") or record.get("params", {}).get("base.model"),
            "license": licenses.get("base_model"), "digest": record.get("digest"), "dtype": record.get("dtype"),
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


def dir_listing_path(cache: Path, dir_md5: str) -> Path:
    """Where DVC keeps a folder output's listing: named by its own md5 (dvc.lock's 'xxx.dir')."""
    return cache / "files" / "md5" / dir_md5[:2] / dir_md5[2:]


def dir_listing(cache: Path, dir_md5: str) -> list[dict] | None:
    """DVC's listing of a folder output (relpath and md5 of each file), from the cache, None if gone."""
    path = dir_listing_path(cache, dir_md5)
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
    conclusion = report.get("license_conclusion")
    lines += ["", "License (the compliance stage's conclusion)"]
    lines += _fields([("concluded", conclusion["concluded_license"]), ("verdict", conclusion["verdict"]),
                      ("intended use", conclusion["intended_use"]),
                      ("commercial use", conclusion.get("commercial_use")
                       or ("allowed" if conclusion["commercial_use_allowed"] else "not allowed"))]
                     ) if conclusion else ["  (the compliance stage's conclusion.json was not found)"]
    lines += ["", "Data sources (licenses as declared in params.yaml compliance.sources)"]
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
