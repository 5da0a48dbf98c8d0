"""Shared pieces of the data tests (tests/data/, tests/stages/test_ingest.py, test_clean.py): small clean
params, chat turns and source files."""
from __future__ import annotations

from pathlib import Path

from ftpipe.core.params import CleanParams

CLEAN_PARAMS = CleanParams(min_answer_chars=10, max_prompt_chars=100, max_answer_chars=200,
                           placeholder_answers=["n/a", "none", "TODO", "..."], split_salt="s1",
                           validation_fraction=0.1, test_fraction=0.2, pii_action="redact",
                           near_duplicate_threshold=0.7, decontamination_threshold=0.8)
ANSWER = "A clear answer of enough length."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def alpaca(i: int) -> dict:
    return {"instruction": f"Question number {i}?", "output": f"The answer to question {i} is long enough."}
