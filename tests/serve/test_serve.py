"""`python -m ftpipe.serve` as a real process over the tiny f16 GGUF (tests/conftest.py: a random model, so its
answers are gibberish, compared for equality): /v1/models names the model with the concluded license, GGUF type and
SHA-256; a greedy chat answer over HTTP is exactly what `python -m ftpipe.chat` prints; it listens on 127.0.0.1 only
by default; Ctrl-C and SIGTERM stop it and free the port; a file llama.cpp cannot load exits 2 naming it. The choice
of the file from the report is tested in-process."""
from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import sha256_file, write_json
from ftpipe.serve.app import GENERATION_PATHS, RequestDefaults
from ftpipe.serve.release import NO_LICENSE, choose

PROMPT = "What does os.path.join do?"
LICENSE = "Apache-2.0 AND PSF-2.0"
MODEL_ID = "SmolLM2-135M-Instruct-ftpipe-f16"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10


def make_release(root: Path, gguf: Path, sha256: str) -> Path:
    """A project holding only what the server reads: models/release/gguf-f16/model-f16.gguf (a link to `gguf`) and a
    report.json with the keys it reads, a non-GGUF artifact first."""
    (root / "models" / "release" / "gguf-f16").mkdir(parents=True)
    (root / "models" / "release" / "gguf-f16" / "model-f16.gguf").symlink_to(gguf)
    write_json(root / "models" / "release" / "report.json", {
        "compliance": {"concluded_license": LICENSE},
        "base_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "artifacts": [
            {"name": "merged", "kind": "merged-model", "release_folder": "models/release/merged",
             "files": [{"path": "models/merged/model.safetensors", "sha256": "0" * 64}]},
            {"name": "gguf-f16", "kind": "gguf", "gguf_type": "f16", "release_folder": "models/release/gguf-f16",
             "files": [{"path": "models/gguf/model-f16.gguf", "sha256": sha256}]}]})
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory, lively_gguf) -> Path:
    return make_release(tmp_path_factory.mktemp("serve-project"), lively_gguf, sha256_file(lively_gguf))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    try:
        with socket.create_server(("127.0.0.1", port)):
            return True
    except OSError:
        return False


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftpipe.serve", *args]


@contextlib.contextmanager
def running(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    """The server on a free port, until its /v1/models answers: (process, port, its stderr file). Killed if the
    test leaves it running."""
    port = free_port()
    stderr = tmp_path / f"serve-{port}.stderr"
    with open(tmp_path / f"serve-{port}.stdout", "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(serve_command("--port", str(port), *args), cwd=tmp_path, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}) before answering:\n{stderr.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from the server in {START_TIMEOUT_S} s:\n{stderr.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield process, port, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def stop(process: subprocess.Popen, how: signal.Signals, port: int, stderr: Path) -> None:
    process.send_signal(how)
    try:
        code = process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{how.name} did not stop the server in {STOP_TIMEOUT_S} s:\n{stderr.read_text()}")
    assert code == 0, stderr.read_text()
    assert port_is_free(port)
    assert "Traceback" not in stderr.read_text()


def direct_answer(gguf: Path) -> str:
    """llama-cpp-python's own greedy answer, unstripped: create_chat_completion with its defaults."""
    from ftpipe.gguf.runtime import open_gguf

    llm = open_gguf(gguf, 512)
    try:
        response = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}], temperature=0,
                                              max_tokens=16)
    finally:
        llm.close()
    return response["choices"][0]["message"]["content"]


def chat_answer(gguf: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "ftpipe.chat", "--model", str(gguf), "--prompt", PROMPT,
                           "--max-new-tokens", "16"], cwd=gguf.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def non_loopback_addresses() -> list[str]:
    return [address.address for addresses in psutil.net_if_addrs().values() for address in addresses
            if address.family == socket.AF_INET and not address.address.startswith("127.")]


