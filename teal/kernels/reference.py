"""Plain-PyTorch twins of the fused sparse GEMV kernels.

These compute exactly what the Triton kernels (teal/kernels/masked.py, dot.py, lists.py)
compute, but densely and (by default) in float64, so tests can compare against them.
They need no Triton and run on any device.

Mask (TEAL, arXiv 2408.14690, Section 4, Eq. 2-3): an input channel k is kept iff
``|x_k| > t`` (scalar threshold) or ``|x_k| > t_k`` (per-channel threshold vector, used
for weight-informed scoring).  The sparse product is ``y = W (x * mask)`` with the
weight stored input-channel major: ``wt = W.t()`` of shape (K, N).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "channel_mask",
    "sparse_gemv_ref",
    "sparse_gated_gemv_ref",
    "decode_attention_ref",
]


def channel_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask ``|x| > threshold`` compared in float32, exactly as the kernels do.

    x: (..., K); threshold: float32, () (one threshold) or (K,) (per channel).
    """
    return x.float().abs() > threshold.float()


def _masked_x(x: torch.Tensor, threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = channel_mask(x, threshold)
    return torch.where(m, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def _segment_rows(thresholds: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Thresholds as one row per segment ((S,) or (S, K)); one segment also from () or (K,)."""
    if thresholds.dim() == 0 or (n_segments == 1 and thresholds.dim() == 1
                                 and thresholds.numel() != 1):
        return thresholds.reshape(1, *thresholds.shape)
    return thresholds


def sparse_gemv_ref(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                    segments: Optional[Sequence[int]] = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference for `teal.kernels.sparse_gemv`: every row of x masked on its own.

    x: (..., K); wt: (K, N) (= W.t()); segments: exclusive end offsets of the column blocks
    (None: one block); thresholds: (S,) or (S, K) float32 (one block: also () or (K,)).
    Returns (..., N) in `dtype` (float64 by default): block s is
    ``(x * [|x| > t_s]) @ wt[:, block s]``.
    """
    bounds = list(segments) if segments is not None else [wt.shape[1]]
    t = _segment_rows(thresholds, len(bounds))
    outs, a = [], 0
    for s, b in enumerate(bounds):
        outs.append(_masked_x(x, t[s], dtype) @ wt[:, a:b].to(dtype))
        a = b
    return torch.cat(outs, dim=-1)


def sparse_gated_gemv_ref(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference for `teal.kernels.sparse_gated_gemv`.

    x: (..., K); wt: (K, 2F), gate = columns [0, F), up = [F, 2F); thresholds (2,) or (2, K).
    Returns ``silu(gate) * up`` of shape (..., F) in `dtype`.
    """
    f = wt.shape[1] // 2
    g = _masked_x(x, thresholds[0], dtype) @ wt[:, :f].to(dtype)
    u = _masked_x(x, thresholds[1], dtype) @ wt[:, f:].to(dtype)
    return F.silu(g) * u


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Single-query GQA attention in ``dtype`` (default float64): the twin of
    :func:`teal.kernels.decode_attention`.

    q: (1, H, 1, D); k, v: (1, G, S, D) with H % G == 0 (query head h reads KV head
    h // (H / G)); mask: bool, S elements, True = attend.  Returns (1, H, 1, D) in ``dtype``.
    """
    H, D = q.shape[1], q.shape[-1]
    G = k.shape[1]
    kk = k[0].to(dtype).repeat_interleave(H // G, dim=0)          # (H, S, D)
    vv = v[0].to(dtype).repeat_interleave(H // G, dim=0)
    s = torch.einsum("hd,hsd->hs", q.reshape(H, D).to(dtype), kk) * D ** -0.5
    s = s.masked_fill(~mask.reshape(1, -1), float("-inf"))
    return torch.einsum("hs,hsd->hd", torch.softmax(s, dim=-1), vv).reshape(1, H, 1, D)
