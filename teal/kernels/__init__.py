"""Fused sparse-activation GEMV kernels for single-token decode (TEAL, arXiv 2408.14690).

Importable without Triton: Triton is imported lazily on the first kernel call.

TEAL mask (Section 4, Eq. 2-3): keep input channel k iff ``|x_k| > t`` (scalar threshold)
or ``|x_k| > t_k`` (per-channel vector, e.g. weight-informed scoring).  The kernels compute
``y = W (x * mask)`` reading only the weight rows of kept channels from the input-channel
major weight ``wt = W.t().contiguous()`` of shape (K, N).  Accumulation is fp32, the
output has the activation dtype, results are deterministic (fixed-order split-K sum).

Public API::

    kernels_available(device) -> bool
    sparse_gemv(x, wt, threshold[, expected_sparsity]) -> (..., N)
    sparse_gemv_segments(x, wt, thresholds, segments[, expected_sparsity]) -> (..., N_total)
    sparse_gated_gemv(x, wt, thresholds[, expected_sparsity]) -> (..., F)   # silu(gate) * up
    decode_attention(q, k_cache, v_cache, mask) -> (1, H, 1, D)   # GQA, one query

Plain-PyTorch twins (float64-capable) are in :mod:`teal.kernels.reference`.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from . import _checks
from .reference import decode_attention_ref, sparse_gated_gemv_ref, sparse_gemv_ref, sparse_gemv_segments_ref

__all__ = [
    "prepare",
    "kernels_available",
    "sparse_gemv",
    "sparse_gemv_segments",
    "sparse_gated_gemv",
    "sparse_gemv_ref",
    "sparse_gemv_segments_ref",
    "sparse_gated_gemv_ref",
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_supported",
]

_OPS_LOADED = False


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def kernels_available(device) -> bool:
    """True if the Triton kernels can run on ``device``.

    CUDA: Triton importable and compute capability >= 8.0 (bf16 + fp16).  CPU: only when
    ``TRITON_INTERPRET=1`` was set before Triton was imported (interpreter; slow, for tests).
    Other devices: False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available() or not _triton_importable():
            return False
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(idx) >= (8, 0)
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1" and _triton_importable()
    return False


def prepare(device) -> None:
    """Allocate the kernels' persistent buffers (split-K arrival counters) on `device` now.

    Call before `torch.compile(mode="reduce-overhead")` captures a step: a buffer first
    allocated during CUDA-graph warm-up would live in the graph's private memory pool, which
    the graph trees reject. Model set-up (`teal.to_kernel_layout`, `teal.fuse_shared_inputs`)
    calls this for CUDA weights. A no-op where the kernels are unavailable.
    """
    device = torch.device(device)
    if device.type == "cuda" and kernels_available(device):
        from .launch import counters
        counters(device, 1)


def _ensure_ops() -> None:
    global _OPS_LOADED
    if not _OPS_LOADED:
        from . import ops  # noqa: F401  (registers torch.ops.teal.*)

        _OPS_LOADED = True


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            "sparse GEMV kernels run on CUDA; on CPU only through the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton). Check kernels_available(device) first."
        )


def _pct(expected_sparsity: float) -> int:
    """The algorithm hint passed to the ops: expected sparsity in whole percent (0..100)."""
    s = float(expected_sparsity)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"expected_sparsity must be in [0, 1], got {expected_sparsity}")
    return int(round(100 * s))


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor,
                expected_sparsity: float = 0.0) -> torch.Tensor:
    """Sparse-activation GEMV ``y = W (x * [|x| > t])`` for one token (o_proj, down_proj).

    Args:
        x: activation, bf16 or fp16, shape (K,) or (1, ..., 1, K).
        wt: weight stored input-channel major, ``W.t().contiguous()`` of shape (K, N), same
            dtype and device as x.  Row k is read only if channel k is kept.
        threshold: float32, shape () (one threshold) or (K,) (per input channel).
        expected_sparsity: the fraction of channels the threshold is calibrated to drop, in
            [0, 1]; only selects the algorithm (kept-row lists at high sparsity, see
            teal.kernels.configs), never changes the result beyond fp32 summation order.
    Returns:
        y of shape x.shape[:-1] + (N,), dtype of x; fp32 accumulation.  Channels with
        ``|x_k| <= t`` contribute nothing (all masked: exact zeros).
    Raises:
        ValueError: wrong dtype, batch > 1, non-contiguous or mismatched wt, bad threshold
        shape/dtype, device mismatch, CPU without the Triton interpreter, expected_sparsity
        outside [0, 1].
    Source: TEAL (arXiv 2408.14690) Section 4, Eq. 2-3 (magnitude threshold mask).
    """
    xf = _checks.flatten_x(x)
    _checks.check_wt(xf, wt)
    _checks.check_thresholds(threshold, xf, None, "threshold")
    _check_device(xf)
    _ensure_ops()
    t = threshold.reshape(1, -1) if threshold.dim() == 1 else threshold.reshape(1)
    y = torch.ops.teal.sparse_gemv_segments(xf, wt, t, [wt.shape[1]], _pct(expected_sparsity))
    return y.reshape(*x.shape[:-1], wt.shape[1])