def test_serves_the_released_gguf_as_the_chat_command_answers(release, lively_gguf, tmp_path):
    """Default file (the report's first GGUF), default host; Ctrl-C stops it."""
    gguf = release / "models" / "release" / "gguf-f16" / "model-f16.gguf"
    # lively_gguf answers with words (tiny_gguf's greedy answers are empty); the unstripped answer is also compared
    # with llama-cpp-python's own, token for token.
    expected, direct = chat_answer(gguf), direct_answer(gguf)
    assert expected.strip() and len(expected.split()) > 1
    with running(tmp_path, "--project", str(release)) as (process, port, stderr):
        url = f"http://127.0.0.1:{port}"
        models = httpx.get(f"{url}/v1/models", timeout=5).json()
        assert models == {"object": "list", "data": [
            {"id": MODEL_ID, "object": "model", "owned_by": "ftpipe", "permissions": [], "license": LICENSE,
             "gguf_type": "f16", "sha256": sha256_file(lively_gguf)}]}
        response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 16})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == MODEL_ID
        content = response.json()["choices"][0]["message"]["content"]
        assert (content.strip(), content) == (expected, direct)

        listening = {tuple(connection.laddr) for connection in psutil.Process(process.pid).net_connections("inet")
                     if connection.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}
        for address in non_loopback_addresses():   # none in some sandboxes: the check above covers it
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
        started = stderr.read_text()
        for text in (f"{url}/v1", MODEL_ID, str(gguf.relative_to(release)), LICENSE, f"curl {url}/v1/chat/completions",
                     "this machine only"):
            assert text in started
        stop(process, signal.SIGINT, port, stderr)


def test_serves_a_gguf_path_without_a_release_as_noassertion(tiny_gguf, tmp_path):
    """A .gguf file with no release report: served, but with no license asserted and a note why; SIGTERM stops it."""
    with running(tmp_path, "--gguf", str(tiny_gguf), "--n-ctx", "256", "--threads", "1") as (process, port, stderr):
        [entry] = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]
        assert entry.pop("note").startswith("not a released file")
        assert entry == {"id": "model-f16", "object": "model", "owned_by": "ftpipe", "permissions": [],
                         "license": NO_LICENSE, "gguf_type": "f16", "sha256": sha256_file(tiny_gguf)}
        stop(process, signal.SIGTERM, port, stderr)


@pytest.mark.parametrize("problem", ["junk gguf", "port in use"])
def test_fails_before_serving_with_one_line_and_exit_2(problem, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all\x00\x01" * 64)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1] if problem == "port in use" else free_port()
        done = subprocess.run(serve_command("--gguf", str(junk), "--port", str(port)), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    says = [str(junk), "llama.cpp cannot load this GGUF"] if problem == "junk gguf" else [f"port {port}", "--port"]
    for text in says:
        assert text in done.stderr


def test_choosing_the_file_from_the_report(release, lively_gguf, tmp_path):
    """By type, by path (a copy of the released file is the released model), and what is refused or not licensed."""
    assert choose("f16", release).model_entry()["license"] == LICENSE
    copy = Path(shutil.copy(lively_gguf, tmp_path / "copy.gguf"))
    served = choose(str(copy), release)
    assert (served.path, served.model_id, served.license, served.note) == (copy, MODEL_ID, LICENSE, None)
    with pytest.raises(PipelineError, match="has no q4_k_m GGUF; it has f16"):
        choose("q4_k_m", release)

    changed = make_release(tmp_path / "changed", lively_gguf, "f" * 64)   # the report lists other content
    with pytest.raises(PipelineError, match="changed after the release"):
        choose(None, changed)
    served = choose(str(changed / "models" / "release" / "gguf-f16" / "model-f16.gguf"), changed)
    assert served.license == NO_LICENSE and "differs from the released gguf-f16" in served.note
    with pytest.raises(PipelineError, match="no release here"):
        choose(None, tmp_path)


def test_request_defaults_fill_only_what_a_request_leaves_out():
    """The middleware that gives requests llama-cpp-python's own repeat_penalty (1.0, not its server's 1.1)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def echo(request):
        return JSONResponse(await request.json())

    routes = [Route(path, echo, methods=["POST"]) for path in (*GENERATION_PATHS, "/other")]
    client = TestClient(RequestDefaults(Starlette(routes=routes), defaults={"repeat_penalty": 1.0, "model": "m"}))
    assert client.post("/v1/chat/completions", json={"messages": []}).json() == {
        "messages": [], "repeat_penalty": 1.0, "model": "m"}
    set_by_client = {"prompt": "p", "repeat_penalty": 1.3, "model": "x"}
    assert client.post("/v1/completions", json=set_by_client).json() == set_by_client
    assert client.post("/other", json={"a": 1}).json() == {"a": 1}
