"""The commands' common ending: a PipelineError is one line and exit 2, Ctrl-C exit 130, else run's own code."""
import argparse

import pytest

from ftpipe.core.cli import positive_int, project_folder, run_command
from ftpipe.core.errors import PipelineError


def test_positive_int_refuses_zero_and_negatives():
    assert positive_int("3") == 3
    for text in ("0", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be positive, got {int(text)}"):
            positive_int(text)


def test_run_command_ends_with_one_line_and_an_exit_code(capsys):
    def failing(args):
        raise PipelineError("models/merged: no model here")

    def interrupted(args):
        raise KeyboardInterrupt

    args = argparse.Namespace()
    assert run_command(lambda args: 0, args) == 0
    assert run_command(failing, args) == 2
    assert capsys.readouterr().err == "error: models/merged: no model here\n"
    assert run_command(interrupted, args) == 130
    assert capsys.readouterr().err == "\n"


def test_project_folder_must_exist(tmp_path):
    assert project_folder(str(tmp_path)) == tmp_path
    with pytest.raises(argparse.ArgumentTypeError, match="missing: no such project folder"):
        project_folder(str(tmp_path / "missing"))
