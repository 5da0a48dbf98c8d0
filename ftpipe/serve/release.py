"""Which GGUF file the server serves, and what /v1/models says about it, from the release report.

models/release/report.json (stages/report.py writes it; tests/fixtures/report_example.json shows its shape) lists
each GGUF as an artifact {"kind": "gguf", "gguf_type", "release_folder", "files": [{"path", "sha256"}]}, and holds
the license the pipeline's license gate concluded for the model in compliance.concluded_license. A file is served
under that license only when its SHA-256 is the one the report lists for a GGUF artifact (the released file, or a
copy of it elsewhere); a release folder whose file no longer matches is an error. Any other .gguf file can be
served too, but nothing was concluded about it: its license is SPDX's NOASSERTION and a note says why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, sha256_file
from ftpipe.core.paths import RELEASE_DIR

REPORT_FILE = RELEASE_DIR / "report.json"   # ftpipe.release.publish.REPORT_FILES["report_json"]
GGUF_KIND = "gguf"
NO_LICENSE = "NOASSERTION"   # SPDX: no license is asserted for the file
BUILD_HINT = "run `make pipeline` (or `dvc repro`): its report stage publishes models/release/"
OWNER = "ftpipe"


@dataclass(frozen=True)
class Served:
    """The file to serve, and how /v1/models describes it."""
    path: Path
    model_id: str
    license: str
    gguf_type: str | None
    sha256: str
    note: str | None = None   # why a file has no license: it is not the released one

    @property
    def released(self) -> bool:
        return self.note is None

    def model_entry(self) -> dict[str, Any]:
        """An OpenAI /v1/models entry (the fields llama-cpp-python's server gives) plus the release's facts."""
        entry = {"id": self.model_id, "object": "model", "owned_by": OWNER, "permissions": [],
                 "license": self.license, "gguf_type": self.gguf_type, "sha256": self.sha256}
        return {**entry, "note": self.note} if self.note else entry


def choose(choice: str | None, project: Path) -> Served:
    """The file `--gguf` names: None for the report's first GGUF artifact, a GGUF type (f16, q4_k_m, ...) for the
    released file of that type, or a path (it has a '/' or ends in .gguf) for that file."""
    project = Path(project)
    if choice is not None and is_path(choice):
        path = Path(choice)
        if not path.is_file():
            raise PipelineError(f"{path}: no such GGUF file (--gguf)")
        report_file = project / REPORT_FILE
        if not report_file.is_file():
            return unreleased(path, f"not a released file: there is no {report_file}, so no license was concluded "
                                    "for it")
        report = read_report(report_file)
        digest = sha256_file(path)
        artifacts = [(artifact, gguf_file(artifact, report_file)) for artifact in gguf_artifacts(report)]
        for artifact, file in artifacts:   # the released content, wherever the file lies (a copy is the same model)
            if digest == file["sha256"]:
                return released(path, report, artifact, digest)
        for artifact, file in artifacts:
            if any(candidate.is_file() and os.path.samefile(path, candidate)
                   for candidate in (released_path(artifact, file, project), project / file["path"])):
                return unreleased(path, f"not the released file: it differs from the released {artifact['name']} "
                                        f"(SHA-256 {file['sha256']}), so no license is asserted for it", digest)
        return unreleased(path, f"not a released file: {report_file} does not list it, so no license was concluded "
                                "for it", digest)
    report_file = project / REPORT_FILE
    if not report_file.is_file():
        raise PipelineError(f"{report_file}: no release here (--project {project}): {BUILD_HINT}; or give --gguf "
                            "a path to a .gguf file")
    report = read_report(report_file)
    artifacts = gguf_artifacts(report)
    if not artifacts:
        raise PipelineError(f"{report_file}: the release has no GGUF file: add a type to quantize.types (params.yaml) "
                            f"and {BUILD_HINT}")
    by_type = {artifact.get("gguf_type"): artifact for artifact in artifacts}
    if choice is not None and choice not in by_type:
        raise PipelineError(f"--gguf {choice}: the release has no {choice} GGUF; it has "
                            f"{', '.join(str(gguf_type) for gguf_type in by_type)} (or give a path to a .gguf file)")
    artifact = by_type[choice] if choice is not None else artifacts[0]
    file = gguf_file(artifact, report_file)
    path = released_path(artifact, file, project)
    if not path.is_file():
        raise PipelineError(f"{path}: missing from the release: `python -m ftpipe.release.verify` checks a release; "
                            f"{BUILD_HINT}")
    digest = sha256_file(path)
    if digest != file["sha256"]:
        raise PipelineError(f"{path}: its SHA-256 {digest} is not the {file['sha256']} {report_file} lists: the file "
                            "changed after the release; `python -m ftpipe.release.verify` checks the whole release")
    return released(path, report, artifact, digest)


def is_path(choice: str) -> bool:
    return "/" in choice or os.sep in choice or choice.endswith(".gguf")


def read_report(report_file: Path) -> dict[str, Any]:
    report = read_json(report_file)
    if not isinstance(report, dict) or not isinstance(report.get("artifacts"), list) \
            or not isinstance((report.get("compliance") or {}).get("concluded_license"), str):
        raise PipelineError(f"{report_file}: not a release report (artifacts or compliance.concluded_license "
                            f"missing): {BUILD_HINT}")
    return report


def gguf_artifacts(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [artifact for artifact in report["artifacts"] if artifact.get("kind") == GGUF_KIND]


def gguf_file(artifact: dict[str, Any], report_file: Path) -> dict[str, Any]:
    """The artifact's .gguf entry in files ({"path", "sha256", ...})."""
    files = [file for file in artifact.get("files") or [] if str(file.get("path", "")).endswith(".gguf")]
    if len(files) != 1 or "release_folder" not in artifact or "sha256" not in files[0]:
        raise PipelineError(f"{report_file}: artifact {artifact.get('name')!r} does not name one .gguf file with its "
                            f"release_folder and sha256: {BUILD_HINT}")
    return files[0]


def released_path(artifact: dict[str, Any], file: dict[str, Any], project: Path) -> Path:
    """Where the release folder holds the file: models/release/gguf-<type>/model-<type>.gguf."""
    return project / artifact["release_folder"] / Path(file["path"]).name


def released(path: Path, report: dict[str, Any], artifact: dict[str, Any], digest: str) -> Served:
    base = str((report.get("base_model") or {}).get("id") or "model").rstrip("/").split("/")[-1]
    gguf_type = artifact.get("gguf_type")
    return Served(path, f"{base}-ftpipe-{gguf_type}", report["compliance"]["concluded_license"], gguf_type, digest)


def unreleased(path: Path, note: str, digest: str | None = None) -> Served:
    return Served(path, path.stem, NO_LICENSE, header(path).get("gguf_type"), digest or sha256_file(path), note)


def header(path: Path) -> dict[str, Any]:
    """{"context_length", "gguf_type"} from the GGUF's metadata, where it says; {} if llama.cpp cannot read it
    (open_gguf then says why). llama.cpp reads the metadata with the vocabulary only, in a tenth of a second; the
    gguf package's reader takes seconds over a 49k-token vocabulary."""
    from ftpipe.gguf.runtime import llama_cpp

    module = llama_cpp()
    try:
        llm = module.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError):
        return {}
    try:
        metadata = dict(llm.metadata)
    finally:
        llm.close()
    facts: dict[str, Any] = {}
    context_length = metadata.get(f"{metadata.get('general.architecture')}.context_length", "")
    if context_length.isdigit() and int(context_length) > 0:
        facts["context_length"] = int(context_length)
    file_types = {str(getattr(module, name)): name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
                  .removeprefix("ALL_").lower() for name in dir(module) if name.startswith("LLAMA_FTYPE_")}
    if metadata.get("general.file_type") in file_types:
        facts["gguf_type"] = file_types[metadata["general.file_type"]]
    return facts
