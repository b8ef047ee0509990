"""Shared CLI pieces: known errors become one line on stderr, never a traceback; the `--help`
formatter every CLI uses (each default shown once); UTF-8 checks of text read from the command
line, stdin and files."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional


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


# ----------------------------------------------------------------------------- --help
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` with every flag's default shown exactly once.

    A flag's help that already says its default (the word "default", e.g. "(default: next to
    the checkpoint)") is left as written; a flag without a value (store_true / store_false)
    gets "(default: off)" (the flag is not given); every other optional flag gets
    "(default: <value>)", lists space-separated. Required flags and positionals get none.
    The description and epilog are printed as written (module docstrings with examples).
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
            return text
        if action.nargs == 0:
            return f"{text} (default: off)".strip()
        value = action.default
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value) if value else "none"
        elif value is None:
            value = "none"
        return f"{text} (default: {str(value).replace('%', '%%')})".strip()


# ----------------------------------------------------------------------------- text input
class TextInputError(ValueError):
    """Text from the command line, stdin or a file that is not valid UTF-8."""


def _bad_byte(text: str) -> Optional[tuple[int, str]]:
    """(character index, byte) of the first byte Python could not decode as UTF-8 and kept
    as a lone surrogate (surrogateescape: command-line arguments, a POSIX-locale stdin)."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            b = ord(ch) - 0xDC00
            return i, (f"0x{b:02x}" if 0x80 <= b <= 0xFF else f"U+{ord(ch):04X}")
    return None


def check_utf8(text: str, source: str) -> str:
    """`text` unchanged if it is valid UTF-8 text; else TextInputError naming `source` (e.g.
    "--prompt") and the first bad byte, one line."""
    bad = _bad_byte(text)
    if bad is not None:
        raise TextInputError(f"{source} is not valid UTF-8 text (byte {bad[1]} at character "
                             f"{bad[0]}); pass UTF-8 text")
    return text


def decode_utf8(data: bytes, source: str) -> str:
    """`data` decoded as UTF-8 (a leading byte-order mark dropped); TextInputError naming
    `source` and the offset of the first bad byte otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TextInputError(f"{source} is not valid UTF-8 text (byte 0x{data[e.start]:02x} at "
                             f"offset {e.start}); pass UTF-8 text") from None


def read_line(stream, source: str = "stdin") -> Optional[str]:
    """One line from a text stream (its newline removed), None at end of input.

    Reads the stream's bytes when it has them (`sys.stdin.buffer`), so an invalid byte is a
    TextInputError whatever the locale's decoding would have done; a stream without bytes
    (a StringIO) is checked for undecodable bytes kept as surrogates."""
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        data = buf.readline()
        if not data:
            return None
        return decode_utf8(data, source).rstrip("\r\n")
    try:
        line = stream.readline()
    except UnicodeDecodeError as e:
        raise TextInputError(f"{source} is not valid UTF-8 text (byte "
                             f"0x{e.object[e.start]:02x} at offset {e.start}); pass UTF-8 "
                             f"text") from None
    if not line:
        return None
    return check_utf8(line.rstrip("\r\n"), source)


def sparsity_type(value: str) -> float:
    """argparse type of a model-level target sparsity: a number in [0, 1)."""
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number, got {value!r}") from None
    if not 0.0 <= s < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {value}")
    return s


def add_sweep_arguments(p: argparse.ArgumentParser, sparsity_default: list,
                        sparsity_help: str, calib_text_default) -> None:
    """The sparsity configurations a sweep evaluates (perplexity.py, evaluate_generation.py):
    --sparsity, --allocation, --scoring, --calibration (with --calib_text, --calib_tokens),
    --thresholds, --greedy and --tuned; `teal.allocation.sweep_configurations` expands them."""
    from pathlib import Path
    from teal.allocation import ALLOCATIONS, CALIBRATIONS, SCORINGS
    p.add_argument("--sparsity", type=sparsity_type, nargs="+", default=sparsity_default,
                   help=sparsity_help)
    p.add_argument("--allocation", nargs="+", choices=ALLOCATIONS, default=["uniform"],
                   help="allocations to evaluate: uniform sparsity, TEAL's block-wise greedy "
                        "per-projection one (greedy.json), or per-block budgets tuned end to end "
                        "(tuned.json)")
    p.add_argument("--scoring", nargs="+", choices=SCORINGS, default=["magnitude"],
                   help="scorings to evaluate: |x| (TEAL) or |x|*||W[:,i]|| (weight-informed)")
    p.add_argument("--calibration", nargs="+", choices=CALIBRATIONS, default=["dense"],
                   help="dense: thresholds from the dense model's histograms (TEAL); sequential: "
                        "re-derived in forward order on the sparsified model's own activations "
                        "over --calib_tokens of --calib_text (teal.allocation.calibrate_sequentially)")
    p.add_argument("--calib_text", type=Path, default=calib_text_default,
                   help="calibration text for --calibration sequential (never the evaluation text)")
    p.add_argument("--calib_tokens", type=int, default=8192,
                   help="calibration tokens for --calibration sequential")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="calibration file (default: thresholds.safetensors next to the checkpoint; "
                        "a quantized one's thresholds.<format>.safetensors when present)")
    p.add_argument("--greedy", type=Path, default=None,
                   help="greedy allocation file (default: greedy.json next to the thresholds)")
    p.add_argument("--tuned", type=Path, default=None,
                   help="tuned allocation file (default: tuned.json next to the thresholds)")
