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


def check_device(device: str) -> None:
    """Raise ValueError (one line naming the fix) unless `device` names a usable CPU or CUDA
    device: a known type, CUDA visible for "cuda", and an index below the GPU count."""
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device} is not supported; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) "
                         f"visible; use --device cuda")
