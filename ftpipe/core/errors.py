"""One error type for everything a user can fix, and the wrapper every stage's main() runs in."""
import sys
import traceback
from typing import Callable


class PipelineError(Exception):
    """A problem the user can fix: the message names the file, the row or key, and what to do."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError prints one clear message (no traceback) and exits 2."""
    try:
        main()
    except PipelineError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: no output was published (outputs are written atomically)", file=sys.stderr)
        sys.exit(130)
    except Exception:  # noqa: BLE001 - an unexpected failure is a bug: show everything
        traceback.print_exc()
        sys.exit(1)
