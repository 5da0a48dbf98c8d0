"""Writing the release folder (models/release/): the report in three forms, the validated CycloneDX BOM, a
folder per artifact with its files hard-linked (no extra disk) and its model card (and, beside each GGUF, its
Ollama Modelfile: ftpipe/release/gguf_release.py), the evaluate stage's side-by-side page of every test example
(evaluation/side_by_side.html, which report.html links to), and MANIFEST.sha256 over all of it (`sha256sum -c`
format). The report stage collects what goes in; this writes it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ftpipe.core.io import atomic_write_text, sha256_file, write_json
from ftpipe.core.paths import RELEASE_DIR
from ftpipe.release.gguf_release import MODELFILE, release_modelfile
from ftpipe.release.model_card import CARD_FILE, model_card
from ftpipe.release.report_render import render_html, render_markdown
from ftpipe.release.sbom import SBOM_FILE, build_sbom, validate_sbom

MANIFEST_FILE = "MANIFEST.sha256"
SIDE_BY_SIDE_FILE = "evaluation/side_by_side.html"   # in the release folder; report.html links it relatively
REPORT_FILES = {"report_json": "report.json", "report_markdown": "report.md", "report_html": "report.html"}


def write_release(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Fill `out_dir` (the temporary RELEASE_DIR) with the report, BOM, cards and artifact folders; return the
    manifest: SHA-256 by project-relative path, the artifacts and every file written."""
    sbom = build_sbom(report)
    validate_sbom(sbom)   # a BOM that does not validate is a bug here: never publish it
    manifest = {file["path"]: file["sha256"] for artifact in report["artifacts"] for file in artifact["files"]}
    for artifact in report["artifacts"]:
        folder = out_dir / Path(artifact["release_folder"]).relative_to(RELEASE_DIR)
        folder.mkdir()
        for file in artifact["files"]:
            target = folder / Path(file["path"]).name
            link_or_copy(Path(file["path"]), target)
            manifest[_final(target, out_dir)] = file["sha256"]
        atomic_write_text(folder / CARD_FILE, model_card(report, artifact["name"]))
        if artifact["kind"] == "gguf":   # the same text the BOM and the card hash (gguf_release.modelfile_facts)
            atomic_write_text(folder / MODELFILE, release_modelfile(report, artifact))
    page = (report.get("evaluation") or {}).get("side_by_side")
    if page:   # a copy, not a link: a small page, and the release's copy must not change with data/evaluation/
        target = out_dir / Path(page["path"]).relative_to(RELEASE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page["source"], target)
        manifest[_final(target, out_dir)] = page["sha256"]   # as read by the report: sha256sum -c catches a change
    write_json(out_dir / REPORT_FILES["report_json"], report)
    atomic_write_text(out_dir / REPORT_FILES["report_markdown"], render_markdown(report))
    atomic_write_text(out_dir / REPORT_FILES["report_html"], render_html(report))
    write_json(out_dir / SBOM_FILE, sbom)
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and _final(path, out_dir) not in manifest:
            manifest[_final(path, out_dir)] = sha256_file(path)
    atomic_write_text(out_dir / MANIFEST_FILE,
                      "".join(f"{digest}  {path}\n" for path, digest in sorted(manifest.items())))
    return manifest


def _final(path: Path, out_dir: Path) -> str:
    """Where a file written into the temporary folder will be once it is renamed into place."""
    return (RELEASE_DIR / path.relative_to(out_dir)).as_posix()


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no disk (weights are hundreds of MiB); a copy where links are impossible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
