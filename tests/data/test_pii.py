"""Personal data and secrets are found and redacted; code and docstrings are left alone."""
import re

import pytest

from ftpipe.data.pii import PII_KINDS, PLACEHOLDERS, VALIDATION_PATTERNS, find_pii, redact

# Test fixtures only: documented example values (AWS docs key, RFC 5737/3849 addresses,
# card-network test numbers), none of them live credentials.
POSITIVES = [
    ("email", "write to jane.doe+ml@example.co.uk today"),
    ("email", "Contact: bob_smith@mail.server-1.org."),
    ("phone", "call (555) 123-4567 now"),
    ("phone", "call 555-123-4567 now"),
    ("phone", "office +44 20 7946 0958"),
    ("phone", "US +1 555.123.4567"),
    ("ip_address", "server at 192.0.2.17 responded"),
    ("ip_address", "loopback 127.0.0.1 is still an IP address"),
    ("ip_address", "v6 2001:db8:85a3::8a2e:370:7334 here"),
    ("ip_address", "link-local fe80::1 here"),
    ("ip_address", "full 2001:0db8:0000:0000:0000:ff00:0042:8329"),
    ("payment_card", "card 4111111111111111 exp"),
    ("payment_card", "card 4111 1111 1111 1111 exp"),
    ("payment_card", "card 5555-5555-5555-4444 exp"),
    ("payment_card", "amex 3782 822463 10005"),
    ("payment_card", "amex 378282246310005"),
    ("api_key", "aws AKIAIOSFODNN7EXAMPLE key"),
    ("api_key", "token ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8" + " end"),
    ("api_key", "slack xoxb-123456789012-abcdefABCDEF123"),
    ("api_key", "OPENAI_KEY=sk-" + "abcdefghij0123456789ABCDEFGH"),
    ("api_key", 'api_key = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"'),
    ("api_key", "config = {'client_secret': 'Zx81Kq0PLm29vNb47TrW'}"),
    ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow+abc/12==\n-----END RSA PRIVATE KEY-----"),
    ("private_key", "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC"),  # truncated
]


@pytest.mark.parametrize("kind,text", POSITIVES)
def test_true_positives(kind, text):
    assert [f.kind for f in find_pii(text)] == [kind]


def test_private_key_covers_whole_block():
    text = ("key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn 4111111111111111\n-----END OPENSSH PRIVATE KEY-----"
            "\nafter")
    (finding,) = find_pii(text)
    assert text[finding.end:] == "\nafter"


def test_luhn_invalid_card_is_not_flagged():
    assert find_pii("order 4111111111111112 shipped") == []
    assert find_pii("ISBN 978-0-306-40615-7 and 9780306406158") == []


NEGATIVES = [
    '"""Requires Python 3.11.7 or newer; tested on 3.12.0."""',
    "released on 2026-11-23 at 14:05:59.123",
    "MASK = 0x7fffffff  # 2**31 - 1",
    "pi = 3.141592653589793\nfloat('1e-10')",
    "ssh deploy@buildhost and git@github",
    "url = 'http://localhost:8080/api/v1'",
    "arr[::2] + arr[1::3] + x[a::b]",
    "std::vector<int> v; Foo::bar(); a::b",
    "@pytest.mark.parametrize('x', [1, 2, 3])",
    "ts = 1700000000000  # ms since epoch",
    "def f(self, n=1024, lr=5e-5, eps=1e-8): return n * 0.5",
    "mac = '00:1a:2b:3c:4d:5e'; time = '12:30:45'",
    "version = '1.2.3'; uuid = '123e4567-e89b-12d3-a456-426614174000'",
    "api_key = os.environ['API_KEY']  # your_api_key_here_please",
    "sha = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
    "seq = '1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16'",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_true_negatives(text):
    assert find_pii(text) == []


def test_redact_output_and_counts():
    text = "Mail a@example.com or b@example.org, call 555-123-4567, card 4111 1111 1111 1111."
    out, counts = redact(text)
    assert out == "Mail [EMAIL] or [EMAIL], call [PHONE], card [PAYMENT_CARD]."
    assert counts == {"email": 2, "phone": 1, "payment_card": 1}


def test_findings_carry_no_value():
    (finding,) = find_pii("x a@example.com")
    assert tuple(finding) == ("email", 2, 15)


def test_redact_is_idempotent():
    text = " ".join(t for _, t in POSITIVES)
    once, counts = redact(text)
    twice, again = redact(once)
    assert twice == once and not again
    assert sum(counts.values()) == len(POSITIVES)


def test_kinds_and_placeholders():
    assert set(PLACEHOLDERS) == set(PII_KINDS) == set(VALIDATION_PATTERNS)


@pytest.mark.parametrize("kind,text", [p for p in POSITIVES if not (p[0] == "ip_address" and ":" in p[1].split()[1])])
def test_validation_patterns_match_raw_pii(kind, text):
    assert re.search(VALIDATION_PATTERNS[kind], text)


def test_validation_patterns_do_not_match_redacted_text():
    redacted, _ = redact("\n".join(t for _, t in POSITIVES))
    for kind, pattern in VALIDATION_PATTERNS.items():
        assert not re.search(pattern, redacted), kind
    for placeholder in PLACEHOLDERS.values():
        assert not any(re.search(p, placeholder) for p in VALIDATION_PATTERNS.values())
