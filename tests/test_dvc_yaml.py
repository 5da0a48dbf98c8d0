"""dvc.yaml agrees with the code: each stage runs its own module, lists every repository module
that module imports as a dependency, lists exactly the params keys the stage reads, and writes
the output folder and metrics file the code writes. Otherwise `dvc repro` would rerun too much or,
worse, too little."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from ftpipe import paths
from ftpipe.params import load_params
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS_YAML = yaml.safe_load((REPO / "params.yaml").read_text())
OUTPUT_DIRS = paths.STAGE_OUTPUTS


def repo_imports(module_file: Path, seen: set[Path] | None = None) -> set[Path]:
    """Repository files a module imports, transitively (ftpipe/* and stages/*, package __init__s too)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(module_file.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if name.split(".")[0] not in ("ftpipe", "stages"):
                continue
            parts = name.split(".")
            candidates = [REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")]
            if len(parts) > 1:
                candidates.append(REPO / parts[0] / "__init__.py")
            for path in candidates:
                if path.exists() and path not in seen and path.stat().st_size:
                    seen.add(path)
                    repo_imports(path, seen)
    return seen


def params_subtree(dotted: str):
    node = PARAMS_YAML
    for key in dotted.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def test_every_stage_has_its_module_and_the_dag_is_complete():
    assert list(DVC) == [*OUTPUT_DIRS, "record"]   # ftpipe.paths.STAGE_OUTPUTS is in dvc.yaml's order
    for name, stage in DVC.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert (REPO / "stages" / f"{name}.py").exists()


@pytest.mark.parametrize("name", sorted(OUTPUT_DIRS) + ["record"])
def test_deps_list_every_imported_repository_module(name):
    module = REPO / "stages" / f"{name}.py"
    needed = {path.relative_to(REPO).as_posix() for path in repo_imports(module) | {module}}
    needed.discard("stages/__init__.py")   # empty package marker
    missing = needed - set(DVC[name]["deps"])
    assert not missing, f"dvc.yaml stage {name!r} lacks deps {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(OUTPUT_DIRS))
def test_params_listed_are_exactly_those_the_stage_reads(name):
    listed = DVC[name].get("params", [])
    read = importlib.import_module(f"stages.{name}").tracked_params(load_params(REPO / "params.yaml"))

    def within(key: str, parent: str) -> bool:
        return key == parent or key.startswith(parent + ".")

    unlisted = [key for key in read if not any(within(key, parent) for parent in listed)]
    unread = [key for key in listed if not any(within(r, key) or within(key, r) for r in read)]
    assert not unlisted, f"dvc.yaml {name}: the stage reads keys it does not list: {unlisted}"
    assert not unread, f"dvc.yaml {name}: lists keys the stage does not read: {unread}"
    for key in listed:
        params_subtree(key)   # every listed key exists in params.yaml


@pytest.mark.parametrize("name", sorted(OUTPUT_DIRS))
def test_outputs_and_metrics_match_the_code(name):
    outs = [next(iter(out)) if isinstance(out, dict) else out for out in DVC[name]["outs"]]
    assert outs[0] == OUTPUT_DIRS[name].as_posix()
    metrics = [next(iter(m)) for m in DVC[name]["metrics"]]
    assert metrics == [paths.metrics_file(name).as_posix()]


def test_only_the_checkpoints_persist():
    persistent = [next(iter(out)) for stage in DVC.values() for out in stage.get("outs", [])
                  if isinstance(out, dict) and next(iter(out.values())).get("persist")]
    assert persistent == [paths.CHECKPOINTS_DIR.as_posix()]


def test_record_runs_last_and_on_every_invocation():
    """It closes the MLflow pipeline run: DVC must run it every time, after every other stage."""
    record = DVC["record"]
    assert record["always_changed"] is True and "params" not in record and "outs" not in record
    assert [next(iter(m)) for m in record["metrics"]] == [paths.metrics_file("record").as_posix()]
    produced = {stage["outs"][0] if isinstance(stage["outs"][0], str) else next(iter(stage["outs"][0]))
                for name, stage in DVC.items() if name != "record"}
    consumed = {dep for name, stage in DVC.items() if name != "record" for dep in stage["deps"]}
    # the outputs no other stage reads are the DAG's ends: record depends on each of them
    ends = {out for out in produced if not any(dep == out or dep.startswith(out + "/") for dep in consumed)}
    assert ends == set(record["deps"]) - {dep for dep in record["deps"] if dep.endswith(".py")}
