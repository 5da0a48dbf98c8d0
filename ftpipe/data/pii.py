"""Find and redact personal data and secrets in training text.

A fine-tuned model can repeat what it was trained on, so the clean stage removes e-mail
addresses, phone numbers, IP addresses, payment cards, API keys and private keys before
anything reaches the tokenizer. Training data is full of code and docstrings, so every
pattern is written against false positives first: version numbers (3.11.7), dates
(2026-11-23), times, hex literals (0x7fffffff), floats, `user@host` without a TLD and
Python slices (`x[::2]`) are not PII.

Decisions worth knowing:
- Loopback and private IPv4 addresses (127.0.0.1, 10.0.0.5, 192.168.1.1) ARE reported as
  ip_address: the detector describes shape, not sensitivity, and an internal address in
  training data still leaks infrastructure. Callers that want to keep them can filter.
- IPv6 is reported only in its full 8-group form or a compressed form with at least three
  groups or one 4-digit group (2001:db8::1, fe80::1); `::1`, `a::b` and `1::2` are left
  alone because they are indistinguishable from slices and C++/Rust paths.
- A four-part dotted number (1.2.3.4) is reported as an IP address: it is rare as a
  version number and a missed address is worse than a redacted version.
- Payment cards must start with 2-6 (the issuer ranges of Visa, Mastercard, Amex,
  Discover, JCB, UnionPay) and pass Luhn; this keeps millisecond timestamps (17...) and
  ISBN-like numbers out.

Findings hold (kind, start, end) only: summaries and logs never carry the value itself.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import NamedTuple

PII_KINDS = ("email", "phone", "ip_address", "payment_card", "api_key", "private_key")
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in PII_KINDS}
# When two findings overlap, the more specific kind wins: a private key's base64 body can
# contain anything, an API key can look like digits, a card number like a phone number.
PRIORITY = {"private_key": 0, "api_key": 1, "payment_card": 2, "email": 3, "ip_address": 4, "phone": 5}

_EMAIL = (r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
          r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
# North-American style (555) 123-4567 / 555-123-4567 / +1 555 123 4567, or an international
# number that starts with + and has separators. A date (2026-11-23) is 4-2-2, never 3-3-4.
_PHONE = (r"(?<![\w.+-])(?:"
          r"(?:\+1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}"
          r"|\+\d{1,3}(?:[\s.-]\(?\d{1,4}\)?){2,5}"
          r")(?![\w.-]\d|\w)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)"
_IPV6 = r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"
# 13-19 digits: unbroken, in groups of four (the last group 1-4, plus an optional 19th-digit
# group), or Amex's 4-6-5. The separator must be the same all along (the \1 / \2 back-refs).
_CARD = (r"(?<![\w.+-])(?:[2-6]\d{12,18}"
         r"|[2-6]\d{3}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"
         r"|3\d{3}([ -])\d{6}\2\d{4,5})(?!\w|[.-]\d)")
_API_KEY = (r"(?<![\w-])(?:"
            r"(?:AKIA|ASIA)[0-9A-Z]{16}"                      # AWS access key id
            r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,}"  # GitHub tokens
            r"|xox[baprs]-[A-Za-z0-9-]{10,}"                   # Slack tokens
            r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"           # OpenAI / Anthropic style
            r")(?![\w-])")
# `api_key = "..."`, `"secret_key": '...'`, `token: ...`: the finding is the value only,
# 16+ characters of token alphabet (placeholders such as "[API_KEY]" never qualify).
_ASSIGNED_KEY = (r"(?i:api[_-]?key|apikey|secret[_-]?key|client[_-]?secret|access[_-]?token"
                 r"|auth[_-]?token|access[_-]?key|private[_-]?token|secret|token)[\"']?\s*[:=]\s*[\"']"
                 r"([A-Za-z0-9_\-+/=.]{16,})[\"']")
_PRIVATE_KEY = (r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?"
                r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)")   # a truncated key still counts

VALIDATION_PATTERNS: dict[str, str] = {
    "email": _EMAIL,
    "phone": _PHONE,
    "ip_address": _IPV4,
    "payment_card": _CARD,
    "api_key": f"{_API_KEY}|{_ASSIGNED_KEY}",
    "private_key": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
}
"""Plain `re` patterns for Great Expectations' ExpectColumnValuesToNotMatchRegex.

