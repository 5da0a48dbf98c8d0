"""The compliance report's document model (ftpipe/release/report_render.py renders it): inline values (text,
code, digests, links, pass/fail marks), blocks (fields, tables, paragraphs, charts, the sign-off), and how a
report value reads as text. The sections (report_sections.py, report_evaluation.py) are written in these terms
only, so the Markdown and the HTML cannot drift apart.
"""
from __future__ import annotations

import re
from collections import namedtuple
from dataclasses import make_dataclass
from typing import Any, Sequence, Union

# --- inline values and blocks --------------------------------------------------------

# Inline values (a plain str is text). Dataclasses, not tuples: a tuple is a sequence of inline values.
Code = make_dataclass("Code", ["text"], frozen=True)           # a command, path or license id: monospace
Hash = make_dataclass("Hash", ["value"], frozen=True)          # a digest: monospace, wraps anywhere
Link = make_dataclass("Link", ["text", "url"], frozen=True)
LocalLink = make_dataclass("LocalLink", ["text", "path"], frozen=True)   # a release file, relative to the report
Mark = make_dataclass("Mark", ["kind", "text"], frozen=True)   # pass/fail/warn: a symbol and a word, not colour alone
Inline = Union[str, Code, Hash, Link, LocalLink, Mark, tuple]   # a tuple: its parts in a row
BR = "\n"   # a line break: <br> in both backends (as a newline in any text is)
SYMBOLS = {"pass": "✓", "fail": "✗", "warn": "⚠"}


# Blocks: named tuples (a section is a list of them); Chart is HTML only, the tables beside it carry its numbers.
Fields = namedtuple("Fields", "rows")                                  # (label, value) pairs
Table = namedtuple("Table", "headers rows numeric", defaults=((),))    # numeric: right-aligned columns
Para = namedtuple("Para", "text warning", defaults=(False,))
Items = namedtuple("Items", "items ordered", defaults=(False,))
Heading = namedtuple("Heading", "text")                                # a sub-heading inside a section
Commands = namedtuple("Commands", "lines")                             # shell lines to copy
Chart = namedtuple("Chart", "svg caption")
SignOff = namedtuple("SignOff", "")
Section = namedtuple("Section", "id title blocks")


# --- values ------------------------------------------------------------------------------------------------

DIGEST = re.compile(r"[0-9a-f]{32,}(\.dir)?")
SAFE_URL = re.compile(r"https?://[^\s<>\"'`\\]+")   # nothing else becomes a link (no javascript:, no file:)
SAFE_PATH = re.compile(r"(?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_-]+(?:\.[A-Za-z0-9]+)+")   # relative, no .., no scheme


def value(item: Any, exact: bool = False) -> Inline:
    """A report value as text: digests monospace, ints grouped, floats to 4 digits (exact: as stored)."""
    if item is None:
        return "—"
    if isinstance(item, bool):
        return "yes" if item else "no"
    if isinstance(item, int):
        return f"{item:,}"
    if isinstance(item, float):
        return repr(item) if exact else f"{item:.4g}"
    if isinstance(item, str):
        return Hash(item) if DIGEST.fullmatch(item) else item
    if isinstance(item, dict):
        return joined([(f"{key}: ", value(sub, exact)) for key, sub in item.items()]) or "none"
    if isinstance(item, (list, tuple)):
        return joined([value(sub, exact) for sub in item]) or "none"
    return str(item)


def joined(parts: Sequence[Inline], separator: Inline = ", ") -> tuple:
    return tuple(piece for i, part in enumerate(parts) for piece in ((separator, part) if i else (part,)))


def size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} B ({n / scale:.1f} {unit})"
    return f"{n:,} B"


def records(headers: tuple, rows: list, keys: tuple) -> Table:
    """A table of `rows` (dicts), one column per key."""
    return Table(headers, [tuple(value(row.get(key)) for key in keys) for row in rows])


def listing(title: str, headers: tuple, rows: list, keys: tuple, empty: str) -> list:
    """A sub-heading and the table of `rows`, or one line when there are none."""
    return [Heading(title), records(headers, rows, keys) if rows else Para(empty)]


