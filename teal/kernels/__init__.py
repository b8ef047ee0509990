"""Fused sparse-activation GEMV kernels for decode (TEAL, arXiv 2408.14690), and decode attention.

Importable without Triton: Triton is imported on the first kernel call.

TEAL mask (Section 4, Eq. 2-3): keep input channel k iff ``|x_k| > t`` (one threshold) or
``|x_k| > t_k`` (per channel, e.g. weight-informed scoring).  The kernels compute
``y = W (x * mask)`` reading only the rows of kept channels from the input-channel-major
weight ``wt = W.t()`` of shape (K, N).  fp32 accumulation, output in the activation dtype,
deterministic results (fixed-order split-K sum).

Public API::

    kernels_available(device) -> bool
    sparse_gemv(x (M, K), wt (K, N), thresholds[, segments], sparsity=, policy=) -> (M, N)
    sparse_gated_gemv(x (M, K), wt (K, 2F), thresholds, sparsity=, policy=) -> (M, F)
    masked_gemm(x (M, K), wt (K, N), thresholds, sizes, gated) -> (M, N)   (algorithm "torch")
    decode_attention(q, k_cache, v_cache, mask) -> (1, H, 1, D)
    KernelPolicy, GemvConfig, DispatchTable, TableRow      (teal.kernels.dispatch)

M = 1 to 16 rows (decode tokens of a batch, or the k + 1 tokens of a speculative verify
step): each row keeps its own mask and its output is its own masked GEMV, while a weight row
is read once if any row keeps it (M > 1: the dot algorithm, dense or int8 weights).  The
checks live in `teal.kernels._checks`.  Which kernel
runs is decided by a `KernelPolicy` (its dispatch table, or one forced config); the
plain-PyTorch float64 twins are in `teal.kernels.reference`.  Besides the Triton algorithms
there are two without Triton: "torch" (one masked cuBLAS GEMM, `teal.kernels.torch_gemm`)
and "ballot" (a CUDA C++ kernel built with nvcc on first use, `teal.kernels.ballot`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks
from .dispatch import (DEFAULT_POLICY, DEFAULT_TABLE, DispatchTable, GemvConfig, KernelPolicy,
                       Launch, TableRow)
from .reference import decode_attention_ref, sparse_gated_gemv_ref, sparse_gemv_ref
from .torch_gemm import masked_gemm

__all__ = ["kernels_available", "interpreter_active", "prepare", "sparse_gemv", "masked_gemm",
           "sparse_gated_gemv", "decode_attention", "decode_attention_supported",
           "sparse_gemv_ref", "sparse_gated_gemv_ref", "decode_attention_ref", "KernelPolicy",
           "GemvConfig", "DispatchTable", "TableRow", "Launch", "DEFAULT_POLICY", "DEFAULT_TABLE"]


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_active() -> bool:
    """True when Triton runs our kernels through its CPU interpreter (TRITON_INTERPRET=1 was
    set before Triton was imported); False without Triton."""
    if not _triton_importable():
        return False
    from .launch import interpreted
    return interpreted()


def kernels_available(device) -> bool:
    """True if the Triton kernels can run on `device`.

    CUDA: Triton importable and compute capability >= 8.0 (bf16 and fp16).  CPU: only
    through Triton's interpreter (slow, for tests).  Other devices: False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available() or not _triton_importable():
            return False
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(idx) >= (8, 0)
    return device.type == "cpu" and interpreter_active()


def prepare(device) -> None:
    """Allocate the kernels' persistent buffers (split-K arrival counters) on `device` now.

    Call before `torch.compile(mode="reduce-overhead")` captures a step: a buffer first
    allocated during CUDA-graph warm-up would live in the graph's private memory pool, which
    the graph trees reject.  `teal.set_kernel_policy` calls this for CUDA weights.  A no-op
    where the kernels are unavailable.
    """
    device = torch.device(device)
    if device.type == "cuda" and kernels_available(device):
        from .launch import counters
        counters(device, 1)


def _ensure_ops() -> None:
    from . import ops  # noqa: F401  (registers torch.ops.teal.*)


