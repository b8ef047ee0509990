"""Atomic file writes: a temp file in the destination's folder, then `os.replace`.

Every output of the project (checkpoints, tokenizer files, thresholds, allocations, exports)
goes through `atomic_write`, so a reader never sees a half-written file: the destination
either keeps its old content or gets the complete new one, and an interrupted or failing
write leaves no temp file behind. The final file gets the mode a plain `open()` would give
it (0o666 minus the umask), whatever mode the writer used (safetensors writes 0600).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_torch_save", "atomic_copy_stream"]

PathLike = Union[str, "os.PathLike[str]"]


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create an empty, uniquely named temp file next to `path`; return it and its mode.

    The file is created like `open(..., "w")` creates one (0o666, the kernel applies the
    umask), so its mode is the one a plain open() of `path` would give.
    """
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"cannot create a temp file next to {path}")


def atomic_write(path: PathLike, write_fn: Callable[[Path], Any],
                 make_parents: bool = False) -> Path:
    """Write `path` atomically: `write_fn(tmp)` writes a temp file, which then replaces `path`.

    Args:
        path: the destination file; an existing file is replaced only once `write_fn` has
            returned.
        write_fn: called with the temp file's `Path` (an existing empty file in the same
            folder as `path`); it may write it in place or recreate it.
        make_parents: create missing parent folders of `path` first.

    Returns:
        `path` as a `Path`.

    Raises:
        OSError: the folder does not exist (without `make_parents`) or is not writable, or
            the rename failed.
        Whatever `write_fn` raises (including KeyboardInterrupt): the temp file is removed
            and `path` is left as it was.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(path)
    try:
        write_fn(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes, make_parents: bool = False) -> Path:
    """Write the bytes `data` (bytes, bytearray or memoryview) to `path` atomically.

    Raises:
        TypeError: `data` is a str (use `atomic_write_text`).
        OSError: as `atomic_write`.
    """
    if isinstance(data, str):
        raise TypeError("atomic_write_bytes needs bytes; use atomic_write_text for a str")
    payload = bytes(data)
    return atomic_write(path, lambda tmp: tmp.write_bytes(payload), make_parents)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8",
                      make_parents: bool = False) -> Path:
    """Write the str `text` to `path` atomically, encoded with `encoding` (default UTF-8).

    Raises:
        UnicodeEncodeError: `text` cannot be encoded (nothing is written).
        OSError: as `atomic_write`.
    """
    return atomic_write_bytes(path, text.encode(encoding), make_parents)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 1,
                      make_parents: bool = False) -> Path:
    """Write `obj` as JSON (`json.dumps(obj, indent=indent)`, UTF-8) to `path` atomically.

    Raises:
        TypeError, ValueError: `obj` is not JSON-serialisable (nothing is written).
        OSError: as `atomic_write`.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent), make_parents=make_parents)


def atomic_torch_save(obj: Any, path: PathLike, make_parents: bool = False) -> Path:
    """`torch.save(obj, ...)` to `path` atomically.

    torch.save gets an open file, not the temp file's (random) name, which it would record
    inside the archive: the same `obj` gives the same bytes on every run.

    Raises:
        OSError: as `atomic_write`; whatever torch.save raises (e.g. pickling errors).
    """
    import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, save, make_parents)


def atomic_copy_stream(src: BinaryIO, path: PathLike, make_parents: bool = False) -> Path:
    """Copy the readable binary stream `src` (e.g. a zip member) to `path` atomically.

    Raises:
        OSError: as `atomic_write`, or reading `src` failed.
    """
    def copy(tmp: Path) -> None:
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return atomic_write(path, copy, make_parents)