def sparse_gemv_segments(
    x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, segments: Sequence[int],
    expected_sparsity: float = 0.0,
) -> torch.Tensor:
    """Shared-input sparse GEMV over column segments with their own thresholds (fused q/k/v).

    Args:
        x: bf16/fp16, (K,) or (1, ..., 1, K).
        wt: ONE contiguous (K, N_total) buffer (input-channel major); column block s is
            ``wt[:, segments[s-1] : segments[s]]`` (with segments[-1] read as 0), e.g. q | k | v.
        thresholds: float32 (S,) (one per segment) or (S, K) (per segment and channel).
        segments: S ints (1 <= S <= 4), the exclusive END offsets of the column blocks,
            strictly increasing, last == N_total: e.g. ``(Nq, Nq + Nk, Nq + Nk + Nv)``.
        expected_sparsity: as for :func:`sparse_gemv` (the lowest of the segments').
    Returns:
        (..., N_total) in x's dtype; column block s is ``W_s (x * [|x| > t_s])``.  A kept
        channel's row is read once per segment that keeps it, never for one that masks it.
    Raises:
        ValueError as for :func:`sparse_gemv`, plus bad segment offsets.
    Source: TEAL (arXiv 2408.14690) Section 4 (Eq. 2-3) and Section 4.2 / greedy allocation
    (q, k, v get different sparsities on the same input).
    """
    xf = _checks.flatten_x(x)
    _checks.check_wt(xf, wt)
    sizes = _checks.check_segments(segments, wt.shape[1])
    _checks.check_thresholds(thresholds, xf, len(sizes), "thresholds")
    _check_device(xf)
    _ensure_ops()
    y = torch.ops.teal.sparse_gemv_segments(xf, wt, thresholds, sizes, _pct(expected_sparsity))
    return y.reshape(*x.shape[:-1], wt.shape[1])


def sparse_gated_gemv(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                      expected_sparsity: float = 0.0) -> torch.Tensor:
    """Fused gate/up sparse GEMV with SwiGLU epilogue: ``silu(g) * u`` for one token.

    Args:
        x: bf16/fp16, (K,) or (1, ..., 1, K).
        wt: one contiguous (K, 2F) buffer: gate = ``wt[:, :F]``, up = ``wt[:, F:]``
            (each = W.t() of its nn.Linear).
        thresholds: float32 (2,) = (t_gate, t_up) or (2, K) per channel.
        expected_sparsity: as for :func:`sparse_gemv` (the lower of gate's and up's).
    Returns:
        (..., F) in x's dtype: ``silu(W_g (x*m_g)) * (W_u (x*m_u))``, gate/up kept in fp32
        until the final cast.
    Raises:
        ValueError as for :func:`sparse_gemv`, plus odd wt.shape[1].
    Source: TEAL (arXiv 2408.14690) Section 4, Eq. 2-3; SwiGLU MLP (gate/up share x).
    """
    xf = _checks.flatten_x(x)
    _checks.check_wt(xf, wt)
    if wt.shape[1] % 2:
        raise ValueError(f"wt must be (K, 2F) = [gate | up]; got odd width {wt.shape[1]}")
    _checks.check_thresholds(thresholds, xf, 2, "thresholds")
    _check_device(xf)
    _ensure_ops()
    y = torch.ops.teal.sparse_gated_gemv(xf, wt, thresholds, _pct(expected_sparsity))
    return y.reshape(*x.shape[:-1], wt.shape[1] // 2)


def decode_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when :func:`decode_attention` handles these operands: batch 1, one query, fp16 or
    bf16 everywhere, head_dim a power of two in [16, 256], H divisible by the (>= 1) KV heads,
    a non-empty cache, unit stride along head_dim, and kernels available on the device."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return False
    B, H, T, D = q.shape
    if B != 1 or T != 1 or k.shape[0] != 1 or k.shape[-1] != D or k.shape[1] == 0 or k.shape[2] == 0:
        return False
    if H % k.shape[1]:
        return False
    if q.dtype not in _checks._ACT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if D < 16 or D > 256 or D & (D - 1) or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    return k.device == q.device and v.device == q.device and kernels_available(q.device)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Single-query (decode) GQA attention over a static KV cache, one Triton kernel.

    Args:
        q: (1, H, 1, D) bf16/fp16, the query after RoPE.
        k, v: (1, G, S, D) KV cache (S = cache length, G = KV heads, H % G == 0), same dtype
            as q, unit stride along D; query head h attends KV head h // (H / G).
        mask: bool with S elements (e.g. (1, 1, 1, S)), True where a position may be
            attended; blocks of positions that are all False are not read (unused cache tail).
    Returns:
        (1, H, 1, D) in q's dtype: softmax(q k^T / sqrt(D)) v, scores and softmax in fp32.
    Raises:
        ValueError: operands :func:`decode_attention_supported` rejects, or a mask without
        exactly S elements.
    Source: scaled dot-product attention with grouped KV heads (GQA, Ainslie et al. 2023);
    split over positions with an online-softmax merge (flash-decoding).
    """
    if not decode_attention_supported(q, k, v):
        raise ValueError(
            "decode_attention needs q (1, H, 1, D), k/v (1, G, S, D) with S >= 1, H % G == 0, one fp16/bf16 "
            f"dtype, D a power of two in [16, 256], on a kernel-capable device; got q {tuple(q.shape)} "
            f"{q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype} on {q.device}")
    S = k.shape[2]
    if mask.numel() != S or mask.dtype != torch.bool or mask.device != q.device:
        raise ValueError(f"mask must be bool with S = {S} elements on {q.device}, got "
                         f"{tuple(mask.shape)} {mask.dtype} on {mask.device}")
    _ensure_ops()
    H, D = q.shape[1], q.shape[3]
    y = torch.ops.teal.decode_attention(q.reshape(H, D).contiguous(), k[0], v[0], mask.reshape(S).contiguous())
    return y.reshape(1, H, 1, D)
