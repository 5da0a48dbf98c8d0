"""Where the base model comes from (ftpipe/model/sources.py), all offline: the four kinds of base.model told apart;
a hub id resolved from a Hugging Face cache built in the test (commit and every file's SHA-256 recorded), with
clear errors naming the keys and the fix for a missing revision, a commit not cached, an incomplete or corrupted
snapshot; with base.allow_network, a download from a loopback Hub (tests/hub_fixtures.py) that lands in the cache,
while offline mode stays on for everything else."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.params import EMBEDDED_BASE_MODEL, BaseParams
from ftpipe.model.sources import hub_cache_dir, resolve_source, source_kind
from tests.hub_fixtures import FakeHub, repo_files, write_hub_cache

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def hub_params(revision: str | None = COMMIT, allow_network: bool = False, model: str = REPO_ID) -> BaseParams:
    return BaseParams(model=model, revision=revision, allow_network=allow_network, dtype="bfloat16", gguf_max_kl=0.1)


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME of the test's own; the hub cache is its hub/ folder. HF_ENDPOINT points nowhere: a
    request that escaped offline mode would fail, never reach the real Hub."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return home


@pytest.fixture
def tiny_files(tiny_model_dir) -> dict[str, bytes]:
    return repo_files(tiny_model_dir)


def assert_offline() -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is True and constants.is_offline_mode()


def test_the_four_kinds_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "source" / "mine").mkdir(parents=True)
    assert source_kind(EMBEDDED_BASE_MODEL) == "pypi-package"
    assert source_kind("models/source/x.gguf") == source_kind("/abs/Model.Q4_K_M.GGUF") == "gguf-file"
    assert source_kind("models/source/mine") == source_kind(str(tmp_path / "missing")) == "local-folder"
    assert source_kind("meta-llama/Llama-3.1-8B-Instruct") == source_kind("Qwen/Qwen2.5-0.5B") == "hub"
    # shaped like org/name, but "models" is a folder here: a missing local folder, named as such
    assert source_kind("models/other") == "local-folder"


def test_hub_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_a_hub_id_needs_its_revision(hf_home):
    with pytest.raises(PipelineError) as error:
        resolve_source(hub_params(revision=None))
    message = str(error.value)
    assert f"params.yaml base.model is {REPO_ID!r}, a Hugging Face hub id" in message
    assert "base.revision is null. Set base.revision to the 40-hex-digit commit" in message


def test_a_revision_with_a_local_source_is_refused(tiny_model_dir):
    with pytest.raises(PipelineError, match="base.revision is '0123.*' is not a hub id .*Set base.revision: null"):
        resolve_source(hub_params(model=str(tiny_model_dir)))


def test_a_cached_hub_model_resolves_offline_with_its_commit_and_hashes(hf_home, tiny_files):
    snapshot = write_hub_cache(hf_home / "hub", REPO_ID, COMMIT, tiny_files)
    resolved = resolve_source(hub_params())
    assert (resolved.kind, resolved.path) == ("hub", snapshot)
    assert resolved.source == {
        "kind": "hub", "repo_id": REPO_ID, "revision": COMMIT, "commit": COMMIT,
        "url": f"https://huggingface.co/{REPO_ID}/tree/{COMMIT}", "files_sha256": sha256s(tiny_files)}
    assert resolved.retrieval == {"from": "local cache", "cache_dir": str(hf_home / "hub"),
                                  "snapshot": str(snapshot), "refs": ["main"]}
    assert_offline()


def test_files_the_pipeline_never_reads_are_not_recorded(hf_home, tiny_files):
    """A snapshot fetched by hand (`hf download`) may hold the whole repo: pickled weights, the card."""
    write_hub_cache(hf_home / "hub", REPO_ID, COMMIT, {**tiny_files, "pytorch_model.bin": b"pickle", "README.md": b"#"})
    assert resolve_source(hub_params()).source["files_sha256"] == sha256s(tiny_files)


def test_a_commit_not_in_the_cache_names_the_cached_ones_and_the_fixes(hf_home, tiny_files):
    write_hub_cache(hf_home / "hub", REPO_ID, COMMIT, tiny_files)
    with pytest.raises(PipelineError) as error:
        resolve_source(hub_params(revision=OTHER_COMMIT))
    message = str(error.value)
    assert f"is {REPO_ID!r} at base.revision {OTHER_COMMIT}" in message
    assert f"the cache holds {REPO_ID} at other commits only ({COMMIT})" in message
    assert f"looked in {hf_home / 'hub' / 'models--tiny-org--tiny-llama'}" in message
    assert f"HF_HOME={hf_home}" in message
    assert "base.allow_network is false. Either set base.allow_network: true" in message
    assert f"`hf download {REPO_ID} --revision {OTHER_COMMIT}`" in message


def test_a_model_missing_from_the_cache_fails_offline(hf_home):
    with pytest.raises(PipelineError, match="it is not in the local Hugging Face cache \\(looked in .*hf-home/hub/"
                                            "models--tiny-org--tiny-llama; .*base.allow_network: true"):
        resolve_source(hub_params())


def test_an_incomplete_cached_snapshot_is_named(hf_home, tiny_files):
    snapshot = write_hub_cache(hf_home / "hub", REPO_ID, COMMIT, tiny_files)
    (snapshot / "model.safetensors").unlink()   # an interrupted download
    with pytest.raises(PipelineError, match=f"its cached snapshot {snapshot} lacks model.safetensors"):
        resolve_source(hub_params())


def test_a_corrupted_cache_blob_is_refused(hf_home, tiny_files):
    snapshot = write_hub_cache(hf_home / "hub", REPO_ID, COMMIT, tiny_files)
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    with pytest.raises(PipelineError, match="the cache is corrupted. Delete .*models--tiny-org--tiny-llama"):
        resolve_source(hub_params())


def test_allow_network_downloads_from_the_hub_into_the_cache(hf_home, tiny_files, monkeypatch):
    with FakeHub({REPO_ID: {COMMIT: tiny_files}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        resolved = resolve_source(hub_params(allow_network=True))
        assert_offline()   # lifted for the download only
        snapshot = hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
        assert resolved.path == snapshot
        assert {name: (snapshot / name).read_bytes() for name in tiny_files} == tiny_files
        assert resolved.source["files_sha256"] == sha256s(tiny_files) and resolved.source["commit"] == COMMIT
        assert resolved.retrieval["from"] == "downloaded" and resolved.retrieval["endpoint"] == hub.url
        downloaded = {path.rsplit("/", 1)[-1] for method, path in hub.requests
                      if method == "GET" and "/resolve/" in path}
        assert downloaded == set(tiny_files)

        hub.requests.clear()   # the second time, the cache has it: no request at all
        again = resolve_source(hub_params(allow_network=True))
        assert again.retrieval["from"] == "local cache" and again.source == resolved.source
        assert hub.requests == []


def test_only_the_models_files_are_downloaded(hf_home, tiny_files, monkeypatch):
    extra = {**tiny_files, "pytorch_model.bin": b"pickle", "README.md": b"# card", "consolidated.safetensors": b"x"}
    with FakeHub({REPO_ID: {COMMIT: extra}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        resolved = resolve_source(hub_params(allow_network=True))
    assert sorted(path.name for path in resolved.path.iterdir()) == sorted(tiny_files)


def test_an_unknown_revision_on_the_hub_is_named(hf_home, tiny_files, monkeypatch):
    with FakeHub({REPO_ID: {COMMIT: tiny_files}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(PipelineError, match=f"base.revision {OTHER_COMMIT}: no such commit in {REPO_ID} on "
                                                f"{hub.url}"):
            resolve_source(hub_params(revision=OTHER_COMMIT, allow_network=True))
        with pytest.raises(PipelineError, match=f"no model other/model on {hub.url}"):
            resolve_source(hub_params(model="other/model", allow_network=True))
    assert_offline()


def test_offline_never_reaches_the_hub(hf_home, tiny_files, monkeypatch):
    with FakeHub({REPO_ID: {COMMIT: tiny_files}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(PipelineError, match="not in the local Hugging Face cache"):
            resolve_source(hub_params(allow_network=False))
    assert hub.requests == []


def test_a_download_that_fails_says_how_to_fetch_it_by_hand(hf_home):
    # HF_ENDPOINT (the hf_home fixture) is a closed port: the connection is refused
    with pytest.raises(PipelineError, match=f"downloading {REPO_ID} on http://127.0.0.1:9 at {COMMIT} failed .*"
                                            f"`hf download {REPO_ID} --revision {COMMIT}`"):
        resolve_source(hub_params(allow_network=True))
    assert_offline()
