"""The built-in python_stdlib_docstrings source (ftpipe.data.stdlib_docstrings): many public names, each
answered by the first paragraph of its docstring, deterministic."""
from __future__ import annotations

import re

import pytest

from ftpipe.data.stdlib_docstrings import stdlib_docstring_records, stdlib_origin

QUESTION = re.compile(r"^What does `([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)` do\?$")


@pytest.fixture(scope="module")
def stdlib_rows() -> list[dict]:
    return list(stdlib_docstring_records())


def test_stdlib_records_are_many_alpaca_rows(stdlib_rows):
    assert len(stdlib_rows) > 500
    assert [row["row"] for row in stdlib_rows] == list(range(1, len(stdlib_rows) + 1))
    questions = [row["record"]["instruction"] for row in stdlib_rows]
    assert len(set(questions)) == len(questions)
    for row in stdlib_rows:
        record = row["record"]
        assert set(record) == {"instruction", "output"}
        assert QUESTION.match(record["instruction"]), record["instruction"]
        answer = record["output"]
        assert answer and answer == answer.strip()
        assert "\n" not in answer and "  " not in answer   # the first paragraph, whitespace collapsed
    assert "What does `json.dumps` do?" in questions
    assert "What does `collections.OrderedDict` do?" in questions


def test_stdlib_answer_is_the_first_paragraph_of_the_docstring(stdlib_rows):
    import json as json_module
    import textwrap

    by_question = {row["record"]["instruction"]: row["record"]["output"] for row in stdlib_rows}
    doc = textwrap.dedent(json_module.dumps.__doc__)
    first = " ".join(doc.strip().split("\n\n")[0].split())
    assert by_question["What does `json.dumps` do?"] == first
    assert len(first) < len(" ".join(doc.split()))   # the docstring has further paragraphs, not included


def test_stdlib_records_have_no_private_names_or_test_modules(stdlib_rows):
    names = [QUESTION.match(row["record"]["instruction"]).group(1) for row in stdlib_rows]
    for name in names:
        parts = name.split(".")
        assert not any(part.startswith("_") for part in parts), name
        assert not any(part in {"test", "tests", "idle_test", "idlelib", "tkinter", "lib2to3"}
                       for part in parts[:-1]), name
    modules = {name.rsplit(".", 1)[0] for name in names}
    assert "json" in modules and "unittest.mock" in modules
    assert not any(module.startswith(("test.", "unittest.test", "ctypes.test")) for module in modules)


def test_stdlib_records_respect_dunder_all(stdlib_rows):
    # json.__all__ lists dump, dumps, load, loads, JSONDecoder, JSONDecodeError, JSONEncoder only
    import json as json_module

    json_names = {QUESTION.match(row["record"]["instruction"]).group(1).split(".", 1)[1]
                  for row in stdlib_rows if row["record"]["instruction"].startswith("What does `json.")
                  and QUESTION.match(row["record"]["instruction"]).group(1).count(".") == 1}
    assert json_names and json_names <= set(json_module.__all__)


def test_stdlib_records_are_deterministic(stdlib_rows):
    assert list(stdlib_docstring_records()) == stdlib_rows


def test_stdlib_origin_names_this_python_and_its_standard_library():
    import sys
    from pathlib import Path

    origin = stdlib_origin()
    assert origin["kind"] == "python-stdlib" and origin["python"] == sys.version.split()[0]
    assert (Path(origin["stdlib"]) / "json" / "__init__.py").is_file()
    assert origin["method"] == "ast-parsed public module-level functions and classes with docstrings"
