"""Validation of the public kernel API's inputs, in one place (pure torch, no Triton)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .dispatch import MAX_ROWS
from .formats import get_format

ACT_DTYPES = (torch.bfloat16, torch.float16)


def rows_of(x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, int]:
    """(x as a contiguous (M, K) matrix, M) for x of shape (M, K) or (..., K).

    Raises:
        ValueError: not a tensor, 0-d, K = 0, dtype not bf16/fp16, no rows or more than
            the kernels take (16).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape (M, K) (or (..., K)), got a 0-d tensor")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name}.dtype must be torch.bfloat16 or torch.float16, got {x.dtype}")
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"{name} has K = 0 input channels")
    m = x.numel() // K if x.numel() else 0
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(
            f"the sparse GEMV kernels take 1 to {MAX_ROWS} rows per call (decode tokens): {name} "
            f"has shape {tuple(x.shape)} ({m} rows); use the torch path (mask, then matmul) for "
            f"more rows")
    return x.reshape(m, K).contiguous(), m


def check_device(x: torch.Tensor, interpreted: bool, *tensors: tuple) -> None:
    """Every (name, tensor) is on x's device, and that device can run the kernels
    (`interpreted`: the CPU runs them through Triton's interpreter and the policy allows it).

    Raises:
        ValueError: a device mismatch, or a CPU tensor without the Triton interpreter.
    """
    for name, t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(f"device mismatch: {name} is on {t.device} but x is on {x.device}")
    if x.device.type == "cpu" and not interpreted:
        raise ValueError("the sparse GEMV kernels run on CUDA; on CPU only through the Triton "
                         "interpreter (TRITON_INTERPRET=1 set before importing triton) under a "
                         "KernelPolicy(interpreter=True). Check kernels_available(device) first.")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the sparse GEMV kernels run on CUDA, not {x.device.type}")


def check_weight(weight: torch.Tensor, scales: Optional[torch.Tensor], wformat: str, K: int,
                 dtype: torch.dtype) -> int:
    """Validate the weight in its format; return N. Raises ValueError (see WeightFormat)."""
    return get_format(wformat).check(weight, scales, K, dtype)


def thresholds_rows(t: torch.Tensor, K: int, n_rows: int, name: str = "thresholds") -> torch.Tensor:
    """Thresholds as (n_rows,) (one per row) or (n_rows, K) (per input channel), float32.

    With n_rows == 1 a 0-d tensor or a (K,) vector is accepted too (one projection).

    Raises:
        ValueError: not a float32 tensor, or another shape.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a float32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name}.dtype must be torch.float32, got {t.dtype}")
    shape = tuple(t.shape)
    if n_rows == 1 and shape in ((), (K,)):
        return t.reshape(1, *shape)
    if shape not in ((n_rows,), (n_rows, K)):
        extra = f", () or ({K},)" if n_rows == 1 else ""
        raise ValueError(f"{name} must have shape ({n_rows},) or ({n_rows}, {K}){extra} "
                         f"(scalar or per-input-channel), got {shape}")
    return t


def segment_sizes(segments: Optional[Sequence[int]], N: int) -> list:
    """Sizes of the column segments given by their exclusive END offsets, e.g.
    (Nq, Nq + Nk, N_total); None: one segment.

    Raises:
        ValueError: not 1 to 4 strictly increasing positive ints ending at N.
    """
    if segments is None:
        return [N]
    try:
        bounds = [int(s) for s in segments]
    except TypeError:
        raise ValueError(f"segments must be a sequence of ints (segment end offsets), got {segments!r}") from None
    if not 1 <= len(bounds) <= 4:
        raise ValueError(f"segments: 1 to 4 segments are supported, got {len(bounds)}")
    prev, sizes = 0, []
    for b in bounds:
        if b <= prev:
            raise ValueError(f"segments must be strictly increasing positive END offsets "
                             f"(e.g. (Nq, Nq+Nk, N_total)); got {bounds}")
        sizes.append(b - prev)
        prev = b
    if prev != N:
        hint = " (looks like sizes: pass the cumulative end offsets instead)" if sum(bounds) == N else ""
        raise ValueError(f"segments' last end offset must equal wt.shape[1] = {N}; got {bounds}{hint}")
    return sizes


def check_sparsity(s: float) -> float:
    """The calibrated sparsity hint in [0, 1) (as everywhere). Raises ValueError otherwise."""
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {s}")
    return s


def check_sizes(sizes: list, wformat: str) -> list:
    """Segment widths valid for the weight format (int4: even, two columns share a byte).

    Raises:
        ValueError: an odd segment width under an int4 format.
    """
    if get_format(wformat).wfmt == 2 and any(n % 2 for n in sizes):
        raise ValueError(f"int4 weights pack two output columns per byte: every segment width "
                         f"must be even, got {list(sizes)}")
    return sizes
