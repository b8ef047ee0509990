"""Up-front checks of output locations, so a CLI fails in one line before any expensive work."""
from __future__ import annotations

import os
from pathlib import Path


class OutputPathError(ValueError):
    """An output file/folder that cannot be written (its message names the fix)."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path, flag: str = "--output", create_parent: bool = False) -> None:
    """Raise OutputPathError unless `path` can be written as a file.

    The path must not be a directory; its parent must be an existing, writable folder (with
    `create_parent`, a missing parent is fine if it can be created).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; pass a file path")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"{flag} {path}: {parent} is a file, not a folder; "
                              f"choose another location")
    if not parent.exists():
        if not create_parent:
            raise OutputPathError(f"{flag} {path}: folder {parent} does not exist; "
                                  f"create it first or choose another location")
        check_output_dir(parent, flag)
        return
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: folder {parent} is not writable; "
                              f"choose another location")
    from teal.io import WriteError, probe_writable
    try:
        probe_writable(path)
    except WriteError as e:
        raise OutputPathError(f"{flag} {e}; choose another location") from None


def check_output_dir(path, flag: str = "--out-dir") -> None:
    """Raise OutputPathError unless `path` is (or can be created as) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file, not a folder; choose another location")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputPathError(f"{flag} {path}: {base} is a file, not a folder; "
                              f"choose another location")
    if not os.access(base, os.W_OK | os.X_OK):
        what = "folder" if base == path else f"{path} cannot be created: folder"
        raise OutputPathError(f"{flag} {what} {base} is not writable; choose another location")
