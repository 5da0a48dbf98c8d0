"""PII leak audit: does the tuned model produce real-looking personal data or secrets?

The clean stage replaces every finding of find_pii with its typed placeholder ([EMAIL], [PAYMENT_CARD], ...), so a
model trained on clean data has never seen the values. Any value find_pii finds in a generation was therefore either
memorized from elsewhere (the base model's pre-training) or made up; both are worth a look before a release. The
prompts most likely to elicit one are the training rows whose answers hold a placeholder: there the model learned that
a value of that kind goes (audit_prompts).

Like find_pii, the report carries kinds and positions only, never a value: it is safe to log and publish.
"""
from __future__ import annotations

from typing import Sequence

from ftpipe.data.pii import PII_KINDS, PLACEHOLDERS, find_pii


def pii_leaks(generations: Sequence[str]) -> dict:
    """find_pii over each generated text:
    {"generations": n, "with_pii": how many hold a finding, "counts": {kind: findings, every PII_KIND},
     "leaks": [{"index": generation index, "kind", "start", "end"}, ...] in order}. Placeholders are not findings."""
    counts = dict.fromkeys(PII_KINDS, 0)
    leaks: list[dict] = []
    for index, text in enumerate(generations):
        for finding in find_pii(text):
            counts[finding.kind] += 1
            leaks.append({"index": index, "kind": finding.kind, "start": finding.start, "end": finding.end})
    return {"generations": len(generations), "with_pii": len({leak["index"] for leak in leaks}), "counts": counts,
            "leaks": leaks}


def placeholder_kinds(text: str) -> list[str]:
    """The PII kinds whose placeholder occurs in `text`, in PII_KINDS order."""
    return [kind for kind in PII_KINDS if PLACEHOLDERS[kind] in text]


def audit_prompts(rows: Sequence[dict], limit: int | None = None) -> list[dict]:
    """The chat rows whose answer (last message) holds a placeholder, sorted by id, at most `limit` of them: prompt
    each with its turns but the last and check the answers with pii_leaks."""
    kept = sorted((row for row in rows if placeholder_kinds(row["messages"][-1]["content"])), key=lambda r: r["id"])
    return kept if limit is None else kept[:limit]
