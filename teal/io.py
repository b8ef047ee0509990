"""Atomic file writes: a temp file in the destination's folder, then `os.replace`.

Every output of the project (checkpoints, tokenizer files, thresholds, allocations, exports)
goes through `atomic_write`, so a reader never sees a half-written file: the destination
either keeps its old content or gets the complete new one, and an interrupted or failing
write leaves no temp file behind. The final file gets the mode a plain `open()` would give
it (0o666 minus the umask), whatever mode the writer used (safetensors writes 0600).

Failures: whatever the underlying library raises while writing (torch's zip writer's
RuntimeError, safetensors' SafetensorError, ENOSPC on a full disk, a directory in the way of
the destination, ...) becomes one `WriteError` (an OSError) whose one-line message names the
destination and the cause.

Temp files are named `.<name>.<pid>-<random>.tmp` in the destination's folder (O_EXCL: two
writers never share one). A write first removes the temps that earlier runs left for the
same destination (their process is gone: killed with SIGKILL, a power cut), including those
of the naming schemes of earlier versions, which record no pid (`<name>.tmp` and
`.<name>.<8 hex>.tmp`; removed once untouched for `OLD_TEMP_MIN_AGE_S`); a SIGTERM
during a write removes the temps in flight before the process ends as the signal asks (the
handler is installed in the main thread on the first write and passes the signal on to the
handler that was there before).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_torch_save", "atomic_copy_stream", "WriteError", "write_error",
           "check_free_space", "probe_writable", "remove_stale_temps", "OLD_TEMP_MIN_AGE_S"]

PathLike = Union[str, "os.PathLike[str]"]

# Temp files being written by this process (removed by the SIGTERM handler); process state,
# not configuration.
_IN_FLIGHT: set = set()
_HANDLER = {"installed": False, "previous": None}


class WriteError(OSError):
    """An output file could not be written; the message is one line naming path and cause."""


def _cause(e: BaseException) -> str:
    """One line describing why a write failed."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename and
                             not str(e.filename).endswith(".tmp") else "")
    text = " ".join(str(e).split()) or "no details"
    if re.search(r"No space left|StorageFull|os error 28|file write failed", text):
        text = f"disk full? ({text[:160]})"
    return f"{e.__class__.__name__}: {text[:240]}"


