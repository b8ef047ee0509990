"""TEAL decode on the CPU: read only the weight rows of kept input channels.

TEAL (arXiv 2408.14690, Section 4, Eq. 2-3) keeps input channel k iff ``|x_k| > t``; with the
input-channel-major weight ``wt = W.t()`` of shape (K, N), ``y = sum over kept k of x_k wt[k]``
reads only the kept rows.  Two implementations:

- "compiled": a small C++ kernel (`cpu_gemv.cpp`, built on first use with
  `torch.utils.cpp_extension.load_inline`, cached by torch in its extensions folder): one
  pass over x builds the kept lists, then each thread sums the kept rows of its column chunk
  in fp32 and rounds once.  Up to 8 rows (tokens) share one pass over the weight, each row
  with its own mask, so it also serves a short prefill.
- "gather": pure torch, one token only: the kept indices, then ``F.embedding_bag`` with the
  kept x entries as per-sample weights (a weighted sum of the kept rows that never
  materialises them).  Used when the C++ kernel cannot be built.

Both are exact up to the order of the fp32 sum: they equal the masked reference
(`teal.kernels.reference.sparse_gemv_ref`) within the activation dtype's rounding.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import sparse_gemv_ref

__all__ = ["CPU_IMPLS", "compiled_kernel", "cpu_sparse_gemm"]

CPU_IMPLS = ("compiled", "gather")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE = Path(__file__).with_name("cpu_gemv.cpp")


@functools.lru_cache(maxsize=None)
def compiled_kernel(verbose: bool = False):
    """The built C++ extension (its `sparse_gemm`), or None when it cannot be built (no C++
    compiler or ninja; one warning says why and that the "gather" path runs instead).

    The first call compiles it (about a minute on two cores); later processes load torch's
    cached build."""
    try:
        from torch.utils.cpp_extension import load_inline
        return load_inline(name="teal_cpu_sparse_gemm", cpp_sources=[_SOURCE.read_text()],
                           functions=["sparse_gemm"], extra_cflags=["-O3", "-march=native"],
                           verbose=verbose)
    except Exception as e:  # compiler, ninja or headers missing: the torch path still works
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        warnings.warn(f"teal: the CPU decode kernel could not be built ({reason}); using the "
                      f"torch gather path (install a C++ compiler and ninja for the faster one)",
                      RuntimeWarning, stacklevel=2)
        return None


def _check(x: Tensor, wt: Tensor, thresholds: Tensor, ends: Sequence[int], gated: bool) -> None:
    if x.device.type != "cpu" or wt.device.type != "cpu":
        raise ValueError("cpu_sparse_gemm: x and wt must be CPU tensors")
    if x.dtype not in _DTYPES or wt.dtype != x.dtype:
        raise ValueError(f"cpu_sparse_gemm: x and wt need one dtype of float32/bfloat16/float16, "
                         f"got {x.dtype} and {wt.dtype}")
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"cpu_sparse_gemm: x (M, K) and wt (K, N) expected, got "
                         f"{tuple(x.shape)} and {tuple(wt.shape)}")
    S, N = len(ends), wt.shape[1]
    if S < 1 or list(ends) != sorted(ends) or ends[-1] != N or ends[0] < 1 or len(set(ends)) != S:
        raise ValueError(f"cpu_sparse_gemm: ends must rise strictly to N={N}, got {list(ends)}")
    if gated and (S != 2 or 2 * ends[0] != N):
        raise ValueError(f"cpu_sparse_gemm: gated needs ends [F, 2F], got {list(ends)}")
    if thresholds.dtype != torch.float32 or thresholds.shape not in ((S,), (S, x.shape[1])):
        raise ValueError(f"cpu_sparse_gemm: thresholds must be float32 ({S},) or ({S}, "
                         f"{x.shape[1]}), got {thresholds.dtype} {tuple(thresholds.shape)}")


def _gather(x: Tensor, wt: Tensor, thresholds: Tensor, ends: Sequence[int], gated: bool,
            dense: bool) -> Tensor:
    """The pure-torch path, one row: a weighted embedding bag over each projection's kept rows."""
    x0, ax = x[0], x[0].float().abs()
    offsets = torch.zeros(1, dtype=torch.long)
    parts, a = [], 0
    for s, b in enumerate(ends):
        if dense:
            idx = torch.arange(x0.numel())
        else:
            idx = (ax > thresholds[s]).nonzero().squeeze(1)
        parts.append(F.embedding_bag(idx, wt[:, a:b], offsets, mode="sum",
                                     per_sample_weights=x0.index_select(0, idx)).to(x.dtype))
        a = b
    if gated:
        return F.silu(parts[0]) * parts[1]
    return torch.cat(parts, dim=-1)


