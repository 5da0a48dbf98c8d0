"""ftpipe.core.io: atomic outputs (all or nothing, ordinary permissions), JSON helpers, content hashes."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    file_hashes,
    read_json,
    read_jsonl,
    sha256_file,
    sha256_text,
    tree_digest,
    write_json,
    write_jsonl,
)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    """Temporary or backup entries the atomic helpers may have left next to their outputs."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- atomic_dir --------------------------------------------------------------------------------

def test_atomic_dir_publishes_on_success(tmp_path):
    final = tmp_path / "deep" / "out"          # missing parents are created
    with atomic_dir(final) as work:
        assert work != final and work.parent == final.parent and list(work.iterdir()) == []
        assert not final.exists()              # nothing is visible before the block succeeds
        (work / "a.txt").write_text("A")
        (work / "sub").mkdir()
        (work / "sub" / "b.txt").write_text("B")
    assert (final / "a.txt").read_text() == "A" and (final / "sub" / "b.txt").read_text() == "B"
    assert not work.exists()
    assert leftovers(final.parent) == []


def test_a_killed_writers_temporaries_are_removed_by_the_next_run(tmp_path):
    """SIGKILL runs no cleanup: the next atomic_dir of the same output removes what the dead process
    left (its temporary and backup folders, a half-written file), and keeps a live writer's."""
    import signal
    import subprocess
    import sys

    final = tmp_path / "adapter"
    script = ("import os, signal, sys; from pathlib import Path; from ftpipe.core.io import atomic_dir\n"
              "with atomic_dir(Path(sys.argv[1])) as work:\n"
              "    (work / 'half.bin').write_bytes(b'x' * 10)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(final)], cwd=Path(__file__).parents[2])
    assert killed.returncode == -signal.SIGKILL
    assert len(leftovers(tmp_path)) == 1 and leftovers(tmp_path)[0].startswith(".adapter.tmp-")
    live_writer = tmp_path / f".adapter.tmp-{os.getpid()}-inprogress"   # this process is alive
    live_writer.mkdir()
    with atomic_dir(final) as work:
        (work / "ok.txt").write_text("ok")
    assert leftovers(tmp_path) == [live_writer.name]
    assert (final / "ok.txt").read_text() == "ok"


def test_atomic_dir_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    (final / "keep-name.txt").write_text("old")
    with atomic_dir(final) as work:
        (work / "keep-name.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["keep-name.txt"]   # the old content is gone entirely
    assert (final / "keep-name.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom("failed"), KeyboardInterrupt()])
def test_atomic_dir_failure_publishes_nothing_and_keeps_the_previous_folder(tmp_path, error):
    final = tmp_path / "out"
    final.mkdir()
    (final / "good.txt").write_text("previous result")
    with pytest.raises(type(error)):
        with atomic_dir(final) as work:
            (work / "good.txt").write_text("half-written")
            (work / "partial.txt").write_text("x")
            raise error
    assert sorted(p.name for p in final.iterdir()) == ["good.txt"]
    assert (final / "good.txt").read_text() == "previous result"
    assert not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # no temp folder left behind


def test_atomic_dir_failure_on_first_run_leaves_no_output(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_dir(final) as work:
            (work / "x.txt").write_text("x")
            raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_not_private(tmp_path, umask_022):
    final = tmp_path / "out"
    with atomic_dir(final) as work:
        write_json(work / "meta.json", {"a": 1})
        write_jsonl(work / "rows.jsonl", [{"a": 1}])
        (work / "sub").mkdir()
    assert mode(final) == 0o755                # mkdtemp alone would give 0o700
    assert mode(final / "meta.json") == 0o644  # mkstemp alone would give 0o600
    assert mode(final / "rows.jsonl") == 0o644
    assert mode(final / "sub") == 0o755
    atomic_write_text(tmp_path / "top.txt", "t")
    assert mode(tmp_path / "top.txt") == 0o644


def test_output_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        with atomic_dir(tmp_path / "out") as work:
            write_json(work / "meta.json", {})
    finally:
        os.umask(previous)
    assert mode(tmp_path / "out") == 0o700 and mode(tmp_path / "out" / "meta.json") == 0o600


# --- JSON helpers ------------------------------------------------------------------------------

def test_write_json_read_json_round_trip(tmp_path):
    data = {"b": [1, 2.5, None, True], "a": {"nested": "ü → ✓"}, "empty": {}}
    path = tmp_path / "new" / "data.json"        # parent created
    write_json(path, data)
    assert read_json(path) == data
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and "ü → ✓" in text   # readable: not ASCII-escaped
    assert text.index('"a"') < text.index('"b"')       # sorted keys: stable diffs
    write_json(path, [1])                               # overwriting replaces the content
    assert read_json(path) == [1]
    assert leftovers(path.parent) == []


def test_atomic_write_text_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "data.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})          # not serializable: fails before anything is written
    assert read_json(path) == {"ok": 1}
    assert leftovers(tmp_path) == []


def test_atomic_write_bytes_writes_exact_bytes_and_cleans_up_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    atomic_write_bytes(path, b"\x89PNG\r\n\x00old")
    assert path.read_bytes() == b"\x89PNG\r\n\x00old"

    def no_room(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("ftpipe.core.io.os.replace", no_room)   # fails after the temp file was written
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"\x89PNG\r\n\x00old"
    assert leftovers(tmp_path) == []


def test_read_json_missing_file_names_it(tmp_path):
    path = tmp_path / "nope" / "metrics.json"
    with pytest.raises(PipelineError) as error:
        read_json(path)
    assert str(path) in str(error.value) and "file not found" in str(error.value)
    assert "dvc repro" in str(error.value)


def test_read_json_broken_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "a": 1,\n  "b": oops\n}\n', encoding="utf-8")
    with pytest.raises(PipelineError) as error:
        read_json(path)
    message = str(error.value)
    assert message.startswith(f"{path}: line 3: invalid JSON")


def test_write_jsonl_read_jsonl_round_trip(tmp_path):
    rows = [{"row": 1, "record": {"text": "ä"}}, {"row": 2, "record": {"text": "line\nbreak"}}]
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, iter(rows)) == 2
    assert path.read_text(encoding="utf-8").count("\n") == 2   # one line per row, newlines escaped
    assert read_jsonl(path) == rows
    assert write_jsonl(path, []) == 0 and read_jsonl(path) == []


def test_read_jsonl_skips_blank_lines_and_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n{"a": 4}\n', encoding="utf-8")
    with pytest.raises(PipelineError) as error:
        read_jsonl(path)
    message = str(error.value)
    assert message.startswith(f"{path}: line 4: invalid JSON") and "Fix or remove that line" in message
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


# --- hashes ------------------------------------------------------------------------------------

def test_sha256_helpers_match_known_digests(tmp_path):
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_text("") == empty and sha256_text("abc") == abc
    (tmp_path / "abc.txt").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc.txt") == abc


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("bee")
    (root / "a.txt").write_text("ay")
    (root / "sub" / "c.bin").write_bytes(bytes(range(256)) * 5000)   # > 1 MiB: read in several chunks
    (root / "sub" / "deeper" / "d.txt").write_text("dee")
    (root / "provenance.json").write_text("{}")
    return root


def test_file_hashes_keys_relative_posix_paths_sorted(tmp_path):
    root = make_tree(tmp_path / "t")
    hashes = file_hashes(root)
    assert list(hashes) == ["a.txt", "b.txt", "provenance.json", "sub/c.bin", "sub/deeper/d.txt"]
    assert hashes["a.txt"] == sha256_text("ay")
    assert hashes["sub/c.bin"] == sha256_file(root / "sub" / "c.bin")
    excluded = file_hashes(root, exclude=("provenance.json",))
    assert "provenance.json" not in excluded and len(excluded) == 4


def test_tree_digest_is_stable_and_changes_with_any_file(tmp_path):
    one, two = make_tree(tmp_path / "one"), make_tree(tmp_path / "two")
    digest = tree_digest(file_hashes(one))
    assert len(digest) == 64
    assert tree_digest(file_hashes(one)) == digest              # same folder, same digest
    assert tree_digest(file_hashes(two)) == digest              # same content elsewhere, same digest
    assert tree_digest(dict(reversed(list(file_hashes(one).items())))) == digest   # order-independent

    (two / "sub" / "deeper" / "d.txt").write_text("dea")       # one byte in one file
    changed = file_hashes(two)
    assert changed["sub/deeper/d.txt"] != file_hashes(one)["sub/deeper/d.txt"]
    assert {k for k in changed if changed[k] != file_hashes(one)[k]} == {"sub/deeper/d.txt"}
    assert tree_digest(changed) != digest

    (two / "sub" / "deeper" / "d.txt").write_text("dee")       # restored: the digest is back
    assert tree_digest(file_hashes(two)) == digest
    (two / "sub" / "deeper" / "d.txt").rename(two / "sub" / "d.txt")   # same content, other path
    assert tree_digest(file_hashes(two)) != digest