They describe shapes only: find_pii additionally checks Luhn for cards, validates IPv6 and
requires some randomness in generic key assignments, so these patterns are a superset for
payment_card (a Luhn-invalid 16-digit number matches here but is not redacted) and do not
cover IPv6. Redaction placeholders never match any of them.
"""


class Finding(NamedTuple):
    kind: str
    start: int
    end: int


_RE = {name: re.compile(src) for name, src in
       {"email": _EMAIL, "phone": _PHONE, "ipv4": _IPV4, "ipv6": _IPV6, "card": _CARD,
        "api_key": _API_KEY, "assigned_key": _ASSIGNED_KEY, "private_key": _PRIVATE_KEY}.items()}
_HAS_DIGIT = re.compile(r"\d")
_KEY_HINT = re.compile(r"(?i)AKIA|ASIA|gh[pousr]_|github_pat_|xox|sk-|key|secret|token")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6_ok(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    groups = [g for g in candidate.split(":") if g]
    if "::" not in candidate:
        return len(groups) == 8
    return len(groups) >= 3 or any(len(g) == 4 for g in groups)


def _random_enough(token: str) -> bool:
    """A secret mixes letters and digits; `your_api_key_here_please` does not."""
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token) and len(set(token)) >= 8


def _candidates(text: str) -> list[Finding]:
    found: list[Finding] = []
    if "PRIVATE KEY" in text:
        found += [Finding("private_key", m.start(), m.end()) for m in _RE["private_key"].finditer(text)]
    if _KEY_HINT.search(text):
        found += [Finding("api_key", m.start(), m.end()) for m in _RE["api_key"].finditer(text)]
        found += [Finding("api_key", m.start(1), m.end(1)) for m in _RE["assigned_key"].finditer(text)
                  if _random_enough(m.group(1))]
    if "@" in text:
        found += [Finding("email", m.start(), m.end()) for m in _RE["email"].finditer(text)]
    if ":" in text:
        found += [Finding("ip_address", m.start(), m.end()) for m in _RE["ipv6"].finditer(text)
                  if _ipv6_ok(m.group())]
    if _HAS_DIGIT.search(text):
        found += [Finding("ip_address", m.start(), m.end()) for m in _RE["ipv4"].finditer(text)]
        for m in _RE["card"].finditer(text):
            digits = re.sub(r"[ -]", "", m.group())
            if 13 <= len(digits) <= 19 and luhn_ok(digits):
                found.append(Finding("payment_card", m.start(), m.end()))
        for m in _RE["phone"].finditer(text):
            if 7 <= sum(c.isdigit() for c in m.group()) <= 15:   # E.164 allows at most 15 digits
                found.append(Finding("phone", m.start(), m.end()))
    return found


def find_pii(text: str) -> list[Finding]:
    """All non-overlapping findings in `text`, ordered by position."""
    kept: list[Finding] = []
    for cand in sorted(_candidates(text), key=lambda f: (PRIORITY[f.kind], f.start, -f.end)):
        if all(cand.end <= k.start or cand.start >= k.end for k in kept):
            kept.append(cand)
    return sorted(kept, key=lambda f: f.start)


def redact(text: str) -> tuple[str, Counter]:
    """Replace each finding by its typed placeholder; return the new text and counts by kind."""
    findings = find_pii(text)
    counts: Counter = Counter(f.kind for f in findings)
    if not findings:
        return text, counts
    parts, pos = [], 0
    for f in findings:
        parts += [text[pos:f.start], PLACEHOLDERS[f.kind]]
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts), counts


def redact_value(value: object) -> tuple[object, Counter]:
    """A JSON value (a record, a list, a string) with every finding in its strings replaced by its placeholder,
    and the counts by kind. Keys are left alone: they name fields, they hold no one's data."""
    if isinstance(value, str):
        return redact(value)
    counts: Counter = Counter()
    if isinstance(value, list):
        items = []
        for item in value:
            redacted, found = redact_value(item)
            items.append(redacted)
            counts.update(found)
        return items, counts
    if isinstance(value, dict):
        fields = {}
        for key, item in value.items():
            fields[key], found = redact_value(item)
            counts.update(found)
        return fields, counts
    return value, counts
