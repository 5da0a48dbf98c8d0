"""General ability ("forgetting"): the loss of base and tuned on general text that is not training data.

A tuned model that got better at its task but worse at plain language has forgotten; its loss on general text
rises. evaluate.general_text names the text: `python_reference`, passages of CPython's own Language Reference
(the `pydoc_data.topics` module every CPython ships, under the PSF-2.0 license: prose the default data, which is
module docstrings as questions and answers, does not contain), or a .txt (passages separated by blank lines) or
.jsonl ({"text": ...} a line) file of this repository with its declared license. Passages are picked evenly across
the text, so the set is fixed for a given text, and none may occur in the training answers (checked).
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from ftpipe.core.errors import PipelineError
from ftpipe.core.evaluation_params import GeneralTextParams

BUILT_IN = "python_reference"
MIN_PASSAGE_CHARS = 200   # shorter paragraphs are headings, grammar rules or code: too little prose to score


def candidate_passages(source: str) -> tuple[list[str], str]:
    """Every usable passage of the text `source` names, in a fixed order, and where it came from."""
    if source == BUILT_IN:
        from pydoc_data.topics import topics

        texts = [topics[name] for name in sorted(topics)]
        origin = f"CPython {platform.python_version()} pydoc_data.topics (the Language Reference)"
    else:
        texts, origin = read_text_file(Path(source)), source
    paragraphs = [" ".join(part.split()) for text in texts for part in text.split("\n\n")]
    return [p for p in paragraphs if len(p) >= MIN_PASSAGE_CHARS and not p.startswith("::=")], origin


def read_text_file(path: Path) -> list[str]:
    key = "evaluate.general_text.source"
    if not path.is_file():
        raise PipelineError(f"{key}: {path} not found. Use {BUILT_IN!r} or a .txt/.jsonl file of this repository.")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix != ".jsonl":
        raise PipelineError(f"{key}: {path} must be a .txt (passages separated by blank lines) or .jsonl file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PipelineError(f"{path}:{number}: each line must be a JSON object with a \"text\" string "
                                f"({err.__class__.__name__})") from err
    return texts


def general_passages(params: GeneralTextParams, training_answers: list[str]) -> tuple[list[str], dict]:
    """`params.passages` passages picked evenly across the text, and a record of the set (origin, license, count,
    SHA-256 of the passages). A passage that occurs inside a training answer would measure memory, not ability:
    an error names it."""
    candidates, origin = candidate_passages(params.source)
    if len(candidates) < params.passages:
        raise PipelineError(f"evaluate.general_text: {origin} has {len(candidates)} passages of at least "
                            f"{MIN_PASSAGE_CHARS} characters; lower evaluate.general_text.passages to that or less")
    step = len(candidates) / params.passages
    passages = [candidates[int(index * step)] for index in range(params.passages)]
    for passage in passages:
        probe = passage[:MIN_PASSAGE_CHARS]
        if any(probe in answer for answer in training_answers):
            raise PipelineError(f"evaluate.general_text: a passage of {origin} occurs in the training data "
                                f"({probe[:60]!r}...): general text must be held out. Choose another text.")
    digest = hashlib.sha256("\n\n".join(passages).encode("utf-8")).hexdigest()
    return passages, {"source": params.source, "origin": origin, "license": params.license,
                      "passages": len(passages), "max_tokens": params.max_tokens, "sha256": digest}


def passage_rows(tokenizer, passages: list[str], max_tokens: int) -> list[dict]:
    """Token rows for mean_loss: each passage as plain text (no chat template), every token a label."""
    encoded = tokenizer(passages, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
    return [{"input_ids": ids, "labels": list(ids)} for ids in encoded]
