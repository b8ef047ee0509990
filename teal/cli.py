"""Shared CLI error handling: known errors become one line on stderr, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable


def run_reporting_errors(body: Callable[[], object], errors: tuple,
                         interrupted: str = "interrupted; nothing written") -> int:
    """Call `body()` and return a process exit status.

    An exception of a type in `errors` (whose message names the fix) prints `error: <message>`
    on stderr and returns 1; Ctrl-C prints `interrupted` and returns 130; otherwise 0. Our
    writers are atomic (temp file + rename), so an interrupted run leaves no partial output.
    """
    message, status = None, 0
    try:
        body()
    except errors as e:
        message, status = f"error: {e}", 1
    except KeyboardInterrupt:
        message, status = interrupted, 130
    # printed after the except block: the failed call's frames (and any progress bar they
    # hold) are released first, so the message is the last line on stderr
    if message is not None:
        print(message, file=sys.stderr)
    return status
