"""`python -m ftpipe.serve`: see ftpipe/serve/__init__.py (why) and ftpipe/serve/cli.py (options)."""
import ftpipe  # noqa: F401 - offline, telemetry-free environment before any model library is imported
from ftpipe.serve.cli import exit_now, main

exit_now(main())   # not sys.exit: see exit_now
