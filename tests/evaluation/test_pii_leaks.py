"""PII leak audit: real-looking values in generations are reported by kind and position, never by value;
placeholders are not leaks."""
from __future__ import annotations

import json

from ftpipe.data.pii import PII_KINDS
from ftpipe.evaluation.pii_leaks import audit_prompts, pii_leaks, placeholder_kinds

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"   # passes Luhn


def test_real_values_are_counted_by_kind_and_position():
    generations = ["Write to [EMAIL] or call [PHONE].",
                   f"Sure, mail {EMAIL} and pay with {CARD}.",
                   "Nothing personal here: version 3.11.7, 2026-11-23.",
                   f"Again: {EMAIL}"]
    report = pii_leaks(generations)
    assert report["generations"] == 4 and report["with_pii"] == 2
    assert set(report["counts"]) == set(PII_KINDS)
    assert report["counts"]["email"] == 2 and report["counts"]["payment_card"] == 1
    assert sum(report["counts"].values()) == 3
    assert [(leak["index"], leak["kind"]) for leak in report["leaks"]] == [(1, "email"), (1, "payment_card"),
                                                                           (3, "email")]
    first = report["leaks"][0]
    assert generations[1][first["start"]:first["end"]] == EMAIL
    dumped = json.dumps(report)
    assert EMAIL not in dumped and CARD not in dumped and "4111" not in dumped


def test_placeholder_only_text_is_clean():
    report = pii_leaks(["[EMAIL] [PHONE] [IP_ADDRESS] [PAYMENT_CARD] [API_KEY] [PRIVATE_KEY]", ""])
    assert report["with_pii"] == 0 and report["leaks"] == [] and not any(report["counts"].values())
    assert pii_leaks([])["generations"] == 0


def test_audit_prompts_pick_answers_with_placeholders():
    def row(id_, answer):
        return {"id": id_, "source": "s", "messages": [{"role": "user", "content": "Contact? [EMAIL]"},
                                                       {"role": "assistant", "content": answer}]}

    rows = [row("c", "Mail [EMAIL], card [PAYMENT_CARD]."), row("a", "No contact."), row("b", "Call [PHONE].")]
    assert [r["id"] for r in audit_prompts(rows)] == ["b", "c"]   # the question's placeholder does not count
    assert [r["id"] for r in audit_prompts(rows, limit=1)] == ["b"]
    assert placeholder_kinds("Mail [EMAIL], card [PAYMENT_CARD].") == ["email", "payment_card"]
    assert placeholder_kinds("an [email] in lower case") == []
