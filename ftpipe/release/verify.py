"""Verify a release: is every artifact, card and report still what the pipeline produced?

    python -m ftpipe.release.verify [--release models/release] [--json]      # from the project root

Each check compares the files on disk with a record written by a different party, so that changing an
artifact and the record next to it together is still caught by the next one:
1. manifest: every line of MANIFEST.sha256 (the report stage's list of the artifacts and of every file of
   the release, report.json and the model cards included) against the file's SHA-256.
2. report: every artifact file and data source file of report.json, size and SHA-256.
3. stage records: what the stages that made the artifacts recorded, before any report existed: the merged
   model's files (models/merged/provenance.json), the adapter's (the merge stage's adapter_sha256) and each
   GGUF's (metrics/quantize.json).
4. dvc.lock: each artifact folder's files against the MD5s DVC recorded. dvc.lock (under git) names the
   folder's listing in .dvc/cache by the listing's MD5, which is checked too.
5. current: the release was made from the compliance conclusion now in data/compliance/ (otherwise the
   declarations changed and `dvc repro` has not run since: the release is stale).
6. modelfiles: each GGUF's release folder holds its Ollama Modelfile, whose FROM (read as Ollama reads it)
   names the GGUF beside it, that GGUF being the artifact's file; the Modelfile is listed in the manifest, and
   its SHA-256 is the one the BOM records.

Exit codes: 0 every check passed; 1 a mismatch (each is listed: the file, the record, expected and found);
2 the release or a record is missing or unreadable.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ftpipe.audit.provenance_chain import dir_listing, dir_listing_path, md5_file
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import read_json, sha256_file
from ftpipe.core.paths import (
    ADAPTER_DIR,
    COMPLIANCE_DIR,
    GGUF_DIR,
    MERGED_DIR,
    PROVENANCE_FILE,
    RELEASE_DIR,
    metrics_file,
)
from ftpipe.gguf.modelfile import MODELFILE, from_target

MISMATCH_EXIT = 1
DVC_CACHE = Path(".dvc/cache")
ARTIFACT_STAGES = {"train": ADAPTER_DIR, "merge": MERGED_DIR, "quantize": GGUF_DIR}


@functools.cache
def sha256_of(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def md5_of(path: Path) -> str | None:
    return md5_file(path) if path.is_file() else None


class Checks:
    """Files checked and mismatches found, per check."""

    def __init__(self) -> None:
        self.checked: dict[str, int] = {}
        self.notes: dict[str, str] = {}
        self.mismatches: list[dict[str, Any]] = []

    def compare(self, check: str, path: str, record: str, expected: Any, found: Any) -> None:
        self.checked[check] = self.checked.get(check, 0) + 1
        if expected != found:
            self.mismatches.append({"check": check, "path": path, "record": record, "expected": expected,
                                    "found": "missing" if found is None else found})

    def sha256(self, check: str, path: str, record: str, expected: str) -> None:
        self.compare(check, path, record, expected, sha256_of(Path(path)))


def check_manifest(checks: Checks, manifest_path: Path) -> None:
    for number, line in enumerate(manifest_path.read_text(encoding="utf-8").splitlines(), start=1):
        digest, _, path = line.partition("  ")
        if len(digest) != 64 or not path:
            raise PipelineError(f"{manifest_path}: line {number} is not '<sha256>  <path>': {line[:80]!r}")
        checks.sha256("manifest", path, manifest_path.as_posix(), digest)


def check_report(checks: Checks, report: dict[str, Any], report_path: Path) -> None:
    for artifact in report["artifacts"]:
        for file in artifact["files"]:
            path = Path(file["path"])
            checks.compare("report", file["path"], report_path.as_posix(), file["bytes"],
                           path.stat().st_size if path.is_file() else None)
            checks.sha256("report", file["path"], report_path.as_posix(), file["sha256"])
    for source in report["data_sources"]:
        checks.sha256("report", source["file"], report_path.as_posix(), source["sha256"])


def check_stage_records(checks: Checks) -> None:
    merged_record = MERGED_DIR / PROVENANCE_FILE
    merged = read_json(merged_record)
    for name, digest in merged["files_sha256"].items():
        checks.sha256("stage records", (MERGED_DIR / name).as_posix(), merged_record.as_posix(), digest)
    for name, digest in merged["adapter_sha256"].items():
        if name != PROVENANCE_FILE:   # the adapter's provenance.json is not an artifact file the merge read
            checks.sha256("stage records", (ADAPTER_DIR / name).as_posix(), f"{merged_record} adapter_sha256", digest)
    quantized = metrics_file("quantize")
    for entry in read_json(quantized)["files"].values():
        checks.sha256("stage records", (GGUF_DIR / entry["file"]).as_posix(), quantized.as_posix(), entry["sha256"])


def check_dvc_lock(checks: Checks, lock_path: Path = Path("dvc.lock")) -> None:
    if not lock_path.exists():
        checks.notes["dvc.lock"] = f"skipped: no {lock_path}"
        return
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8"))["stages"]
    for stage, folder in ARTIFACT_STAGES.items():
        out = next((o for o in lock.get(stage, {}).get("outs", []) if o["path"] == folder.as_posix()), None)
        if out is None or not str(out.get("md5", "")).endswith(".dir"):
            checks.notes["dvc.lock"] = f"skipped {folder}: dvc.lock has no folder hash for it"
            continue
        listing_path, listing = dir_listing_path(DVC_CACHE, out["md5"]), dir_listing(DVC_CACHE, out["md5"])
        if listing is None:
            checks.notes["dvc.lock"] = f"skipped {folder}: its listing {listing_path} is not in the DVC cache"
            continue
        checks.compare("dvc.lock", listing_path.as_posix(), f"{lock_path} ({stage})", out["md5"][:-len(".dir")],
                       md5_of(listing_path))
        for entry in listing:
            path = folder / entry["relpath"]
            checks.compare("dvc.lock", path.as_posix(), f"{listing_path} (named in {lock_path})", entry["md5"],
                           md5_of(path))


def check_current(checks: Checks, report: dict[str, Any]) -> None:
    conclusion = COMPLIANCE_DIR / "conclusion.json"
    checks.compare("current", conclusion.as_posix(), "report.json project.compliance_conclusion_sha256",
                   report["project"]["compliance_conclusion_sha256"], sha256_of(conclusion))


def check_modelfiles(checks: Checks, report: dict[str, Any], manifest_path: Path, sbom_path: Path) -> None:
    listed = {line.partition("  ")[2] for line in manifest_path.read_text(encoding="utf-8").splitlines()}
    bom_files = _bom_files(sbom_path)
    for artifact in report["artifacts"]:
        if artifact["kind"] != "gguf":
            continue
        folder, gguf = Path(artifact["release_folder"]), artifact["files"][0]
        path = folder / MODELFILE
        name, text = path.as_posix(), path.read_text(encoding="utf-8") if path.is_file() else None
        checks.compare("modelfiles", name, manifest_path.as_posix(), "listed",
                       "listed" if name in listed else "not listed")
        target = from_target(text) if text is not None else None
        expected = f"./{Path(gguf['path']).name}"
        checks.compare("modelfiles", name, f"{name} FROM (the GGUF beside it)", expected, target or "no FROM")
        if target is not None:
            checks.sha256("modelfiles", (folder / target).as_posix(), f"{name} FROM, and report.json", gguf["sha256"])
        checks.sha256("modelfiles", name, sbom_path.as_posix(), bom_files.get(name, "not in the BOM"))


def _bom_files(sbom_path: Path) -> dict[str, str]:
    """SHA-256 by path of the file components the BOM nests in its components."""
    found: dict[str, str] = {}
    if not sbom_path.is_file():
        return found
    for component in read_json(sbom_path).get("components", []):
        for file in component.get("components") or []:
            digests = [h["content"] for h in file.get("hashes", []) if h.get("alg") == "SHA-256"]
            if file.get("type") == "file" and digests:
                found[file["name"]] = digests[0]
    return found


def verify(release: Path = RELEASE_DIR) -> dict[str, Any]:
    """Run every check; the result lists what was checked and every mismatch."""
    sha256_of.cache_clear()
    report_path, manifest_path = release / "report.json", release / "MANIFEST.sha256"
    for path in (report_path, manifest_path):
        if not path.is_file():
            raise PipelineError(f"{path}: not found. Run `dvc repro` (the report stage writes {release}/), and run "
                                "this from the project root.")
    report = read_json(report_path)
    checks = Checks()
    check_manifest(checks, manifest_path)
    check_report(checks, report, report_path)
    check_stage_records(checks)
    check_dvc_lock(checks)
    check_current(checks, report)
    check_modelfiles(checks, report, manifest_path, release / "sbom.cdx.json")
    return {"release": release.as_posix(), "created_at": report["created_at"],
            "concluded_license": report["compliance"]["concluded_license"], "checked": checks.checked,
            "notes": checks.notes, "mismatches": checks.mismatches, "passed": not checks.mismatches}


def format_result(result: dict[str, Any]) -> str:
    lines = [f"verify {result['release']} (report of {result['created_at']}, license {result['concluded_license']})"]
    failed = {m["check"] for m in result["mismatches"]}
    for check, count in result["checked"].items():
        lines.append(f"  {check:<14} {count:>5} files  {'MISMATCH' if check in failed else 'ok'}")
    lines += [f"  {check:<14} {note}" for check, note in result["notes"].items()]
    for mismatch in result["mismatches"]:
        lines.append(f"  ! {mismatch['path']}: {mismatch['check']} check against {mismatch['record']}: expected "
                     f"{mismatch['expected']}, found {mismatch['found']}")
    if result["passed"]:
        lines.append("all checks passed: the release is what the pipeline produced")
    else:
        stale = any(m["check"] == "current" for m in result["mismatches"])
        lines.append(f"{len(result['mismatches'])} mismatch(es): files changed after the pipeline wrote them"
                     + ("; the release is stale (run `dvc repro`)" if stale else "")
                     + ". Do not ship this release; rebuild it with `dvc repro` (add -f to force) and verify again.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftpipe.release.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", type=Path, default=RELEASE_DIR, help=f"the release folder (default {RELEASE_DIR})")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    result = verify(args.release)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    if not result["passed"]:
        sys.exit(MISMATCH_EXIT)


if __name__ == "__main__":
    run_stage(main)
