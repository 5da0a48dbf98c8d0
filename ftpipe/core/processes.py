"""Child servers started in a process group of their own (the MLflow UI, llama-cpp-python's server)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the group `process` leads (a server forwards it to its workers), then SIGKILL to what is left
    after 10 s (a child outliving its parent, or a hung server)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
