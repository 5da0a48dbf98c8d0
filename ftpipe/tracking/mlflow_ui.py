"""The MLflow UI over the project's store, on loopback only. From the project root:

    .venv/bin/python -m ftpipe.tracking.mlflow_ui            # then open the URL it prints (port 5000)

`--port N` and `--host H` change where it listens. The store is the pipeline's (ftpipe.tracking.runs):
$MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db, artifacts under <project root>/mlartifacts.
It is `mlflow server` with one worker, telemetry off and MLflow's background job runner off (the UI needs
neither; the job runner only serves GenAI evaluation jobs and would be one more process to stop).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from ftpipe import OFFLINE_ENV
from ftpipe.core.processes import stop_process_group
from ftpipe.tracking.runs import DEFAULT_EXPERIMENT, project_root, tracking_uri

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5000
SERVER_ENV = {**OFFLINE_ENV, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_command(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """`mlflow server` on the project's store. New experiments and proxied uploads go to <root>/mlartifacts;
    the pipeline's runs keep the file:// location they recorded (ftpipe.tracking.runs sets the same folder)."""
    artifacts = (project_root() / "mlartifacts").as_uri()
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(),
            "--default-artifact-root", artifacts, "--artifacts-destination", artifacts,
            "--host", host, "--port", str(port), "--workers", "1"]


def experiment_id(store_uri: str, name: str = DEFAULT_EXPERIMENT) -> str | None:
    """The id of experiment `name` in a SQLite store, read-only (a missing store is not created), else None."""
    if not store_uri.startswith("sqlite:///"):
        return None
    read_only = f"file:{urllib.parse.quote(store_uri.removeprefix('sqlite:///'))}?mode=ro"
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(read_only, uri=True)) as db:
        row = db.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                         (name,)).fetchone()
        return str(row[0]) if row else None
    return None


def experiment_page(base_url: str, exp_id: str | None) -> str:
    """The page to open. MLflow 3.17 starts every browser in its GenAI view, whose experiment page is a
    traces overview; `workflowType=machine_learning` opens the runs table instead (the sidebar's
    "Model training" switch does the same and is remembered per browser)."""
    page = f"experiments/{exp_id}" if exp_id else "experiments"
    return f"{base_url}/#/{page}?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftpipe.tracking.mlflow_ui",
                                     description="Serve the MLflow UI over the project's MLflow store.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    store, command = tracking_uri(), server_command(args.host, args.port)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        print(f"note: no store at {store} yet (run from the project root?): the UI starts empty", flush=True)
    page = experiment_page(f"http://{args.host}:{args.port}", experiment_id(store))
    print(f"MLflow UI for {store}: open {page} (Ctrl-C stops it)\n  {shlex.join(command)}", flush=True)
    os.execve(command[0], command, {**os.environ, **SERVER_ENV})   # the server replaces us: Ctrl-C reaches it


# --- for tests: the documented command as a subprocess -----------------------------------------------

def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_ui(log: Path, env: dict[str, str] | None = None, host: str = DEFAULT_HOST, port: int | None = None,
               timeout: float = 60.0) -> Iterator[str]:
    """Run `python -m ftpipe.tracking.mlflow_ui` (with `env` added) in its own process group, output to `log`; yield
    its base URL once /health and the page answer; on exit stop the whole group (the server and its uvicorn
    child), even when the body raised."""
    port = port or free_port(host)
    command = [sys.executable, "-m", "ftpipe.tracking.mlflow_ui", "--host", host, "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        url = f"http://{host}:{port}"
        _wait_until_up(process, url, timeout, command, log)
        yield url
    finally:
        stop_process_group(process)


def _wait_until_up(process: subprocess.Popen, url: str, timeout: float, command: list[str], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):   # refused until uvicorn listens
            with urllib.request.urlopen(f"{url}/health", timeout=2) as health, \
                    urllib.request.urlopen(f"{url}/", timeout=5) as page:   # the single-page app itself
                if health.status == 200 and b'id="root"' in page.read():
                    return
        time.sleep(0.25)
    state = f"exited with {process.returncode}" if process.poll() is not None else f"not up after {timeout:.0f} s"
    raise RuntimeError(f"MLflow UI {state} at {url}: {shlex.join(command)}\n"
                       f"its log ({log}) ends:\n{log.read_text(errors='replace')[-3000:]}")


if __name__ == "__main__":
    main()