def write_error(path, e: BaseException) -> WriteError:
    """The `WriteError` for a failed write of `path` caused by `e`."""
    return WriteError(f"cannot write {path}: {_cause(e)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its files
    return True


# Temp names of earlier versions of this project, which record no pid (so whether their
# writer still runs cannot be told): `<name>.tmp` (the writers before teal.io: greedy
# allocations, perplexity/calibrate/bench JSON, prepare's GGUF extraction, the HF export's
# model.safetensors) and `.<name>.<8 hex>.tmp` (teal.io before temps carried the pid). Such a
# file is removed only once it has not been modified for this long (seconds): a writer still
# running an old version keeps touching its temp while it writes.
OLD_TEMP_MIN_AGE_S = 3600.0


def _old_temp_patterns(name: str) -> list:
    n = re.escape(name)
    return [re.compile(rf"{n}\.tmp"), re.compile(rf"\.{n}\.[0-9a-f]{{8}}\.tmp")]  # fullmatch


def remove_stale_temps(path: PathLike, old_min_age_s: float = OLD_TEMP_MIN_AGE_S) -> list[Path]:
    """Remove the stale temp files of `path` from its folder; returns the removed paths.

    Removed: `.<name>.<pid>-<hex>.tmp` whose writing process no longer runs on this machine,
    and regular files named as earlier versions named their temps for `path` (`<name>.tmp`,
    `.<name>.<8 hex>.tmp`) that have not been modified for `old_min_age_s` seconds. Nothing
    else is touched: other names, other destinations' temps, temps of live processes, files
    this process is writing. A file that cannot be removed is left (and not reported).
    """
    path = Path(path)
    removed = []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.tmp$")
    old_patterns = _old_temp_patterns(path.name)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if entry in _IN_FLIGHT:
            continue
        m = pattern.match(entry.name)
        if m:
            stale = not _pid_alive(int(m.group(1)))
        elif any(p.fullmatch(entry.name) for p in old_patterns):
            try:
                st = entry.lstat()
            except OSError:
                continue
            stale = stat.S_ISREG(st.st_mode) and now - st.st_mtime >= old_min_age_s
        else:
            continue
        if stale:
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _on_sigterm(signum, frame):
    for tmp in list(_IN_FLIGHT):
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _IN_FLIGHT.clear()
    previous = _HANDLER["previous"]
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # end as the signal asks
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_cleanup() -> None:
    if _HANDLER["installed"] or threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:  # the process ignores SIGTERM: writes carry on
            _HANDLER["installed"] = True
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # no signals here (embedded interpreter)
        return
    _HANDLER.update(installed=True, previous=previous)


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create an empty, uniquely named temp file next to `path`; return it and its mode.

    The file is created like `open(..., "w")` creates one (0o666, the kernel applies the
    umask), so its mode is the one a plain open() of `path` would give.
    """
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
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


def check_free_space(path: PathLike, nbytes: int, margin: float = 1.05) -> None:
    """Raise WriteError unless the filesystem of `path`'s folder (or its nearest existing
    parent) has room for `nbytes` (times `margin`): call it before long work whose output
    size is known."""
    path = Path(path)
    base = path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    if free < nbytes * margin:
        raise WriteError(f"cannot write {path}: it needs about {nbytes / 1e6:.1f} MB but only "
                         f"{free / 1e6:.1f} MB are free on the disk of {base}; free some space "
                         f"or choose another location")


def probe_writable(path: PathLike) -> None:
    """Create and remove a temp file beside `path` (what `atomic_write` will do first), so a
    folder that cannot take a new file (read-only filesystem, permissions that os.access does
    not see) fails before any long work. Raises WriteError (one line)."""
    path = Path(path)
    try:
        tmp, _ = _create_temp(path)
        tmp.unlink()
    except OSError as e:
        raise write_error(path, e) from None


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
        WriteError (an OSError): the folder does not exist (without `make_parents`) or is not
            writable, a directory is in the way, or `write_fn` or the rename failed for any
            reason (a library's own error type, a full disk): one line naming `path` and the
            cause. The temp file is removed and `path` is left as it was.
        KeyboardInterrupt / SystemExit: re-raised after the temp file is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write {path}: a directory is in the way; remove it or "
                         f"choose another path")
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        _install_sigterm_cleanup()
        tmp, mode = _create_temp(path)
    except OSError as e:
        raise write_error(path, e) from None
    _IN_FLIGHT.add(tmp)
    try:
        write_fn(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except (KeyboardInterrupt, SystemExit):
        tmp.unlink(missing_ok=True)
        raise
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C inside a library's writer
            raise KeyboardInterrupt from None             # (torch's zip writer's __exit__)
        if not isinstance(e, Exception):
            raise
        raise write_error(path, e) from None
    finally:
        _IN_FLIGHT.discard(tmp)
    return path


def atomic_write_bytes(path: PathLike, data: bytes, make_parents: bool = False) -> Path:
    """Write the bytes `data` (bytes, bytearray or memoryview) to `path` atomically.

    Raises:
        TypeError: `data` is a str (use `atomic_write_text`).
        WriteError: as `atomic_write`.
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
        WriteError: as `atomic_write`.
    """
    return atomic_write_bytes(path, text.encode(encoding), make_parents)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 1,
                      make_parents: bool = False) -> Path:
    """Write `obj` as JSON (`json.dumps(obj, indent=indent)`, UTF-8) to `path` atomically.

    Raises:
        TypeError, ValueError: `obj` is not JSON-serialisable (nothing is written).
        WriteError: as `atomic_write`.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent), make_parents=make_parents)


def atomic_torch_save(obj: Any, path: PathLike, make_parents: bool = False) -> Path:
    """`torch.save(obj, ...)` to `path` atomically.

    torch.save gets an open file, not the temp file's (random) name, which it would record
    inside the archive: the same `obj` gives the same bytes on every run.

    Raises:
        WriteError: as `atomic_write` (including whatever torch.save raises).
    """
    import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, save, make_parents)


def atomic_copy_stream(src: BinaryIO, path: PathLike, make_parents: bool = False) -> Path:
    """Copy the readable binary stream `src` (e.g. a zip member) to `path` atomically.

    Raises:
        WriteError: as `atomic_write`, or reading `src` failed.
    """
    def copy(tmp: Path) -> None:
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return atomic_write(path, copy, make_parents)
