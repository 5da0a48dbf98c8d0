"""The built-in `python_stdlib_docstrings` data source: question/answer records parsed (never imported, so no
side effects) from this Python's standard library. For each public module-level function or class with a
docstring: "What does `module.name` do?" -> the docstring's first paragraph (PSF-2.0)."""
from __future__ import annotations

import ast
import inspect
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

# Standard-library areas that are not public API, are GUI/demo code, or are tests.
STDLIB_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "tkinter",
                     "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "__pycache__", "__phello__"}


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


def stdlib_origin() -> dict:
    """Where the records come from, for the source's provenance: this Python and its standard library."""
    return {"kind": "python-stdlib", "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
            "method": "ast-parsed public module-level functions and classes with docstrings"}


def _dunder_all(tree: ast.Module) -> set[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except (ValueError, TypeError):
                return None
    return None
