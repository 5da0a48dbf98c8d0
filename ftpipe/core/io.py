"""Atomic writes and content hashes.

A stage never leaves a half-written output behind: it writes into a temporary sibling
folder and renames it into place only once everything succeeded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from ftpipe.core.errors import PipelineError
from ftpipe.core.paths import PROVENANCE_FILE

HASH_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB weight files
# In a model folder (base, adapter): the SHA-256 of every file but the run's own records. Later stages
# depend on it in dvc.yaml instead of the whole folder, whose provenance.json changes with every run (time,
# MLflow run): a rerun that writes the same weights reruns nothing after it.
CONTENT_FILE = "content.json"
RUN_RECORDS = (PROVENANCE_FILE, CONTENT_FILE)


def _temporary_prefix(final: Path, kind: str) -> str:
    """`.<name>.tmp-<pid>-`: the pid tells a later run whether the writer is still alive."""
    return f".{final.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_dead_temporaries(final: Path) -> list[Path]:
    """Remove the temporaries of `final` (`.<name>.tmp-*`, `.<name>.old-*`) left by a writer that no longer
    runs: a process killed with SIGKILL runs no cleanup. A live writer's are kept. Returns what was removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name[len(f".{final.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            print(f"removed {path}: the temporary of a run that was killed", file=sys.stderr)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final`, on failure it is removed.
    Temporaries of an earlier writer that was killed are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final, "tmp"), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f"{_temporary_prefix(final, 'old')}0"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found. Run the stage that produces it first (`dvc repro`).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: line {err.lineno}: invalid JSON ({err.msg}).") from err


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines (plain write: callers put it inside an atomic_dir). Returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            # default=str: Parquet and CSV values JSON lacks (timestamps, dates, decimals) become text
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file written by a stage; a broken line is an error naming the line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PipelineError(
                    f"{path}: line {line_number}: invalid JSON ({err.msg}). "
                    "Fix or remove that line, then rerun."
                ) from err
    return rows


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_hashes(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under `folder`, keyed by relative POSIX path, in sorted order."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() not in exclude
    }


def tree_digest(hashes: dict[str, str]) -> str:
    """One digest for a whole folder: the hash of its sorted (path, hash) list."""
    return sha256_text("\n".join(f"{name} {digest}" for name, digest in sorted(hashes.items())))


def write_content_record(folder: Path, **facts: Any) -> dict[str, Any]:
    """Write `folder`/content.json: `facts` (which must depend on the content alone), the SHA-256 of every
    file but the run records, and their digest. Returns it."""
    hashes = file_hashes(folder, exclude=RUN_RECORDS)
    record = {**facts, "files_sha256": hashes, "digest": tree_digest(hashes)}
    write_json(Path(folder) / CONTENT_FILE, record)
    return record
