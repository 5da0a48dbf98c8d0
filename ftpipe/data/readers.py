"""Reading a user's data file row by row, without ever stopping on a bad row: JSONL (.jsonl, .ndjson), a JSON
array, CSV/TSV, Parquet, or a Hugging Face dataset folder written by `Dataset.save_to_disk`.

Each row comes back as {"row": n, "record": {...}} (n counts from 1: the line of a JSONL file, the data row
of a CSV), or as an error row {"row": n, "error": why, "text": its start} when it cannot be read as a record
(malformed JSON, not an object, absurdly large or deeply nested); the ingest stage writes both to data/raw/
and clean quarantines the error rows. A byte-order mark is dropped, invalid UTF-8 is replaced and counted.
Only a file that cannot be read at all (unsupported type, a .json that is not an array, a corrupt Parquet
file or dataset folder) is a PipelineError naming the file and the fix.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import HASH_CHUNK

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                ".parquet": "parquet"}

# Limits that keep hostile input from exhausting memory or the stack. A JSONL line longer than
# MAX_RECORD_BYTES is skipped unread (as an error row) rather than parsed: no training example is
# near 1 MiB (clean.max_answer_chars is far lower), and a 30 MB record must never be loaded, parsed,
# normalized and compared. Other formats measure a record's total text against the same limit.
MAX_RECORD_BYTES = 1 << 20
# Real records nest 3-4 levels ({"messages": [{"role", "content"}]}); far deeper ones are hostile and
# would hit Python's recursion limit when written or read again.
MAX_NESTING = 64
ERROR_TEXT_CHARS = 200   # how much of an unreadable line an error row keeps, for the quarantine file
HF_DATASET_MARKERS = ("dataset_info.json", "state.json")


def read_file_source(path: Path, repaired: Counter | None = None) -> Iterator[dict]:
    """Yield each row of a user file: {"row": n, "record": {...}}, or {"row": n, "error": why, "text":
    the line's start} for a row that cannot be read as a record (clean quarantines those). Lines with
    invalid UTF-8 are decoded with replacement characters and counted in `repaired["invalid_utf8"]`.
    A file that cannot be read at all is a PipelineError naming the file and the fix."""
    repaired = Counter() if repaired is None else repaired
    if path.is_dir():
        yield from _read_hf_dataset(path)
        return
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PipelineError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}, "
                            "or a Hugging Face dataset folder (Dataset.save_to_disk)")
    if kind == "jsonl":
        with open(path, "rb") as handle:
            for number, line, size in _binary_lines(handle):
                if size > MAX_RECORD_BYTES:
                    yield _error_row(number, f"record too large: {size} bytes (limit {MAX_RECORD_BYTES})",
                                     _decode(line[:4 * ERROR_TEXT_CHARS], None))
                    continue
                text = _decode(line, repaired)
                if not text.strip():
                    continue
                try:
                    record = json.loads(text, strict=False)   # strict=False: raw control chars are repaired later
                except json.JSONDecodeError as err:
                    yield _error_row(number, f"malformed JSON: {err.msg} at column {err.colno}", text)
                    continue
                except RecursionError:
                    yield _error_row(number, f"nested too deeply: more than {MAX_NESTING} levels", text)
                    continue
                yield _as_record(record, number, text)
    elif kind == "json":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            repaired["invalid_utf8"] += sum(1 for line in data.split(b"\n") if not _valid_utf8(line))
            text = data.decode("utf-8", errors="replace")
        try:
            items = json.loads(text.removeprefix("\ufeff"), strict=False)
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}: line {err.lineno}: malformed JSON ({err.msg}). A .json source is read "
                                "as a whole: fix that line, or convert the file to JSONL (one object per line) "
                                "so that a broken row is quarantined instead.") from err
        except RecursionError as err:
            raise PipelineError(f"{path}: JSON nested too deeply to read; convert the file to JSONL "
                                "(one object per line) so that such rows are quarantined instead.") from err
        if not isinstance(items, list):
            raise PipelineError(f"{path}: a .json source must hold an array of objects; for one object per "
                                "line, name the file .jsonl")
        for number, record in enumerate(items, start=1):
            yield _as_record(record, number, None)
    elif kind in ("csv", "tsv"):
        yield from _read_csv(path, "," if kind == "csv" else "\t", repaired)
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:   # pyarrow raises several types for a corrupt or non-Parquet file
            raise PipelineError(f"{path}: cannot read as Parquet ({err}). Check the file, or export it again.") from err
        for number, record in enumerate(table.to_pylist(), start=1):
            yield _as_record(record, number, None)


def _binary_lines(handle) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, its size in bytes) for each line; a line over MAX_RECORD_BYTES comes back
    with only its start, the rest skipped in 1 MiB reads, so memory stays bounded."""
    number = 0
    while True:
        line = handle.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        number += 1
        size = len(line.rstrip(b"\r\n"))
        if size > MAX_RECORD_BYTES and not line.endswith(b"\n"):   # skip the rest of this line unread
            while True:
                rest = handle.readline(HASH_CHUNK)
                size += len(rest.rstrip(b"\r\n"))
                if not rest or rest.endswith(b"\n"):
                    break
        yield number, line, size


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decode(line: bytes, repaired: Counter | None) -> str:
    """Decode one line as UTF-8; invalid bytes become U+FFFD and the line is counted as repaired."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        if repaired is not None:
            repaired["invalid_utf8"] += 1
        text = line.decode("utf-8", errors="replace")
    return text.removeprefix("\ufeff")   # a byte-order mark is not data (also one mid-file, from `cat`)


def _read_csv(path: Path, delimiter: str, repaired: Counter) -> Iterator[dict]:
    def lines() -> Iterator[str]:   # whole lines: a quoted field may span several
        with open(path, "rb") as handle:
            for line in handle:
                yield _decode(line, repaired)

    # (process-wide; the default 128 KiB would reject legitimate long fields) a longer field is a
    # csv.Error below, quarantined as "record too large"
    csv.field_size_limit(MAX_RECORD_BYTES)
    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise PipelineError(f"{path}: cannot read the header row ({err}); fix the first line.") from err
    number = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            number += 1
            reason = "record too large" if "field larger than field limit" in str(err) else "malformed CSV"
            yield _error_row(number, f"{reason}: {err} (line {reader.line_num})", "")
            continue
        if not values:   # csv.DictReader skips blank lines too
            continue
        number += 1
        yield _as_record({key: value for key, value in zip(header, values)}, number, None)


def _read_hf_dataset(path: Path) -> Iterator[dict]:
    """A Hugging Face dataset folder written by `Dataset.save_to_disk`."""
    if (path / "dataset_dict.json").is_file():
        raise PipelineError(f"{path}: a DatasetDict (several splits) saved to disk; save one split, e.g. "
                            f"`dataset['train'].save_to_disk('{path}')`, or list each split as its own source")
    if not any((path / marker).is_file() for marker in HF_DATASET_MARKERS):
        raise PipelineError(f"{path}: a folder, but not a Hugging Face dataset saved with `Dataset.save_to_disk` "
                            f"(no {' or '.join(HF_DATASET_MARKERS)}); give the path of a data file or of such a folder")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:   # datasets raises several types for a damaged folder
        raise PipelineError(f"{path}: cannot load the Hugging Face dataset ({err}); save it again with "
                            "`Dataset.save_to_disk`.") from err
    for number, record in enumerate(dataset, start=1):
        yield _as_record(record, number, None)


def _error_row(number: int, error: str, text: str) -> dict:
    return {"row": number, "error": error, "text": text[:ERROR_TEXT_CHARS + 2].rstrip("\r\n")[:ERROR_TEXT_CHARS]}


def _as_record(record: object, number: int, text: str | None) -> dict:
    """A parsed row as a record, or an error row when it is not an object, is absurdly large, or nests
    too deeply to be written and read back safely."""
    shown = text if text is not None else _preview(record)
    if not isinstance(record, dict):
        return _error_row(number, f"not an object: got {type(record).__name__}", shown)
    depth, size = _depth_and_size(record)
    if depth > MAX_NESTING:
        return _error_row(number, f"nested too deeply: more than {MAX_NESTING} levels", shown)
    if size > MAX_RECORD_BYTES:
        return _error_row(number, f"record too large: {size} characters of text (limit {MAX_RECORD_BYTES})", shown)
    return {"row": number, "record": record}


def _preview(value: object) -> str:
    if isinstance(value, str):
        return value[:ERROR_TEXT_CHARS]
    if isinstance(value, (dict, list)):
        return f"<{type(value).__name__} of {len(value)} items>"
    return repr(value)[:ERROR_TEXT_CHARS]


def _depth_and_size(value: object) -> tuple[int, int]:
    """Nesting depth and total length of the strings (keys included), without recursion; stops
    counting depth once it passes MAX_NESTING."""
    deepest, size, stack = 0, 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            size += len(item)
            continue
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        if isinstance(item, dict):
            size += sum(len(str(key)) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        else:
            stack.extend((child, depth + 1) for child in item)
    return deepest, size
