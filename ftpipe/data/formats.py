"""Recognising a training record's format and turning it into one chat schema: a list of {"role", "content"}
messages. Alpaca (instruction/input/output), chat `messages`, ShareGPT `conversations` and prompt/completion
records are converted; a plain `text` record is recognised but has no turns. A record that cannot become a
training example (a missing field, a wrong type, an unknown format, roles out of order, too much text, or a
row ingest could not read) is named with the reason clean quarantines it under.
"""
from __future__ import annotations

import json

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
RECORD_FORMATS = ("alpaca (instruction, input?, output)", "chat (messages: [{role, content}])",
                  "sharegpt (conversations: [{from, value}])", "prompt/completion")
ROLES = {"system", "user", "assistant"}
# A record with more text than this is rejected before it is normalized or compared: no training
# example is near it (clean.max_answer_chars would reject it anyway), and a multi-megabyte record
# must not be copied around several times. Ingest applies the same limit while reading.
MAX_RECORD_CHARS = 1 << 20
# Why ingest could not turn a row into a record (its "error" text starts with the key).
INGEST_ERRORS = {"malformed JSON": "malformed_json", "not an object": "not_an_object",
                 "record too large": "record_too_large", "nested too deeply": "too_deeply_nested",
                 "malformed CSV": "malformed_csv"}



class RecordRejected(ValueError):
    """A record that cannot become a training example: `reason` is the rejected.jsonl reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class UnknownFormat(RecordRejected):
    def __init__(self, detail: str):
        super().__init__("unknown_format", detail)


def to_messages(record: dict) -> tuple[str, list[dict]]:
    """Recognise a record's format and return (format name, messages); raise RecordRejected when a
    field is missing or has the wrong type, UnknownFormat when no format matches. A plain `text`
    record has no turns at all (it is rejected later: no assistant turn to learn from)."""
    if "messages" in record:
        messages = []
        for number, turn in enumerate(_turns(record["messages"], "messages"), start=1):
            if "role" not in turn:
                raise RecordRejected("missing_field", f"messages turn {number} has no 'role'")
            if "content" not in turn:
                raise RecordRejected("missing_field", f"messages turn {number} has no 'content'")
            messages.append({"role": _role(turn["role"], f"messages turn {number}"),
                             "content": _text(turn["content"], f"messages turn {number} 'content'")})
        return "chat", messages
    if "conversations" in record:
        messages = []
        for number, turn in enumerate(_turns(record["conversations"], "conversations"), start=1):
            where = f"conversations turn {number}"
            if "from" not in turn and "role" not in turn:
                raise RecordRejected("missing_field", f"{where} has no 'from' (or 'role')")
            if "value" not in turn and "content" not in turn:
                raise RecordRejected("missing_field", f"{where} has no 'value' (or 'content')")
            speaker = _role(turn.get("from", turn.get("role")), where).lower()
            messages.append({"role": SHAREGPT_ROLES.get(speaker, speaker),
                             "content": _text(turn.get("value", turn.get("content")), f"{where} 'value'")})
        return "sharegpt", messages
    if "instruction" in record and "output" in record:
        prompt = _text(record["instruction"], "'instruction'")
        extra = _text(record.get("input"), "'input'")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(record["output"], "'output'")}]
        system = _text(record.get("system"), "'system'")
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return "alpaca", messages
    if "prompt" in record and "completion" in record:
        return "prompt_completion", [{"role": "user", "content": _text(record["prompt"], "'prompt'")},
                                     {"role": "assistant", "content": _text(record["completion"], "'completion'")}]
    if "text" in record:
        _text(record["text"], "'text'")
        return "text", []
    keys = [str(key)[:50] for key in sorted(record, key=str)[:10]]
    raise UnknownFormat(f"unknown record format (keys: {keys}{', ...' if len(record) > 10 else ''}); "
                        f"supported: {'; '.join(RECORD_FORMATS)}")


def _turns(value: object, key: str) -> list[dict]:
    if not isinstance(value, list):
        raise RecordRejected("bad_field_type", f"'{key}' must be a list of objects, got {type(value).__name__}")
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise RecordRejected("bad_field_type",
                                 f"'{key}' must be a list of objects; turn {number} is {type(turn).__name__}")
    return value


def _role(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise RecordRejected("bad_field_type", f"{where}: the role must be a string, got {type(value).__name__}")
    return value


def _text(value: object, where: str = "field") -> str:
    """A text field: a string; None is empty; a number or boolean becomes its JSON text; anything else
    (an object, a list) is rejected: guessing how to flatten it would invent training text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return json.dumps(value)
    raise RecordRejected("bad_field_type", f"{where} must be a string, got {type(value).__name__}")


def structure_reason(messages: list[dict]) -> tuple[str, str] | None:
    """(reason, detail) when the turns cannot be trained with assistant-only loss: known roles only,
    an optional single system turn first, then user/assistant alternating, ending with the assistant."""
    roles = [m["role"] for m in messages]
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        return "unknown_role", f"role {unknown[0][:50]!r}; allowed: {sorted(ROLES)}"
    if "assistant" not in roles:
        return None   # rejection_reason says no_assistant_turn
    body = roles[1:] if roles[0] == "system" else roles
    for position, role in enumerate(body):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            return "bad_role_order", f"turn {position + 1 + len(roles) - len(body)} is {role!r}, expected {expected!r}"
    if roles[-1] != "assistant":
        return "last_turn_not_assistant", f"the last turn is {roles[-1]!r}"
    return None



def recognise_row(raw: dict) -> tuple[str | None, list[dict], str | None, str | None]:
    """(format, messages, reason, detail) for one row of data/raw ({"row", "record"} or ingest's error row);
    reason is None while the row may be kept."""
    if "error" in raw:   # ingest could not read this row into a record: quarantine it as it is
        error = str(raw["error"])
        reason = next((key for prefix, key in INGEST_ERRORS.items() if error.startswith(prefix)), "unreadable_row")
        return None, [], reason, error
    record = raw.get("record")
    if not isinstance(record, dict):
        return None, [], "not_an_object", f"expected a JSON object, got {type(record).__name__}"
    try:
        fmt, messages = to_messages(record)
    except RecordRejected as err:
        return None, [], err.reason, err.detail
    size = sum(len(m["content"]) for m in messages)
    if size > MAX_RECORD_CHARS:
        return fmt, [], "record_too_large", f"{size} characters of text (limit {MAX_RECORD_CHARS})"
    problem = structure_reason(messages)
    if problem is not None:
        return fmt, [], problem[0], problem[1]
    if not messages:   # a plain `text` record: nothing to learn the assistant's turns from
        return fmt, [], "no_assistant_turn", "a plain 'text' record has no assistant turn"
    return fmt, messages, None, None
