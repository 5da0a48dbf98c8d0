"""Reproducing a pipeline run (`python -m ftpipe.audit reproduce`) and comparing its result metrics.

reproduce checks out the run's commit in a fresh git worktree, writes the run's own params.yaml there,
copies the user data that git does not hold (data/sources, models/source), runs `dvc repro --force`
into the same MLflow store (the new pipeline run is tagged `ftpipe.reproduces`) and compares every
result metric, timings and memory excluded (ftpipe.tracking.runs.is_measurement), and the machines the two runs
ran on (CPU model and the instruction sets that choose matrix kernels, GPU, numeric packages). The verdict
is one of: bit-identical (every metric equal), within tolerance (|difference| <= absolute + relative x
|recorded|, the params.yaml `reproduce.*` values unless --rtol/--atol say otherwise) or different. What
to expect: on the same machine the CPU path is bit-identical; across machines (AMD EPYC vs Intel Xeon with
AMX) bf16 kernels differ and results agree within the tolerance. Its report (report.json), the dvc log
(repro.log) and, with --keep, the worktree stay in the work folder; the verdict is also tagged on the
reproducing run. The runs themselves are read through ftpipe.audit.provenance_chain's store helpers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.audit.provenance_chain import get_run, open_store, pipeline_run_of, read_artifact, stage_runs
from ftpipe.core.errors import PipelineError
from ftpipe.core.io import write_json
from ftpipe.core.paths import LOCAL_MODELS_DIR, SOURCES_DIR
from ftpipe.tracking.runs import KIND, is_measurement, project_root, tracking_uri

USER_DATA_DIRS = (SOURCES_DIR, LOCAL_MODELS_DIR)   # inputs that live outside git: copied into the worktree
# What decides a run's numbers besides its code, params and data: the env.* tags of its stage runs.
MACHINE_TAGS = {"cpu": "env.cpu", "cpu_flags": "env.cpu_flags", "gpu": "env.gpu", "torch": "env.torch",
                "transformers": "env.transformers", "peft": "env.peft", "bitsandbytes": "env.bitsandbytes",
                "unsloth": "env.unsloth", "python": "env.python"}
VERDICTS = ("bit-identical", "within tolerance", "different")


def within(difference: float, recorded: float, tolerance: dict[str, float]) -> bool:
    return difference <= tolerance["absolute"] + tolerance["relative"] * abs(recorded)


# --- reproduce: comparing ----------------------------------------------------------------------------------

def compare_metrics(recorded: dict[str, float], reproduced: dict[str, float], tolerance: dict[str, float]
                    ) -> list[dict]:
    """One row per result metric of the recorded run (measurements of time and memory left out): identical when
    equal (two NaNs are), ok when |reproduced - recorded| <= tolerance["absolute"] + tolerance["relative"] x
    |recorded|; a metric the reproduction lacks fails. A metric only the reproduction has is listed, ok (it
    says nothing about the recorded results)."""
    rows = []
    for name in sorted(set(recorded) | set(reproduced)):
        if is_measurement(name):
            continue
        old, new = recorded.get(name), reproduced.get(name)
        if old is None:
            rows.append({"metric": name, "recorded": None, "reproduced": new, "difference": None, "identical": True,
                         "ok": True, "note": "only in the reproduction"})
        elif new is None:
            rows.append({"metric": name, "recorded": old, "reproduced": None, "difference": None, "identical": False,
                         "ok": False, "note": "missing from the reproduction"})
        else:
            both_nan = math.isnan(old) and math.isnan(new)
            difference = 0.0 if both_nan else abs(new - old)
            rows.append({"metric": name, "recorded": old, "reproduced": new, "difference": difference,
                         "identical": both_nan or new == old, "ok": both_nan or within(difference, old, tolerance),
                         "note": None})
    return rows


def verdict(rows: list[dict]) -> str:
    """bit-identical, within tolerance or different (see the module docstring)."""
    if all(row["identical"] for row in rows):
        return "bit-identical"
    return "within tolerance" if all(row["ok"] for row in rows) else "different"


def machine_of(client, pipeline) -> dict[str, str | None]:
    """The machine a pipeline run ran on, from the env.* tags of its executed stage runs (train's first: it does
    the arithmetic that depends on the machine most)."""
    runs = [run for run in stage_runs(client, pipeline).values() if run.data.tags.get("ftpipe.skipped") != "true"]
    runs.sort(key=lambda run: run.data.tags.get("ftpipe.stage") != "train")
    tags = runs[0].data.tags if runs else {}
    return {name: tags.get(tag) for name, tag in MACHINE_TAGS.items()}


def compare_machines(recorded: dict[str, str | None], reproduced: dict[str, str | None]) -> dict[str, Any]:
    """Where two machines differ, on what both records know (a run logged before a field was recorded differs
    in nothing there: unknown, and said so)."""
    differences = [{"what": key, "recorded": recorded.get(key), "reproduced": reproduced.get(key)}
                   for key in MACHINE_TAGS if recorded.get(key) and reproduced.get(key)
                   and recorded[key] != reproduced[key]]
    unknown = [key for key in MACHINE_TAGS if bool(recorded.get(key)) != bool(reproduced.get(key))]
    return {"recorded": recorded, "reproduced": reproduced, "same": not differences, "differences": differences,
            "unknown": unknown}


def expectation(machine: dict[str, Any], result: str) -> str:
    """What the verdict means for this pair of machines."""
    if machine["same"]:
        return ("same machine: bit-identical, as promised" if result == "bit-identical" else
                f"same machine, but {result}: on one machine the CPU path repeats bit for bit, so something else "
                "changed (an input outside the pipeline, a GPU kernel that is not deterministic)")
    what = ", ".join(d["what"] for d in machine["differences"])
    return (f"another machine ({what} differ): {result}" +
            ("" if result != "different" else "; across machines results agree within the tolerance, or differ "
                                              "by more than bf16 kernels explain"))


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
    bound = f"{tolerance['absolute']:g} + {tolerance['relative']:g} x |recorded|"
    for row in rows:
        cells = [_cell(row[k]) for k in ("recorded", "reproduced")] + [_cell(row["difference"], ".3g")]
        mark = "yes" if row["ok"] else "NO"
        lines.append(f"{row['metric']:<{width}}  {cells[0]:>16}  {cells[1]:>16}  {cells[2]:>11}  {mark}"
                     + (f"  ({row['note']})" if row["note"] else ""))
    failed = sum(not row["ok"] for row in rows)
    identical = sum(row["identical"] for row in rows)
    lines.append(f"{identical} of {len(rows)} result metrics bit-identical, {len(rows) - failed} within {bound}"
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


def reproduction_report(client, original, new, tolerance: dict[str, float]) -> dict[str, Any]:
    rows = compare_metrics(original.data.metrics, new.data.metrics, tolerance)
    locks = [_yaml(read_artifact(client, run.info.run_id, "pipeline/dvc.lock")) for run in (original, new)]
    machine = compare_machines(machine_of(client, original), machine_of(client, new))
    result = verdict(rows)
    return {"recorded_run_id": original.info.run_id, "reproduced_run_id": new.info.run_id,
            "commit": original.data.tags["git.commit"], "recorded_git_dirty": original.data.tags.get("git.dirty"),
            "tolerance": tolerance, "verdict": result, "agree": result != "different",
            "machine": machine, "expectation": expectation(machine, result), "metrics": rows,
            "dependency_changes": external_dep_changes(*locks)}


def reproduce(run_id: str, workdir: Path | None, tolerance: dict[str, float], keep: bool) -> dict[str, Any]:
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
    client.set_tag(run_id, "ftpipe.reproduced", report["verdict"])
    client.log_dict(run_id, report, "reproduce/report.json")


def _yaml(text: str | None) -> dict | None:
    return yaml.safe_load(text) if text else None


def format_reproduction(report: dict[str, Any]) -> str:
    lines = [f"Reproduction of run {report['recorded_run_id']} by run {report['reproduced_run_id']} "
             f"(commit {report['commit']})", format_comparison(report["metrics"], report["tolerance"]),
             f"verdict: {report['verdict']} ({report['expectation']})"]
    for difference in report["machine"]["differences"]:
        lines.append(f"  machine {difference['what']}: recorded {difference['recorded']}, "
                     f"reproduced {difference['reproduced']}")
    if report["dependency_changes"]:
        lines.append("Inputs outside the pipeline that differ from the recorded run (a likely cause of a difference):")
        lines += [f"  {c['path']}: recorded md5 {c['recorded']}, reproduced {c['reproduced']}"
                  for c in report["dependency_changes"]]
    lines.append(f"report: {report['workdir']}/report.json" + (f"; worktree kept at {report['worktree']}"
                                                                 if report["worktree"] else ""))
    return "\n".join(lines)
