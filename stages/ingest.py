"""Stage `ingest`: materialize every data source of params.yaml into data/raw/.

    python -m stages.ingest

Each source becomes data/raw/<name>.jsonl, one {"row": n, "record": {...}} per input row
(n counts from 1: the line of a JSONL file, the data row of a CSV), plus its provenance:
origin, retrieval time, SHA-256, row count and repairs made. Hostile
input never stops the stage: a row that cannot be read as a record (malformed JSON, not an
object, absurdly large or deeply nested) becomes {"row": n, "error": why, "text": its start},
which clean quarantines; invalid UTF-8 is replaced and counted. Only a file that cannot be
read at all (missing, unsupported type, a .json that is not an array) is an error.

Reading the files is ftpipe.data.readers; the built-in source, ftpipe.data.stdlib_docstrings.
"""
from __future__ import annotations

import itertools
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import file_hashes, sha256_file, tree_digest, write_jsonl
from ftpipe.core.params import Params, SourceParams, flatten
from ftpipe.core.paths import PROVENANCE_FILE, RAW_DIR, SOURCES_DIR
from ftpipe.core.provenance import utc_now
from ftpipe.core.stage import Stage
from ftpipe.data import pii
from ftpipe.data.readers import read_file_source
from ftpipe.data.stdlib_docstrings import stdlib_docstring_records, stdlib_origin


def redact_rows(rows: Iterator[dict], found: Counter) -> Iterator[dict]:
    """Rows with the PII in their record (or unreadable text) replaced by placeholders, and a "pii" count by kind
    on each row that had some, so that clean still counts it (and rejects it with clean.pii_action: reject).
    `found` adds up the kinds, and "rows" the rows."""
    for row in rows:
        counts: Counter = Counter()
        for field in ("record", "text"):
            if field in row:
                row[field], kinds = pii.redact_value(row[field])
                counts.update(kinds)
        if counts:
            row["pii"] = dict(sorted(counts.items()))
            found.update(counts)
            found["rows"] += 1
        yield row


def ingest_source(source: SourceParams, out_dir: Path, keep_pii: bool) -> dict:
    """Write one source's rows to `out_dir/<name>.jsonl` (PII replaced by placeholders unless `keep_pii`);
    return its provenance entry."""
    repaired: Counter | None = None
    if source.type == "file":
        path = Path(source.path)
        if not path.exists():
            raise PipelineError(f"params.yaml ingest.sources '{source.name}': file {path} does not exist. "
                                f"Put your data under {SOURCES_DIR}/ and give its path.")
        if not path.resolve().is_relative_to(SOURCES_DIR.resolve()):
            print(f"warning: {path} is outside {SOURCES_DIR}/, so DVC cannot see its content change; "
                  f"move it there, or run `dvc repro -f ingest` after editing it.")
        repaired = Counter()
        rows = read_file_source(path, repaired)
        digest = tree_digest(file_hashes(path)) if path.is_dir() else sha256_file(path)
        origin = {"kind": "file", "path": str(path), "sha256": digest}
    else:
        rows = stdlib_docstring_records()
        origin = stdlib_origin()
    if source.max_rows is not None:   # the first max_rows rows (row numbers may skip blank lines)
        rows = itertools.islice(rows, source.max_rows)
    redacted: Counter = Counter()
    if not keep_pii:
        rows = redact_rows(rows, redacted)
    out_file = out_dir / f"{source.name}.jsonl"
    count = write_jsonl(out_file, rows)
    entry = {"name": source.name, "origin": origin, "retrieved_at": utc_now(),
             "rows": count, "file": out_file.name, "sha256": sha256_file(out_file),
             "pii_in_raw": "kept verbatim" if keep_pii else "replaced by placeholders",
             "pii_redacted": {"rows": redacted.pop("rows", 0), "found": dict(sorted(redacted.items()))}}
    if repaired is not None:
        entry["repaired"] = {"invalid_utf8": repaired["invalid_utf8"]}
    return entry


def check_empty_sources(sources: list[dict], action: str) -> list[str]:
    """The names of sources that gave no row: a warning each, or (ingest.empty_source: fail) an error."""
    empty = [source["name"] for source in sources if source["rows"] == 0]
    for name in empty:
        origin = next(s["origin"] for s in sources if s["name"] == name)
        message = (f"ingest source '{name}' ({origin.get('path', origin['kind'])}) has no rows: an empty file, "
                   f"or a format with no records.")
        if action == "fail":
            raise PipelineError(f"{message} Fix the file, or remove the source from ingest.sources and "
                                f"compliance.sources (or set ingest.empty_source: warn).")
        print(f"warning: {message} Set ingest.empty_source: fail to stop on this.", file=sys.stderr)
    return empty


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.ingest, "ingest")


def main() -> None:
    with Stage("ingest", tracked_params) as stage:
        ingest = stage.params.ingest
        with stage.output() as out_dir:
            sources = [ingest_source(source, out_dir, ingest.keep_pii_in_raw) for source in ingest.sources]
            empty = check_empty_sources(sources, ingest.empty_source)
            stage.record["sources"] = sources
        stage.finish({"rows_total": sum(s["rows"] for s in sources), "empty_sources": len(empty),
                      "pii_rows_redacted": sum(s["pii_redacted"]["rows"] for s in sources),
                      **{f"rows.{s['name']}": s["rows"] for s in sources}})
        stage.tracker.log_artifact(RAW_DIR / PROVENANCE_FILE)
        for source in sources:
            stage.tracker.log_input(RAW_DIR / source["file"], f"raw/{source['name']}", "raw")
    for source in sources:
        print(f"ingest: {source['name']}: {source['rows']} rows -> {RAW_DIR}/{source['file']}")


if __name__ == "__main__":
    run_stage(main)
