"""Stage `ingest`: materialize every data source of params.yaml into data/raw/.

    python -m stages.ingest

Each source becomes data/raw/<name>.jsonl, one {"row": n, "record": {...}} per input row
(n counts from 1: the line of a JSONL file, the data row of a CSV), plus its provenance:
origin, declared SPDX license, retrieval time, SHA-256 and row count.
"""
from __future__ import annotations

import ast
import csv
import inspect
import itertools
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.errors import PipelineError, run_stage
from ftpipe.io import atomic_dir, sha256_file, write_json, write_jsonl
from ftpipe.params import Params, SourceParams, flatten, load_params
from ftpipe.paths import PROVENANCE_FILE, RAW_DIR, SOURCES_DIR, metrics_file
from ftpipe.provenance import stage_record, utc_now
from ftpipe.tracking import stage_run

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                ".parquet": "parquet"}

# Standard-library areas that are not public API, are GUI/demo code, or are tests.
STDLIB_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "tkinter",
                     "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "__pycache__", "__phello__"}


def read_file_source(path: Path) -> Iterator[dict]:
    """Yield each row of a user file as a dict; malformed input is an error naming file and row."""
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PipelineError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    if kind == "jsonl":
        with open(path, encoding="utf-8-sig") as handle:   # -sig: a byte-order mark is not data
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PipelineError(
                        f"{path}: line {number}: malformed JSON ({err.msg} at column {err.colno}). "
                        "Each line must be one JSON object; fix or delete that line."
                    ) from err
                yield _as_record(record, path, f"line {number}", number)
    elif kind == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}: line {err.lineno}: malformed JSON ({err.msg}).") from err
        if not isinstance(data, list):
            raise PipelineError(f"{path}: a .json source must hold an array of objects; for one object per "
                                "line, name the file .jsonl")
        for number, record in enumerate(data, start=1):
            yield _as_record(record, path, f"item {number}", number)
    elif kind in ("csv", "tsv"):
        with open(path, encoding="utf-8-sig", newline="") as handle:   # Excel writes a BOM
            reader = csv.DictReader(handle, delimiter="," if kind == "csv" else "\t")
            for number, record in enumerate(reader, start=1):
                yield {"row": number, "record": {k: v for k, v in record.items() if k is not None}}
    else:
        import pyarrow.parquet as pq

        for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield {"row": number, "record": record}


def _as_record(record: object, path: Path, where: str, number: int) -> dict:
    if not isinstance(record, dict):
        raise PipelineError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    return {"row": number, "record": record}


def stdlib_docstring_records() -> Iterator[dict]:
    """Alpaca records from this Python's standard library, parsed (never imported, so no side effects):
    for each public module-level function or class with a docstring, "What does `module.name` do?"
    and the docstring's first paragraph."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    number = 0
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if any(part in STDLIB_SKIP_PARTS or part.startswith(("_", "config-")) for part in parts[:-1]):
            continue
        if parts[-1].startswith("_") and parts[-1] != "__init__":
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not module:
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        public = _dunder_all(tree)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_") or (public is not None and node.name not in public):
                continue
            docstring = ast.get_docstring(node)
            if not docstring:
                continue
            first_paragraph = " ".join(inspect.cleandoc(docstring).split("\n\n")[0].split())
            number += 1
            yield {"row": number, "record": {"instruction": f"What does `{module}.{node.name}` do?",
                                             "output": first_paragraph}}


def _dunder_all(tree: ast.Module) -> set[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except (ValueError, TypeError):
                return None
    return None


def ingest_source(source: SourceParams, out_dir: Path) -> dict:
    """Write one source's rows to `out_dir/<name>.jsonl`; return its provenance entry."""
    if source.type == "file":
        path = Path(source.path)
        if not path.is_file():
            raise PipelineError(f"params.yaml ingest.sources '{source.name}': file {path} does not exist. "
                                f"Put your data under {SOURCES_DIR}/ and give its path.")
        if not path.resolve().is_relative_to(SOURCES_DIR.resolve()):
            print(f"warning: {path} is outside {SOURCES_DIR}/, so DVC cannot see its content change; "
                  f"move it there, or run `dvc repro -f ingest` after editing it.")
        rows = read_file_source(path)
        origin = {"kind": "file", "path": str(path), "sha256": sha256_file(path)}
    else:
        rows = stdlib_docstring_records()
        origin = {"kind": "python-stdlib", "python": sys.version.split()[0],
                  "stdlib": sysconfig.get_paths()["stdlib"],
                  "method": "ast-parsed public module-level functions and classes with docstrings"}
    if source.max_rows is not None:   # the first max_rows rows (row numbers may skip blank lines)
        rows = itertools.islice(rows, source.max_rows)
    out_file = out_dir / f"{source.name}.jsonl"
    count = write_jsonl(out_file, rows)
    return {"name": source.name, "origin": origin, "license": source.license, "retrieved_at": utc_now(),
            "rows": count, "file": out_file.name, "sha256": sha256_file(out_file)}


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.ingest, "ingest")


def main() -> None:
    params = load_params()
    stage_params = tracked_params(params)
    with stage_run("ingest", stage_params) as tracker:
        with atomic_dir(RAW_DIR) as out_dir:
            sources = [ingest_source(source, out_dir) for source in params.ingest.sources]
            write_json(out_dir / PROVENANCE_FILE, stage_record("ingest", stage_params, sources=sources))
        metrics = {"rows_total": sum(s["rows"] for s in sources),
                   **{f"rows.{s['name']}": s["rows"] for s in sources}}
        write_json(metrics_file("ingest"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(RAW_DIR / PROVENANCE_FILE)
    for source in sources:
        print(f"ingest: {source['name']}: {source['rows']} rows ({source['license']}) -> {RAW_DIR}/{source['file']}")


if __name__ == "__main__":
    run_stage(main)
