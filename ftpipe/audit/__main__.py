"""`python -m ftpipe.audit`: see ftpipe/audit/cli.py."""
from ftpipe.audit.cli import main
from ftpipe.core.errors import run_stage

run_stage(main)
