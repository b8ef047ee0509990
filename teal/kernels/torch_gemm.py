"""Algorithm "torch": the sparse product as one masked cuBLAS GEMM (no Triton).

Where a shape is so small that every sparse kernel loses to cuBLAS (launch- and
latency-bound: the default model's q/k/v and gate/up on an H200), skipping weight rows
cannot pay, and the dispatch table sends the call here: each segment's input is masked
with its own threshold, the S masked copies of x are stacked as S x M rows, one GEMM
multiplies them by the whole weight, and segment s keeps its own columns of its own rows.
The result is the same masked product (Eq. 2-3 of TEAL) the kernels compute; it reads
every weight row.  Plain torch ops, so a compiled decode step fuses the masks into the
kernel that produces x (the RMSNorm) and the column picks into the one that consumes y.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["masked_gemm", "masked_rows"]


def masked_rows(x: torch.Tensor, thresholds: torch.Tensor, n_segments: int) -> torch.Tensor:
    """The S masked copies of x stacked segment-major: row s * M + m is
    ``x[m] * [|x[m]| > t_s]`` (|x| compared in fp32, as the kernels do).

    x: (M, K); thresholds: float32 (S,) or (S, K).  Returns (S * M, K) in x's dtype.
    """
    t = thresholds.reshape(n_segments, 1, -1)           # (S, 1, 1) or (S, 1, K)
    keep = x.float().abs().unsqueeze(0) > t             # (S, M, K)
    return (x.unsqueeze(0) * keep).reshape(n_segments * x.shape[0], -1)


def masked_gemm(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                sizes: Sequence[int], gated: bool) -> torch.Tensor:
    """``y_s = (x * [|x| > t_s]) @ wt[:, segment s]`` for every segment, as one GEMM.

    Args:
        x: (M, K) activation, bf16 / fp16 (any float dtype works).
        wt: (K, N) input-channel-major weight (W.t()), x's dtype.
        thresholds: float32 (S,) or (S, K), one row per segment (gated: gate, up); |x| is
            compared in fp32, as the kernels do.
        sizes: the S segment widths, summing to N (gated: (F, F)).
        gated: gate/up with the SwiGLU epilogue ``silu(g) * u`` (computed in fp32).
    Returns:
        (M, N) (gated: (M, F)) in x's dtype.
    """
    S, M = len(sizes), x.shape[0]
    y = masked_rows(x, thresholds, S) @ wt              # (S * M, N): one GEMM, W read once
    if S == 1:
        return y
    parts, a = [], 0
    for s, n in enumerate(sizes):
        parts.append(y[s * M:(s + 1) * M, a:a + n])
        a += n
    if gated:
        g, u = parts
        return (F.silu(g.float()) * u.float()).to(x.dtype)
    return torch.cat(parts, dim=-1)
