"""Plain-PyTorch twins of the fused sparse GEMV kernels.

These compute exactly what the Triton kernels in :mod:`teal.kernels.triton_gemv`
compute, but densely and (by default) in float64, so tests can compare against them.
They need no Triton and run on any device.

Mask (TEAL, arXiv 2408.14690, Section 4, Eq. 2-3): an input channel k is kept iff
``|x_k| > t`` (scalar threshold) or ``|x_k| > t_k`` (per-channel threshold vector, used
for weight-informed scoring).  The sparse product is ``y = W (x * mask)`` with the
weight stored input-channel major: ``wt = W.t()`` of shape (K, N).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "channel_mask",
    "sparse_gemv_ref",
    "sparse_gemv_segments_ref",
    "sparse_gated_gemv_ref",
]


def channel_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask of shape (K,): ``|x| > threshold`` compared in float32.

    ``threshold`` is a float32 scalar tensor (shape ()) or a per-channel vector (K,).
    The comparison is done in float32, exactly as the kernel does it.
    """
    return x.float().abs() > threshold.float()


def _masked_x(x: torch.Tensor, threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = channel_mask(x, threshold)
    return torch.where(m, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def sparse_gemv_ref(
    x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Reference for :func:`teal.kernels.sparse_gemv`.

    x: (K,); wt: (K, N) (= W.t()); threshold: () or (K,) float32.
    Returns ``wt.T @ (x * [|x| > t])`` of shape (N,) in ``dtype`` (float64 by default).
    """
    xm = _masked_x(x.reshape(-1), threshold, dtype)
    return xm @ wt.to(dtype)


def sparse_gemv_segments_ref(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresholds: torch.Tensor,
    segments: Sequence[int],
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference for :func:`teal.kernels.sparse_gemv_segments`.

    wt: (K, N_total); ``segments`` are the exclusive end offsets of its column blocks
    (e.g. (Nq, Nq+Nk, N_total)); block s uses thresholds[s] (thresholds: (S,) or (S, K)
    float32).  Returns (N_total,) in ``dtype``.
    """
    outs = []
    a = 0
    for s, b in enumerate(segments):
        outs.append(sparse_gemv_ref(x, wt[:, a:b], thresholds[s], dtype))
        a = b
    return torch.cat(outs)


def sparse_gated_gemv_ref(
    x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Reference for :func:`teal.kernels.sparse_gated_gemv`.

    wt: (K, 2F), gate = columns [0, F), up = [F, 2F); thresholds (2,) or (2, K).
    Returns ``silu(gate) * up`` of shape (F,) in ``dtype``.
    """
    f = wt.shape[1] // 2
    g = sparse_gemv_ref(x, wt[:, :f], thresholds[0], dtype)
    u = sparse_gemv_ref(x, wt[:, f:], thresholds[1], dtype)
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
