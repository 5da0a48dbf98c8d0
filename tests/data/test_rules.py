"""Clean's rules (ftpipe.data.rules): normalization, the rejection reasons, PII treatment, content ids and a
split that depends only on the content and the salt."""
from __future__ import annotations

import dataclasses

import pytest

from ftpipe.data.rules import (
    assign_split,
    content_id,
    conversation_text,
    find_and_treat_pii,
    normalize,
    redact_record,
    rejection_reason,
)
from tests.data_fixtures import ANSWER, CLEAN_PARAMS, assistant, user

PARAMS = CLEAN_PARAMS


# --- normalize ---------------------------------------------------------------------------------

def test_normalize_nfc():
    decomposed = "Cafe\u0301 nai\u0308ve"
    assert decomposed != "Café naïve"
    assert normalize(decomposed) == "Café naïve"


def test_normalize_line_endings_trailing_spaces_and_blank_runs():
    assert normalize("line one  \r\nline two\t\rline three") == "line one\nline two\nline three"
    assert normalize("a\n\n\n\n\nb\n\n\nc\n\nd") == "a\n\nb\n\nc\n\nd"
    assert normalize("a \n \n\t\n  \nb") == "a\n\nb"             # whitespace-only lines are blank too
    assert normalize("\n\n  text with  inner  spaces  \n\n") == "text with  inner  spaces"
    assert normalize("    indented code\n        keeps indentation") == "indented code\n        keeps indentation"


def test_normalize_removes_control_characters_but_newlines_and_tabs():
    assert normalize("a\x00b\x07c\x1bd\x7fe\x85f\tg\nh") == "abcdef\tg\nh"


def test_normalize_is_idempotent():
    text = "x  \r\n\r\n\r\n\r\ny\u0301 "
    assert normalize(normalize(text)) == normalize(text) == "x\n\ný"


# --- rejection_reason --------------------------------------------------------------------------

@pytest.mark.parametrize("messages, reason", [
    ([user("Q?"), assistant(ANSWER)], None),
    ([user("Q?"), assistant("")], "empty_answer"),
    ([user("Q?"), assistant(ANSWER), user("More?"), assistant("")], "empty_answer"),
    ([user("Q?"), assistant("N/A")], "placeholder_answer"),
    ([user("Q?"), assistant("None.")], "placeholder_answer"),
    ([user("Q?"), assistant("todo!")], "placeholder_answer"),
    ([user("Q?"), assistant("...")], "placeholder_answer"),
    ([user("Q?"), assistant("Too short")], "answer_too_short"),          # 9 < 10 chars
    ([user("Q?"), assistant("x" * 10)], None),                           # exactly the minimum
    ([user("Q?"), assistant("x" * 200)], None),                          # exactly the maximum
    ([user("Q?"), assistant("x" * 201)], "answer_too_long"),
    ([user("x" * 101), assistant(ANSWER)], "prompt_too_long"),
    ([{"role": "system", "content": "x" * 60}, user("y" * 41), assistant(ANSWER)], "prompt_too_long"),
    ([{"role": "system", "content": "x" * 60}, user("y" * 40), assistant(ANSWER)], None),
    ([user("Q?")], "no_assistant_turn"),
    ([user("Q?"), {"role": "gpt", "content": ANSWER}], "no_assistant_turn"),
])
def test_rejection_reasons(messages, reason):
    assert rejection_reason(messages, PARAMS) == reason


# --- content ids and the deterministic split ----------------------------------------------------

def test_assign_split_depends_only_on_content_and_salt():
    row_id = content_id([user("Q?"), assistant(ANSWER)])
    assert assign_split(row_id, PARAMS) == assign_split(row_id, dataclasses.replace(PARAMS, min_answer_chars=1))
    assert {assign_split(row_id, PARAMS) for _ in range(5)} == {assign_split(row_id, PARAMS)}


def test_content_id_is_the_role_and_text_of_every_turn():
    messages = [user("Q?"), assistant(ANSWER)]
    assert content_id(messages) == content_id([dict(m) for m in messages]) and len(content_id(messages)) == 16
    assert content_id(messages) != content_id([user("Q?"), assistant(ANSWER + "!")])
    assert content_id(messages) != content_id([assistant("Q?"), user(ANSWER)])


# --- PII ----------------------------------------------------------------------------------------

def test_find_and_treat_pii_redacts_and_counts_by_kind():
    messages, found = find_and_treat_pii([user("Mail jane.doe@example.org?"), assistant(ANSWER)], "reject")
    assert messages == [user("Mail [EMAIL]?"), assistant(ANSWER)] and found == {"email": 1}


def test_redact_record_redacts_every_string_of_a_record():
    assert redact_record({"instruction": "Mail?", "output": ["a@b.co", 3]}) == {
        "instruction": "Mail?", "output": ["[EMAIL]", 3]}
    assert redact_record(None) is None


def test_conversation_text_of_some_roles():
    messages = [{"role": "system", "content": "S"}, user("U"), assistant("A")]
    assert conversation_text(messages) == "S\nU\nA" and conversation_text(messages, {"system", "user"}) == "S\nU"