def _chunk(n_cols: int) -> int:
    """Columns per task: the columns split evenly over the threads (whole 16-column vectors,
    at least 64), so every thread streams its share of each kept row."""
    per = -(-n_cols // max(1, torch.get_num_threads()))
    return max(64, -(-per // 16) * 16)


def cpu_sparse_gemm(x: Tensor, wt: Tensor, thresholds: Tensor, ends: Sequence[int], *,
                    gated: bool = False, dense: bool = False, impl: str = "compiled") -> Tensor:
    """The TEAL-masked product of x and the input-channel-major weight, on the CPU.

    Args:
        x: (M, K) activations, float32 / bfloat16 / float16.
        wt: (K, N) weight, input-channel major (``W.t()``), x's dtype; contiguous or not (a
            non-contiguous one is copied: keep it contiguous).
        thresholds: float32 (S,) (one per projection) or (S, K) (per input channel). Channel k
            of row m is kept for projection s iff ``|x[m, k]| > t_s`` in fp32.
        ends: the S projections' end columns (rising to N); gated: ``[F, 2F]``.
        gated: SwiGLU output ``silu(gate) * up``, (M, F).
        dense: keep every channel (thresholds unused).
        impl: "compiled" (the C++ kernel; "gather" where it cannot be built) or "gather" (pure
            torch; M = 1 only).

    Returns:
        (M, N) (gated: (M, F)) in x's dtype, fp32-accumulated.

    Raises:
        ValueError: a device, dtype, shape, `ends` or `impl` the kernel does not take.
    """
    if impl not in CPU_IMPLS:
        raise ValueError(f"cpu_sparse_gemm: impl must be one of {CPU_IMPLS}, got {impl!r}")
    ends = [int(e) for e in ends]
    _check(x, wt, thresholds, ends, gated)
    if impl == "gather" and x.shape[0] != 1:
        raise ValueError(f"cpu_sparse_gemm: the gather path takes one row, got {x.shape[0]}")
    return _sparse_gemm_op(x, wt, thresholds, ends, gated, dense, impl)


@torch.library.custom_op("teal::cpu_sparse_gemm", mutates_args=())
def _sparse_gemm_op(x: Tensor, wt: Tensor, thresholds: Tensor, ends: list[int], gated: bool,
                    dense: bool, impl: str) -> Tensor:
    """The checked call as one opaque op, so `torch.compile` of a CPU decode step keeps it
    whole (the C++ extension is built or loaded here, at run time, never while tracing)."""
    ext = compiled_kernel() if impl == "compiled" else None
    if ext is not None:
        return ext.sparse_gemm(x.contiguous(), wt.contiguous(), thresholds.contiguous(), ends,
                               gated, dense, _chunk(ends[0] if gated else wt.shape[1]))
    if x.shape[0] == 1:
        return _gather(x, wt, thresholds, ends, gated, dense)
    # not built, several rows: the masked reference in x's dtype (every weight row read)
    y = sparse_gemv_ref(x, wt, thresholds if not dense else torch.full_like(thresholds, -1.0),
                        ends, dtype=x.dtype)
    if gated:
        return F.silu(y[:, :ends[0]]) * y[:, ends[0]:]
    return y


@_sparse_gemm_op.register_fake
def _(x, wt, thresholds, ends, gated, dense, impl):
    return x.new_empty(x.shape[0], ends[0] if gated else wt.shape[1])