def _gemv(x, wt, thresholds, sizes_of, gated: bool, sparsity: float, policy, launch,
          wformat: str, scales) -> torch.Tensor:
    """Shared body of the two public GEMVs: checks, launch choice, the registered op."""
    x2, rows = _checks.rows_of(x)
    K = x2.shape[1]
    N = _checks.check_weight(wt, scales, wformat, K, x2.dtype)
    sizes = _checks.check_sizes(sizes_of(N), wformat)
    t = _checks.thresholds_rows(thresholds, K, 2 if gated else len(sizes))
    policy = policy or DEFAULT_POLICY
    # (short-circuit on CUDA: torch.compile must not trace the interpreter probe)
    runs_here = x2.device.type != "cpu" or (interpreter_active() and (launch is not None
                                                                     or policy.allows(x2.device)))
    _checks.check_device(x2, runs_here,
                         ("wt", wt), ("scales", scales), ("thresholds", t))
    _checks.check_sparsity(sparsity)
    if launch is None:
        launch = policy.launch("gated" if gated else "seg", K, sizes, x2.dtype, wformat, sparsity,
                               x2.device, rows=rows)
    if launch.algo_name == "torch":  # measured faster than every kernel for this shape
        if wformat != "dense":
            raise ValueError(f"the torch algorithm (masked cuBLAS GEMM) takes dense weights, "
                             f"not {wformat}; resolve the launch with KernelPolicy.launch")
        y = masked_gemm(x2, wt, t, sizes, gated)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    _ensure_ops()
    y = torch.ops.teal.sparse_gemv(x2, wt, scales, t, sizes, gated, wformat, launch.encode())
    return y.reshape(*x.shape[:-1], y.shape[-1])


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                segments: Optional[Sequence[int]] = None, *, sparsity: float = 0.0,
                policy: Optional[KernelPolicy] = None, launch: Optional[Launch] = None,
                wformat: str = "dense", scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sparse-activation GEMV ``y_s = W_s (x * [|x| > t_s])`` over column segments s.

    One segment: a single projection (o_proj, down_proj); several: projections sharing x
    (fused q/k/v), each with its own threshold, computed in one pass.

    Args:
        x: activation, bf16 or fp16, shape (M, K) or (..., K) with M leading rows, 1 <= M
            <= 16; each row is masked by its own |x[m]| > t_s (M > 1: dense or int8 weights).
        wt: the weight input-channel major, ``W.t().contiguous()`` of shape (K, N), x's dtype
            and device ("dense" format).  Row k is read only if channel k is kept.
        thresholds: float32, (S,) (one per segment) or (S, K) (per segment and channel);
            with one segment also () or (K,).
        segments: the exclusive END offsets of the S <= 4 column blocks, strictly increasing,
            last == N, e.g. ``(Nq, Nq + Nk, N)``; None: one segment.
        sparsity: the fraction of channels the thresholds are calibrated to drop, in [0, 1)
            (the lowest of the segments'); only chooses the kernel, never changes the result
            beyond fp32 summation order.
        policy: the KernelPolicy that chooses the kernel (default: DEFAULT_POLICY); on CPU
            tensors the kernels run only under a policy with `interpreter=True`.
        launch: a launch already resolved by a policy (skips the choice).
        wformat, scales: the weight format and its scales ("dense": none).
    Returns:
        y of shape x.shape[:-1] + (N,) in x's dtype.  Channels with ``|x_k| <= t`` contribute
        nothing (all dropped: exact zeros).
    Raises:
        ValueError: wrong dtype, M > 16 (or M > 1 with int4 weights or a launch not of the
        dot algorithm), mismatched or non-contiguous wt, bad thresholds shape
        or dtype, bad segments, device mismatch, CPU without the Triton interpreter,
        sparsity outside [0, 1).
    Source: TEAL (arXiv 2408.14690) Section 4, Eq. 2-3; greedy allocation (Section 4.2)
    gives q, k and v different thresholds on one input.
    """
    return _gemv(x, wt, thresholds, lambda N: _checks.segment_sizes(segments, N), False,
                 sparsity, policy, launch, wformat, scales)


def sparse_gated_gemv(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, *,
                      sparsity: float = 0.0, policy: Optional[KernelPolicy] = None,
                      launch: Optional[Launch] = None, wformat: str = "dense",
                      scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused gate/up sparse GEMV with the SwiGLU epilogue: ``silu(g) * u``.

    Args:
        x: bf16/fp16, (M, K) or (..., K), 1 <= M <= 16 (as for `sparse_gemv`).
        wt: one contiguous (K, 2F) buffer: gate = ``wt[:, :F]``, up = ``wt[:, F:]`` (each
            W.t() of its projection).
        thresholds: float32 (2,) = (t_gate, t_up) or (2, K) per channel.
        sparsity, policy, launch, wformat, scales: as for `sparse_gemv` (sparsity: the lower
            of gate's and up's).
    Returns:
        (..., F) in x's dtype: ``silu(W_g (x*m_g)) * (W_u (x*m_u))``, gate and up in fp32
        until the final cast.
    Raises:
        ValueError as for `sparse_gemv`, plus an odd wt.shape[1].
    Source: TEAL (arXiv 2408.14690) Section 4, Eq. 2-3; SwiGLU MLP (gate and up share x).
    """
    def sizes_of(N):
        if N % 2:
            raise ValueError(f"wt must be (K, 2F) = [gate | up]; got odd width {N}")
        return [N // 2, N // 2]
    return _gemv(x, wt, thresholds, sizes_of, True, sparsity, policy, launch, wformat, scales)


def decode_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when `decode_attention` handles these operands: batch 1, one query, fp16 or bf16
    everywhere, head_dim a power of two in [16, 256], H divisible by the (>= 1) KV heads, a
    non-empty cache, unit stride along head_dim, and kernels available on the device."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return False
    B, H, T, D = q.shape
    if B != 1 or T != 1 or k.shape[0] != 1 or k.shape[-1] != D or k.shape[1] == 0 or k.shape[2] == 0:
        return False
    if H % k.shape[1]:
        return False
    if q.dtype not in _checks.ACT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
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
        ValueError: operands `decode_attention_supported` rejects, or a mask without
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
