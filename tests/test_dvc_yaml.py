"""dvc.yaml agrees with the code: each stage runs its own module, lists exactly the repository modules
that module imports (found by reading its import statements, transitively: nothing more, or an edit of
an unrelated module would rerun it; nothing less, or an edit would not), lists exactly the params keys
that can change its result, and writes the output folder and metrics file the code writes. Otherwise
`dvc repro` would rerun too much or, worse, too little. `dvc status` itself is asked too: after an edit
of each shared module, the stages DVC reports changed are exactly the ones importing it."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from ftpipe.core import paths
from ftpipe.core.params import load_params
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS_YAML = yaml.safe_load((REPO / "params.yaml").read_text())
OUTPUT_DIRS = paths.STAGE_OUTPUTS


def repo_imports(module_file: Path, seen: set[Path] | None = None) -> set[Path]:
    """Repository files a module imports, transitively (ftpipe/* and stages/*, package __init__s too)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(module_file.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 # `from ftpipe.data import pii` imports ftpipe/data/pii.py;
                 # `from ftpipe.core.io import x`, ftpipe/core/io.py
                 else [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if name.split(".")[0] not in ("ftpipe", "stages"):
                continue
            parts = name.split(".")
            candidates = [REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")]
            # importing ftpipe.core.io runs ftpipe/__init__.py and ftpipe/core/__init__.py first
            candidates += [REPO.joinpath(*parts[:depth], "__init__.py") for depth in range(1, len(parts))]
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
    assert list(DVC) == [*OUTPUT_DIRS, "record"]   # ftpipe.core.paths.STAGE_OUTPUTS is in dvc.yaml's order
    for name, stage in DVC.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert (REPO / "stages" / f"{name}.py").exists()


def imported_modules(name: str) -> set[str]:
    """The repository files stage `name` runs: its module and every module it imports, transitively."""
    module = REPO / "stages" / f"{name}.py"
    needed = {path.relative_to(REPO).as_posix() for path in repo_imports(module) | {module}}
    needed.discard("stages/__init__.py")   # empty package marker
    return needed


@pytest.mark.parametrize("name", sorted(OUTPUT_DIRS) + ["record"])
def test_code_deps_are_exactly_the_imported_repository_modules(name):
    needed = imported_modules(name)
    listed = {dep for dep in DVC[name]["deps"] if dep.endswith(".py")}
    assert not needed - listed, f"dvc.yaml stage {name!r} lacks deps {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml stage {name!r} lists modules it never imports: {sorted(listed - needed)}"


def test_no_stage_imports_another_stage():
    """A stage importing another stage's module reruns whenever that stage's code is edited."""
    for name in DVC:
        others = {dep for dep in imported_modules(name) if dep.startswith("stages/") and dep != f"stages/{name}.py"}
        assert not others, f"stage {name!r} imports {sorted(others)}: move what it uses into ftpipe/"


@pytest.mark.parametrize("name", sorted(OUTPUT_DIRS))
def test_params_listed_are_exactly_those_that_change_the_stage_result(name):
    module = importlib.import_module(f"stages.{name}")
    params = load_params(REPO / "params.yaml")
    listed = DVC[name].get("params", [])
    read = module.tracked_params(params)
    # keys the stage reads that change no result (e.g. train.checkpoint_every): never listed, so no rerun
    neutral = module.settings(params) if hasattr(module, "settings") else {}
    assert not set(neutral) & set(read), f"{name}: a key cannot both change and not change the result"
    assert not [key for key in listed if key in neutral], f"dvc.yaml {name}: lists result-neutral keys"

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


def test_no_output_persists_so_every_stage_has_dvcs_run_cache():
    """A persisted output turns DVC's run cache off for its stage: a stage that failed (or a params typo
    fixed) could then only be rebuilt by running it again. Train keeps its checkpoints outside DVC."""
    persistent = [next(iter(out)) for stage in DVC.values() for out in stage.get("outs", [])
                  if isinstance(out, dict) and next(iter(out.values())).get("persist")]
    assert persistent == []
    outs = {next(iter(out)) if isinstance(out, dict) else out
            for stage in DVC.values() for out in stage.get("outs", [])}
    assert paths.CHECKPOINTS_DIR.as_posix() not in outs


def test_every_stage_runs_after_the_params_check():
    """DVC deletes a stage's outputs before running it: params.yaml must be validated before any of that."""
    def upstream(name: str, seen: set[str]) -> set[str]:
        for dep in DVC[name].get("deps", []):
            for other, stage in DVC.items():
                outs = [next(iter(out)) if isinstance(out, dict) else out for out in stage.get("outs", [])]
                if other not in seen and any(dep == out or dep.startswith(out + "/") for out in outs):
                    seen.add(other)
                    upstream(other, seen)
        return seen

    assert "params.yaml" in DVC["check_params"]["deps"] and "params" not in DVC["check_params"]
    for name in DVC:
        if name not in ("check_params", "record"):
            assert "check_params" in upstream(name, set()), f"stage {name!r} can run before params.yaml is checked"


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


def dvc_status(project: Path) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=project,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout or "{}")


def changed_code(status: dict) -> dict[str, set[str]]:
    """Stage -> the .py deps DVC reports changed."""
    changed: dict[str, set[str]] = {}
    for name, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict) and "changed deps" in entry:
                changed[name] = {path for path in entry["changed deps"] if path.endswith(".py")}
    return {name: paths for name, paths in changed.items() if paths}


def test_dvc_status_after_editing_code_reports_exactly_the_stages_that_import_it(tmp_path):
    """A project whose dvc.lock records the current code; then every shared module gets an edited comment
    and tokenize an edited function that no other stage uses. DVC must report each stage changed by
    exactly the modules it imports, and train, evaluate, merge and quantize not by stages/tokenize.py."""
    import hashlib
    import shutil
    import subprocess
    import sys

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    for folder in ("stages", "ftpipe"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)

    def md5(path: str) -> dict:
        data = (tmp_path / path).read_bytes()
        return {"path": path, "hash": "md5", "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                "size": len(data)}

    lock = {"schema": "2.0", "stages": {name: {"cmd": stage["cmd"], "deps": [md5(dep) for dep in stage["deps"]
                                                                             if dep.endswith(".py")]}
                                        for name, stage in DVC.items()}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert changed_code(dvc_status(tmp_path)) == {}

    shared = sorted(path.relative_to(tmp_path).as_posix() for path in (tmp_path / "ftpipe").glob("*.py"))
    for path in shared:
        with open(tmp_path / path, "a") as handle:
            handle.write("\n# an edited comment\n")
    tokenize = tmp_path / "stages/tokenize.py"
    tokenize.write_text(tokenize.read_text().replace('"""Rows {tokens, <split>: examples, ...}',
                                                     '"""Edited. Rows {tokens, <split>: examples, ...}'))
    reported = changed_code(dvc_status(tmp_path))
    expected = {name: {dep for dep in imported_modules(name) if dep in shared} | (
        {"stages/tokenize.py"} if name == "tokenize" else set()) for name in DVC}
    assert reported == {name: deps for name, deps in expected.items() if deps}
    for name in ("train", "evaluate", "merge", "quantize"):
        assert "stages/tokenize.py" not in reported[name]
    # a module no stage imports reruns nothing
    assert not any("ftpipe/release/verify.py" in deps for deps in reported.values())
