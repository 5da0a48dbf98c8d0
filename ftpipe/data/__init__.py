"""Data helpers of the data stages: readers of your files and the built-in stdlib source (ingest); record
formats, normalization and rejection rules, PII, near-duplicates (clean); expectations, Data Docs and the
gate's failure report (validate); chat tokens and packing (tokenize); reading tokenized splits (later stages)."""
