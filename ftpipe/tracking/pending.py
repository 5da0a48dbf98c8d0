"""Upload what stages could not log to MLflow: the `mlflow-pending/*.json` files that
ftpipe.tracking.runs.StageTracker writes when the store is unavailable or fails part way.

    python -m ftpipe.tracking.pending [FOLDER]      # the same as `python -m ftpipe.audit upload-pending`

A file goes into the run it names when the store has that run (the store failed part way). If not
(the store was unavailable from the start, or this is another store), a new run is created under
its invocation's pipeline run, with the stage run's tags. Either way the run gets the tag
`ftpipe.uploaded_from_pending=<file name>`, and the file is deleted once all of it is in the store.

Upload can stop anywhere (store down again, disk full) and be retried without duplicating anything:
after each step the file is rewritten with only the operations still to do; a run created here is
found again by its tag; metric points get a fixed timestamp, so MLflow's SQL store skips a point it
already has even when the file could not be rewritten.

An artifact is uploaded only if it still has the SHA-256 recorded when the stage logged it. If it
changed (or is gone), the run gets `pending/changed-<name>.txt` saying so instead: never different
content under the old name.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from ftpipe.core.io import atomic_write_text
from ftpipe.tracking import runs

UPLOADED_FROM = "ftpipe.uploaded_from_pending"


def upload_pending(pending_dir: Path = runs.PENDING_DIR) -> list[dict[str, Any]]:
    """Replay every pending file of `pending_dir` into the store; one summary per file (its `error`
    is None when the file was uploaded and deleted). Raises only if the store cannot be reached."""
    pending_dir = Path(pending_dir)
    if not pending_dir.is_dir():
        return []
    with _exclusive(pending_dir):   # two uploads at once would both replay the same file
        files = sorted(pending_dir.glob("*.json"))
        if not files:
            return []
        _, client, experiment_id = runs.connect()
        return [upload_file(client, experiment_id, path) for path in files]


def upload_file(client, experiment_id: str, path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"file": path.name, "stage": None, "run_id": None, "created": False,
                               "replayed": 0, "remaining": None, "changed": [], "error": None}
    record: dict[str, Any] = {"ops": []}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        summary["stage"] = record["stage"]
        run_id, summary["created"] = _target_run(client, experiment_id, record, path.name)
        summary["run_id"] = run_id
        if record["run_id"] != run_id:   # a retry must go on in this run, not create another one
            record["run_id"] = run_id
            _save(path, record)
        client.set_tag(run_id, UPLOADED_FROM, path.name)
        while record["ops"]:
            count = _replay(client, experiment_id, run_id, record, summary)
            record["ops"] = record["ops"][count:]
            summary["replayed"] += count
            _save(path, record)
        path.unlink()
    except Exception as err:  # noqa: BLE001 - the file stays for the next upload; the others go on
        summary["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    summary["remaining"] = len(record.get("ops", []))
    return summary


# --- the run ---------------------------------------------------------------------------------------------

def _target_run(client, experiment_id: str, record: dict, file_name: str) -> tuple[str, bool]:
    """(run id, created): the recorded run if the store has it, else one made by an earlier upload
    of this file that stopped before saving its id, else a new one."""
    if record.get("run_id") and _run_exists(client, record["run_id"]):
        return record["run_id"], False
    earlier = client.search_runs([experiment_id], f"tags.`{UPLOADED_FROM}` = '{file_name}'", max_results=1)
    if earlier:
        return earlier[0].info.run_id, False
    started = _millis(record.get("started_at") or record["ended_at"])   # when it ran, not when uploaded
    tags = {**record["tags"], runs.PARENT: _parent(client, experiment_id, record), UPLOADED_FROM: file_name}
    return client.create_run(experiment_id, start_time=started, tags=tags).info.run_id, True


def _parent(client, experiment_id: str, record: dict) -> str:
    """The invocation's pipeline run: the recorded one if the store has it, else found or created."""
    if not (record.get("parent_id") and _run_exists(client, record["parent_id"])):
        record["parent_id"] = runs.pipeline_run_id(client, experiment_id, record["invocation"])
    return record["parent_id"]


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise   # the store failing is not "no such run": creating another one would duplicate it


