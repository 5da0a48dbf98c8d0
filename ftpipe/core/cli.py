"""What every command of ftpipe does the same way (python -m ftpipe.chat, python -m ftpipe.serve): argument types,
and how a run ends: a PipelineError is one line on stderr and exit code 2, Ctrl-C exit code 130, no traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from ftpipe.core.errors import PipelineError


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def project_folder(text: str) -> Path:
    """--project: the folder whose models/, params.yaml and release are used."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such project folder")
    return Path(text)


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)`'s exit code; 2 after a PipelineError (its message on stderr), 130 after Ctrl-C outside the
    places the command handles it itself (loading a model, starting a server)."""
    try:
        return run(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
