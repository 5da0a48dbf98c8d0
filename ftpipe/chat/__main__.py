"""`python -m ftpipe.chat`: see ftpipe/chat/cli.py."""
import sys

import ftpipe  # noqa: F401 - offline, telemetry-free environment before any model library is imported
from ftpipe.chat.cli import main

sys.exit(main())
