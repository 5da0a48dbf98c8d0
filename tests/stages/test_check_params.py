"""Stage `check_params`: params.yaml validated before any other stage; its gate.json is the same bytes after
every valid edit (so nothing reruns because of it), and a bad file fails naming the key."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from stages import check_params
from tests.conftest import REPO


@pytest.fixture
def project(in_tmp_project) -> Path:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(REPO / name, in_tmp_project / name)
    return in_tmp_project


def test_a_valid_file_writes_the_same_gate_after_any_valid_edit(project, capsys):
    check_params.main()
    gate = (project / "data/checked_params/gate.json").read_bytes()
    assert "check_params: params.yaml is valid" in capsys.readouterr().out
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("learning_rate: 5.0e-4", "learning_rate: 1.0e-3"))
    check_params.main()
    assert (project / "data/checked_params/gate.json").read_bytes() == gate
    provenance = yaml.safe_load((project / "data/checked_params/provenance.json").read_text())
    assert provenance["stage"] == "check_params" and provenance["keys_checked"] > 50


def test_a_typo_fails_with_the_did_you_mean_message_and_writes_nothing(project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  learning_rate:", "  learnig_rate:"))
    with pytest.raises(PipelineError, match=r"unknown key 'train.learnig_rate'. Did you mean 'train.learning_rate'\?"
                                            r"(.|\n)*No stage ran and no output was touched"):
        check_params.main()
    assert not (project / "data/checked_params").exists()


def test_a_key_dvc_yaml_lists_but_params_yaml_lacks_is_named_with_its_stage(project):
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc["stages"]["train"]["params"].append("train.lora.rank")
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    with pytest.raises(PipelineError,
                       match=r"dvc.yaml lists params keys that params.yaml lacks: train: train.lora.rank"):
        check_params.main()
