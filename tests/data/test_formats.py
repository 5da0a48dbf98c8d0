"""Recognising record formats (ftpipe.data.formats): Alpaca, chat, ShareGPT, prompt/completion and text
records become chat messages; missing fields, wrong types, unknown formats and bad turn orders are named."""
from __future__ import annotations

import pytest

from ftpipe.data.formats import (
    MAX_RECORD_CHARS,
    RecordRejected,
    UnknownFormat,
    recognise_row,
    structure_reason,
    to_messages,
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_alpaca_without_input():
    assert to_messages({"instruction": "Say hi.", "output": "Hi!"}) == (
        "alpaca", [user("Say hi."), assistant("Hi!")])


def test_alpaca_with_empty_input_and_extra_keys():
    record = {"instruction": "Say hi.", "input": "  ", "output": "Hi!", "id": 7, "category": "greeting"}
    assert to_messages(record) == ("alpaca", [user("Say hi."), assistant("Hi!")])


def test_alpaca_with_input():
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert to_messages(record) == ("alpaca", [user("Translate to French.\n\nGood morning"), assistant("Bonjour")])


def test_alpaca_with_system():
    record = {"system": "Be terse.", "instruction": "Sum 2 and 2.", "input": None, "output": "4"}
    assert to_messages(record) == (
        "alpaca", [{"role": "system", "content": "Be terse."}, user("Sum 2 and 2."), assistant("4")])


def test_chat_messages():
    messages = [{"role": "system", "content": "Be kind."}, user("Hi?"), assistant("Hello."),
                user("And?"), {"role": "assistant", "content": None}]
    fmt, out = to_messages({"messages": messages, "meta": {"x": 1}})
    assert fmt == "chat"
    assert out == messages[:4] + [assistant("")]   # a missing content becomes "" (rejected later as empty)


def test_chat_number_content_becomes_its_text():
    assert to_messages({"messages": [user("Two plus two?"), {"role": "assistant", "content": 4}]}) == (
        "chat", [user("Two plus two?"), assistant("4")])


@pytest.mark.parametrize("record, reason, detail", [
    ({"messages": [user("List?"), {"role": "assistant", "content": [1, "ä"]}]}, "bad_field_type",
     "messages turn 2 'content' must be a string, got list"),
    ({"messages": [user("Dict?"), {"role": "assistant", "content": {"text": "x"}}]}, "bad_field_type",
     "messages turn 2 'content' must be a string, got dict"),
    ({"messages": [user("Q?"), {"content": "no role"}]}, "missing_field", "messages turn 2 has no 'role'"),
    ({"messages": [user("Q?"), {"role": "assistant"}]}, "missing_field", "messages turn 2 has no 'content'"),
    ({"messages": [user("Q?"), {"role": 3, "content": "x"}]}, "bad_field_type",
     "messages turn 2: the role must be a string, got int"),
    ({"conversations": [{"value": "Hi?"}]}, "missing_field", "conversations turn 1 has no 'from' (or 'role')"),
    ({"conversations": [{"from": "human"}]}, "missing_field", "conversations turn 1 has no 'value' (or 'content')"),
    ({"instruction": ["a"], "output": "b"}, "bad_field_type", "'instruction' must be a string, got list"),
    ({"prompt": "p", "completion": {"a": 1}}, "bad_field_type", "'completion' must be a string, got dict"),
])
def test_missing_or_wrongly_typed_fields_are_rejected(record, reason, detail):
    with pytest.raises(RecordRejected) as error:
        to_messages(record)
    assert (error.value.reason, error.value.detail) == (reason, detail)


def test_plain_text_record_is_format_text_without_turns():
    assert to_messages({"text": "just text"}) == ("text", [])


def test_sharegpt_conversations():
    record = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi?"},
                                {"from": "gpt", "value": "Hello."}, {"from": "Human", "value": "More?"},
                                {"from": "GPT", "value": "Sure."}]}
    assert to_messages(record) == ("sharegpt", [{"role": "system", "content": "Be kind."}, user("Hi?"),
                                                assistant("Hello."), user("More?"), assistant("Sure.")])


def test_sharegpt_with_role_and_content_keys():
    record = {"conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    assert to_messages(record) == ("sharegpt", [user("Hi?"), assistant("Hello.")])


def test_prompt_completion():
    assert to_messages({"prompt": "2+2=", "completion": "4"}) == ("prompt_completion", [user("2+2="), assistant("4")])


@pytest.mark.parametrize("record", [
    {"instruction": "no output"},
    {"prompt": "no completion"},
    {},
])
def test_unknown_format(record):
    with pytest.raises(UnknownFormat, match=r"unknown record format \(keys: "):
        to_messages(record)
    with pytest.raises(RecordRejected) as error:
        to_messages(record)
    assert error.value.reason == "unknown_format"


@pytest.mark.parametrize("record", [{"messages": "not a list"}, {"conversations": [["a", "b"]]}])
def test_malformed_turns_are_bad_field_type(record):
    with pytest.raises(RecordRejected, match="must be a list of objects") as error:
        to_messages(record)
    assert error.value.reason == "bad_field_type"


@pytest.mark.parametrize("roles, reason", [
    (["user", "assistant"], None),
    (["system", "user", "assistant"], None),
    (["user", "assistant", "user", "assistant"], None),
    (["user"], None),                                    # rejection_reason: no_assistant_turn
    (["user", "gpt"], "unknown_role"),
    (["assistant", "user", "assistant"], "bad_role_order"),
    (["user", "user", "assistant"], "bad_role_order"),
    (["user", "system", "assistant"], "bad_role_order"),
    (["system", "system", "user", "assistant"], "bad_role_order"),
    (["user", "assistant", "user"], "last_turn_not_assistant"),
])
def test_structure_reasons(roles, reason):
    problem = structure_reason([{"role": role, "content": "x"} for role in roles])
    assert (problem[0] if problem else None) == reason


@pytest.mark.parametrize("raw, reason", [
    ({"row": 1, "error": "malformed JSON: Expecting value at column 5", "text": "{"}, "malformed_json"),
    ({"row": 1, "error": "not an object: got list", "text": "[]"}, "not_an_object"),
    ({"row": 1, "error": "record too large: 31457300 bytes (limit 1048576)", "text": ""}, "record_too_large"),
    ({"row": 1, "error": "nested too deeply: more than 64 levels", "text": ""}, "too_deeply_nested"),
    ({"row": 1, "error": "malformed CSV: unexpected end of data (line 3)", "text": ""}, "malformed_csv"),
    ({"row": 1, "error": "something else", "text": ""}, "unreadable_row"),
    ({"row": 1, "record": ["not", "an", "object"]}, "not_an_object"),
    ({"row": 1, "record": {"body": "x"}}, "unknown_format"),
    ({"row": 1, "record": {"messages": [user("Q?"), user("Q?"), assistant("A.")]}}, "bad_role_order"),
    ({"row": 1, "record": {"prompt": "Q?", "completion": "x" * MAX_RECORD_CHARS}}, "record_too_large"),
    ({"row": 1, "record": {"text": "Free text."}}, "no_assistant_turn"),
])
def test_recognise_row_names_why_a_row_cannot_be_kept(raw, reason):
    fmt, messages, found, detail = recognise_row(raw)
    assert (found, messages) == (reason, []) and detail


def test_recognise_row_keeps_a_well_formed_record():
    assert recognise_row({"row": 3, "record": {"prompt": "Q?", "completion": "A."}}) == (
        "prompt_completion", [user("Q?"), assistant("A.")], None, None)
