"""Auditing the record: `python -m ftpipe.audit provenance|reproduce|upload-pending`."""
