"""Where a measurement came from: software versions, GPU and the commit of the code measured.

Benchmarks record `environment(...)` with every result (BENCHMARKS.md cites it).
"""
from __future__ import annotations

import importlib.util
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

__all__ = ["code_commit", "environment"]


def code_commit(repo_dir, override: Optional[str] = None) -> str:
    """`override` if given (e.g. a copy of the tree on a remote machine whose git metadata is
    stale), else `git rev-parse --short HEAD` of the repository holding `repo_dir`, plus
    "+dirty" for uncommitted changes (untracked, non-ignored files included), else "unknown"."""
    if override:
        return override
    try:
        run = dict(text=True, capture_output=True, check=True)
        head = subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo_dir), "status", "--porcelain"], **run).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment(repo_dir=Path(__file__).resolve().parent, commit: Optional[str] = None) -> dict:
    """{torch, python, triton (if installed), gpu (if CUDA), commit} of this process."""
    env = dict(torch=torch.__version__, python=platform.python_version())
    if importlib.util.find_spec("triton"):
        import triton
        env["triton"] = triton.__version__
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    env["commit"] = code_commit(repo_dir, commit)
    return env
