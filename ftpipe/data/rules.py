"""The rules clean applies to a conversation in the chat schema (ftpipe.data.formats): text normalization,
PII treatment, the reasons an example is rejected (empty, placeholder, too short or too long), its content
id, and the split that a hash of that id (and the salt) assigns, so adding rows never moves existing ones.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter

from ftpipe.core.params import CleanParams
from ftpipe.data import pii

BLANK_LINE_RUN = re.compile(r"\n{3,}")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
# Control characters (Unicode category Cc: C0, DEL, C1) other than newline and tab: NUL and friends
# are never meaningful in training text and break tokenizers and viewers, so normalize drops them
# (and clean counts the rows repaired).
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")   # \r: a line ending, normalized


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text)
    text = TRAILING_SPACE.sub("\n", text)
    return BLANK_LINE_RUN.sub("\n\n", text).strip()


def content_id(messages: list[dict]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def assign_split(row_id: str, params: CleanParams) -> str:
    """Deterministic split from the content hash: a row's split never depends on other rows."""
    digest = hashlib.sha256(f"{params.split_salt}:{row_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < params.test_fraction:
        return "test"
    if position < params.test_fraction + params.validation_fraction:
        return "validation"
    return "train"


def rejection_reason(messages: list[dict], params: CleanParams) -> str | None:
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no_assistant_turn"
    if any(not answer for answer in answers):
        return "empty_answer"
    placeholders = {p.lower() for p in params.placeholder_answers}
    if any(answer.lower().strip(" .!") in placeholders or answer.lower() in placeholders for answer in answers):
        return "placeholder_answer"
    if any(len(answer) < params.min_answer_chars for answer in answers):
        return "answer_too_short"
    if any(len(answer) > params.max_answer_chars for answer in answers):
        return "answer_too_long"
    if sum(len(m["content"]) for m in messages if m["role"] != "assistant") > params.max_prompt_chars:
        return "prompt_too_long"
    return None


def redact_record(value: object) -> object:
    """A quarantined record with every PII finding in its strings replaced by a placeholder:
    rejected.jsonl shows why a row was dropped without keeping the personal data it held."""
    return pii.redact_value(value)[0]


def find_and_treat_pii(messages: list[dict], action: str) -> tuple[list[dict], Counter]:
    """(messages with PII replaced by typed placeholders, counts by kind). With action "reject"
    the caller drops the row, but still only ever sees the redacted text."""
    found: Counter = Counter()
    redacted = []
    for message in messages:
        text, counts = pii.redact(message["content"])
        found.update(counts)
        redacted.append({"role": message["role"], "content": text})
    return redacted, found


def conversation_text(messages: list[dict], roles: set[str] | None = None) -> str:
    return "\n".join(m["content"] for m in messages if roles is None or m["role"] in roles)