# --- the operations -----------------------------------------------------------------------------------

def _replay(client, experiment_id: str, run_id: str, record: dict, summary: dict) -> int:
    """Replay the first of the remaining operations (consecutive metrics: as one batch); returns how
    many operations that took."""
    ops = record["ops"]
    op = ops[0]
    kind = op["op"]
    if kind == "metrics":
        # a point gets the stage's own timestamp where it recorded one, else the stage's end: fixed, so
        # that a point replayed twice is identical to the one in the store, which the SQL store skips
        default_time = _millis(record["ended_at"])
        points: list = []
        count = 0
        for batch_op in ops:
            fits = not points or len(points) + len(batch_op.get("metrics", {})) <= runs.METRICS_PER_BATCH
            if batch_op["op"] != "metrics" or not fits:
                break
            points += runs.metric_points(batch_op["metrics"], batch_op.get("timestamp") or default_time,
                                             batch_op["step"])
            count += 1
        runs.log_batch(client, run_id, metrics=points)
        return count
    if kind == "artifact":
        _replay_artifact(client, run_id, op, summary)
    elif kind == "end":
        runs.apply_op(client, run_id, {**op, "end_time": _millis(record["ended_at"])})
    elif kind == "parent_failed":
        runs.mark_failed(client, _parent(client, experiment_id, record), record["stage"])
    else:
        runs.apply_op(client, run_id, op)
    return 1


def _replay_artifact(client, run_id: str, op: dict, summary: dict) -> None:
    path = Path(op["path"])
    now = runs.content_digest(path) if path.exists() else None   # as the stage computed it
    if now != op["sha256"]:
        state = f"now has SHA-256 {now}" if now else "no longer exists"
        client.log_text(run_id, f"{path} was logged by the stage with SHA-256 {op['sha256']} but {state} "
                                f"(changed after the stage ran, before upload): not uploaded.\n",
                        f"pending/changed-{path.name}.txt")
        summary["changed"].append(str(path))
    else:
        runs.apply_op(client, run_id, op)


# --- plumbing -------------------------------------------------------------------------------------------

def _millis(timestamp: str) -> int:
    return int(dt.datetime.fromisoformat(timestamp).timestamp() * 1000)


def _save(path: Path, record: dict) -> None:
    """Atomically: an upload killed here leaves the old file or the new one, never a part."""
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (flock works on a directory's descriptor): no lock file
    is left behind."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)   # closing releases the lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftpipe.tracking.pending", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=runs.PENDING_DIR,
                        help=f"where the pending files are (default: {runs.PENDING_DIR})")
    args = parser.parse_args(argv)
    try:
        summaries = upload_pending(args.folder)
    except Exception as err:  # noqa: BLE001 - one line, not a traceback: nothing was uploaded
        print(f"error: MLflow store {runs.tracking_uri()} unavailable ({type(err).__name__}: {str(err)[:300]}); "
              f"nothing uploaded, {args.folder}/ kept", file=sys.stderr)
        return 1
    if not summaries:
        print(f"nothing pending in {args.folder}/")
    for summary in summaries:
        if summary["error"] is None:
            how = "new run" if summary["created"] else "run"
            print(f"uploaded {summary['file']}: {summary['replayed']} operations into {how} {summary['run_id']}")
        else:
            print(f"kept {summary['file']}: {summary['error']} ({summary['remaining']} operations left; "
                  f"run it again)", file=sys.stderr)
        for changed in summary["changed"]:
            print(f"  {changed} changed since the stage logged it: not uploaded (see pending/changed-"
                  f"{Path(changed).name}.txt in the run)", file=sys.stderr)
    return 1 if any(summary["error"] for summary in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
