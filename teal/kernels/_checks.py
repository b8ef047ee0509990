"""Layout / dtype / device validation shared by the public API (pure torch, no Triton)."""

from __future__ import annotations

from typing import Sequence

import torch

_ACT_DTYPES = (torch.bfloat16, torch.float16)


def flatten_x(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """(K,) or (1, ..., 1, K) -> (K,) contiguous; batch > 1 raises ValueError."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape (K,) or (1, ..., 1, K), got a 0-d tensor")
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"{name}.dtype must be torch.bfloat16 or torch.float16, got {x.dtype}")
    lead = 1
    for d in x.shape[:-1]:
        lead *= d
    if lead != 1:
        raise ValueError(
            f"sparse GEMV kernels handle one token: {name} must have shape (K,) or (1, ..., 1, K), "
            f"got {tuple(x.shape)} (batch {lead}); use a dense masked matmul for batch > 1"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has K = 0 input channels")
    return x.reshape(x.shape[-1]).contiguous()


def check_wt(x: torch.Tensor, wt: torch.Tensor) -> None:
    if not isinstance(wt, torch.Tensor):
        raise ValueError(f"wt must be a torch.Tensor, got {type(wt).__name__}")
    if wt.dim() != 2:
        raise ValueError(f"wt must be 2-D (K, N) = W.t() (input-channel major), got shape {tuple(wt.shape)}")
    if wt.dtype != x.dtype:
        raise ValueError(f"wt.dtype ({wt.dtype}) must equal x.dtype ({x.dtype})")
    if wt.device != x.device:
        raise ValueError(f"device mismatch: wt is on {wt.device} but x is on {x.device}")
    K, N = wt.shape
    if K != x.shape[0]:
        raise ValueError(
            f"K mismatch: x has {x.shape[0]} input channels but wt has shape {tuple(wt.shape)} "
            f"(expected (K, N) = W.t(), i.e. wt.shape[0] == x.shape[-1])"
        )
    if N == 0:
        raise ValueError("wt has N = 0 output columns")
    if not wt.is_contiguous():
        raise ValueError(
            f"wt must be contiguous (K, N) row-major (= W.t().contiguous()); got strides {wt.stride()} "
            f"for shape {tuple(wt.shape)}"
        )


def check_thresholds(t: torch.Tensor, x: torch.Tensor, n_rows: int | None, what: str) -> None:
    """n_rows None: t must be () or (K,); else (n_rows,) or (n_rows, K)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a float32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{what}.dtype must be torch.float32, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"device mismatch: {what} is on {t.device} but x is on {x.device}")
    K = x.shape[0]
    shape = tuple(t.shape)
    if n_rows is None:
        ok = shape in ((), (K,))
        want = f"() or ({K},)"
    else:
        ok = shape in ((n_rows,), (n_rows, K))
        want = f"({n_rows},) or ({n_rows}, {K})"
    if not ok:
        raise ValueError(f"{what} must have shape {want} (scalar or per-input-channel), got {shape}")


def check_segments(segments: Sequence[int], N: int) -> list[int]:
    """segments = exclusive END offsets of the column blocks, e.g. (Nq, Nq + Nk, N_total).

    Strictly increasing, first > 0, last == N_total.  Returns the block sizes.
    """
    try:
        bounds = [int(s) for s in segments]
    except TypeError:
        raise ValueError(f"segments must be a sequence of ints (segment end offsets), got {segments!r}") from None
    if not 1 <= len(bounds) <= 4:
        raise ValueError(f"segments: 1 to 4 segments are supported, got {len(bounds)}")
    prev = 0
    sizes = []
    for b in bounds:
        if b <= prev:
            raise ValueError(
                f"segments must be strictly increasing positive END offsets (e.g. (Nq, Nq+Nk, N_total)); got {bounds}"
            )
        sizes.append(b - prev)
        prev = b
    if prev != N:
        hint = " (looks like sizes: pass the cumulative end offsets instead)" if sum(bounds) == N else ""
        raise ValueError(f"segments' last end offset must equal wt.shape[1] = {N}; got {bounds}{hint}")
    return sizes
