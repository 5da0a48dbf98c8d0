"""Stage `record`: a skipped stage is linked to the run that made its outputs, also when the invocation
that made them failed later (and so was never closed); only a failing store reads as "MLflow
unavailable", a bug of ours fails the stage."""
from __future__ import annotations

import pytest

from ftpipe.core.io import write_json
from ftpipe.core.paths import PROVENANCE_FILE, RAW_DIR


def test_a_skipped_stage_is_linked_to_its_maker_even_after_a_failed_invocation(in_tmp_project, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ftpipe.tracking.runs import stage_run, tracking_uri
    from stages.record import close_pipeline_run

    # Invocation 1: ingest succeeds, then compliance fails: the record stage never runs, ingest's run is
    # never tagged with its outputs' digest.
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:1:1")
    with stage_run("ingest", {}) as tracker:
        write_json(RAW_DIR / PROVENANCE_FILE, {"stage": "ingest", "mlflow": tracker.reference()})
    maker = tracker.run_id
    with pytest.raises(RuntimeError), stage_run("compliance", {}):
        raise RuntimeError("the license gate failed")

    # Invocation 2: ingest is skipped (its outputs are up to date).
    monkeypatch.setenv("FTPIPE_INVOCATION", "host:2:2")
    lock = {"ingest": {"outs": [{"path": "data/raw", "md5": "abc.dir"}]}}
    summary = close_pipeline_run("host:2:2", ["ingest"], lock, {"ingest": {"sources": []}}, {})
    assert summary["skipped"] == {"ingest": maker}
    skipped = MlflowClient(tracking_uri()).search_runs(
        [MlflowClient(tracking_uri()).get_experiment_by_name("ftpipe").experiment_id],
        "tags.`ftpipe.skipped` = 'true'")
    assert [run.data.tags["ftpipe.produced_by"] for run in skipped] == [maker]


@pytest.mark.parametrize("error, reported", [
    (OSError("disk full"), True),
    (__import__("mlflow").exceptions.MlflowException("store locked"), True),
    (KeyError("stages"), False),
])
def test_only_store_failures_are_reported_as_mlflow_unavailable(in_tmp_project, monkeypatch, capsys, error,
                                                                reported):
    import shutil

    import stages.record as record
    from tests.conftest import REPO

    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(REPO / name, in_tmp_project / name)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(record, "close_pipeline_run", failing)
    if reported:
        record.main()
        assert "warning: MLflow unavailable" in capsys.readouterr().err
    else:
        with pytest.raises(KeyError):
            record.main()
        assert "MLflow unavailable" not in capsys.readouterr().err


def test_a_bare_on_that_dvc_wrote_back_is_the_word_the_stages_read():
    """`dvc exp run -S` rewrites params.yaml in YAML 1.2, where on/off are words, so a quoted 'on' comes back bare,
    which YAML 1.1 (PyYAML) reads as true: the run's name must not call that a change."""
    from stages.record import as_the_stages_read_them

    raw = {"train": {"gradient_checkpointing": True, "packing": True, "lora": {"r": 16}}}
    typed = {"train.gradient_checkpointing": "on", "train.packing": True, "train.lora.r": 16}
    assert as_the_stages_read_them(raw, typed) == {"train": {"gradient_checkpointing": "on", "packing": True,
                                                             "lora": {"r": 16}}}
