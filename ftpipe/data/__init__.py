"""Data helpers: PII detection and redaction, near-duplicates, reading tokenized splits."""
