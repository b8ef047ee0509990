"""Host-side launchers for the Triton sparse GEMV kernels (imports Triton).

Inputs are assumed validated (see :mod:`teal.kernels._checks`).  Outputs and the fp32
split-K workspace are allocated here unless passed in (tests pass NaN-poisoned buffers).
The per-column-tile arrival counters live in a persistent, per-device int32 buffer that
every launch leaves all-zero (the last-arriving program resets its slot).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton

from . import _interp_compat
from .configs import GemvConfig, cdiv, pick_config, rchunk_for, warm_for
from .triton_gemv import (
    sparse_gated_cmp_kernel,
    sparse_gated_dot_kernel,
    sparse_gated_gemv_kernel,
    sparse_gemv_cmp_kernel,
    sparse_gemv_dot_kernel,
    sparse_gemv_list_kernel,
    sparse_gemv_seg_kernel,
    sparse_gated_list_kernel,
    keep_list_kernel,
)

_interp_compat.apply()

_COUNTERS: dict = {}
_SMS: dict = {}
_MIN_COUNTERS = 1 << 16
_HUGE = 1 << 30
_I32_LIMIT = 2**31 - 1
_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DOT_M = 16  # rows of the "dot" algorithm's A operand (smallest MMA tile; x in row 0)


def _num_sms(device: torch.device) -> int:
    key = str(device)
    if key not in _SMS:
        if device.type == "cuda":
            _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            _SMS[key] = 4  # interpreter: a few programs along K is enough to exercise split-K
    return _SMS[key]


def counters(device: torch.device, n: int) -> torch.Tensor:
    """Persistent zeroed int32 arrival counters (>= n slots) for ``device``."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _seg_tiles(sizes: Sequence[int], bn: int) -> list[int]:
    return [cdiv(n, bn) for n in sizes]


def _check_x(x: torch.Tensor) -> None:
    """The kernels index x as a dense vector: x must be (K,) contiguous (the public ops in
    teal.kernels flatten and copy as needed)."""
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (K,) vector, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")


def _mma_kw(cfg: GemvConfig, split: int) -> dict:
    """Launch constants shared by the tensor-core ("dot", "list", "ilist") kernels."""
    return dict(BLOCK_M=_DOT_M, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, RCHUNK=rchunk_for(cfg, split),
                DOT_F32=_INTERP, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _workspace(buf: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """The fp32 split-K workspace: `buf` (caller's, checked) or a new one of n floats."""
    if buf is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.numel() < n or buf.device != device:
        raise ValueError(f"workspace must be a contiguous float32 tensor of >= {n} elements on "
                         f"{device}, got {tuple(buf.shape)} {buf.dtype} on {buf.device}")
    return buf


def _common(K: int, stride_wk: int, thresholds: torch.Tensor):
    """thresholds is (S,) or (S, K): per-channel flag, channel stride, int64-index flag."""
    per_channel = thresholds.dim() == 2
    stride_tk = thresholds.stride(1) if per_channel else 0
    big = K * stride_wk > _I32_LIMIT
    return per_channel, stride_tk, big


def _keep_lists(x: torch.Tensor, thresholds: torch.Tensor, rows: int, split: int, ks: int,
                per_channel: bool, stride_tk: int, inline: bool):
    """Kept-row lists of the "list"/"ilist" kernels: int32 indices and x values (x's dtype),
    rows * split * ks entries each, and int32 counts (rows * split).  "list": built now by
    one pre-pass launch; "ilist": left for the GEMV programs to build (counts unused)."""
    n = rows * split * ks
    idx = torch.empty(n, dtype=torch.int32, device=x.device)
    xv = torch.empty(n, dtype=x.dtype, device=x.device)
    if inline:
        return idx, xv, idx
    kc = torch.empty(rows * split, dtype=torch.int32, device=x.device)
    keep_list_kernel[(rows, split)](x, thresholds, idx, xv, kc, x.numel(), thresholds.stride(0),
                                    stride_tk, split, PER_CHANNEL=per_channel, KS=ks, num_warps=4)
    return idx, xv, kc


def _scratch(x: torch.Tensor, lists: int, split: int, ks: int, scratch: Optional[torch.Tensor]):
    """Kept-row lists of the compact kernels: (int32 indices, fp32 x values), each
    lists * split * ks entries, carved from one int32 buffer (allocated unless passed in)."""
    n = lists * split * ks
    if scratch is None:
        scratch = torch.empty(2 * n, dtype=torch.int32, device=x.device)
    assert scratch.dtype == torch.int32 and scratch.numel() >= 2 * n
    return scratch[:n], scratch[n : 2 * n].view(torch.float32)


def launch_segments(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresholds: torch.Tensor,
    sizes: Sequence[int],
    config: Optional[GemvConfig] = None,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None,
    scratch: Optional[torch.Tensor] = None,
    sparsity: float = 0.0,
) -> torch.Tensor:
    """x: (K,); wt: (K, N_total) row-major; thresholds: (S,) or (S, K) fp32; sizes: S ints;
    sparsity: expected fraction dropped (picks the algorithm when config is None)."""
    K, N = wt.shape
    S = len(sizes)
    _check_x(x)
    assert 1 <= S <= 4 and sum(sizes) == N
    cfg, split, kps = pick_config("seg", K, N, lambda bn: sum(_seg_tiles(sizes, bn)), _num_sms(x.device), config,
                                  sparsity)
    bn, bk = cfg.block_n, cfg.block_k
    tiles = _seg_tiles(sizes, bn)
    n_tiles = sum(tiles)
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    c = starts[1:] + [N] * (4 - S)                   # c1..c4
    tfirst = [sum(tiles[:i]) for i in range(1, S)] + [_HUGE] * (4 - S)  # tile1..tile3
    tfirst = tfirst[:3]
    if out is None:
        out = torch.empty(N, dtype=x.dtype, device=x.device)
    if split > 1:
        workspace = _workspace(workspace, split * N, x.device)
    part = workspace if split > 1 else out
    cnt = counters(x.device, n_tiles) if split > 1 else out
    per_channel, stride_tk, big = _common(K, wt.stride(0), thresholds)
    stride_ts = thresholds.stride(0)
    even_n = all(n % bn == 0 for n in sizes)
    if cfg.algo == "compact":
        sidx, sx = _scratch(x, S, split, kps, scratch)
        sparse_gemv_cmp_kernel[(n_tiles, split)](
            x, wt, thresholds, part, cnt, out, sidx, sx,
            K, wt.stride(0), stride_ts, stride_tk, split, N,
            c[0], c[1], c[2], c[3],
            tfirst[0], tfirst[1], tfirst[2],
            NUM_SEG=S, PER_CHANNEL=per_channel, HAS_SPLIT=split > 1,
            EVEN_N=even_n, ACC2D=cfg.acc2d, BIG=big,
            KSPLIT=kps, BLOCK_K=bk, BLOCK_N=bn, RCHUNK=rchunk_for(cfg, split),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out
    if cfg.algo in ("list", "ilist"):
        inline = cfg.algo == "ilist"
        idx, xv, kc = _keep_lists(x, thresholds, S, split, kps, per_channel, stride_tk, inline)
        sparse_gemv_list_kernel[(n_tiles, split)](
            x, thresholds, wt, idx, xv, kc, part, cnt, out,
            K, wt.stride(0), stride_ts, stride_tk, split, N,
            c[0], c[1], c[2], c[3],
            tfirst[0], tfirst[1], tfirst[2],
            PER_CHANNEL=per_channel, INLINE=inline, HAS_SPLIT=split > 1, EVEN_N=even_n, BIG=big, KS=kps,
            **_mma_kw(cfg, split),
        )
        return out
    if cfg.algo == "dot":
        sparse_gemv_dot_kernel[(n_tiles, split)](
            x, wt, thresholds, part, cnt, out,
            K, wt.stride(0), stride_ts, stride_tk, kps, split, N,
            c[0], c[1], c[2], c[3],
            tfirst[0], tfirst[1], tfirst[2],
            NUM_SEG=S, PER_CHANNEL=per_channel, HAS_SPLIT=split > 1,
            EVEN_N=even_n, BIG=big,
            WARM=warm_for(cfg, kps), **_mma_kw(cfg, split),
        )
        return out
    sparse_gemv_seg_kernel[(n_tiles, split)](
        x, wt, thresholds, part, cnt, out,
        K, wt.stride(0), stride_ts, stride_tk, kps, split, N,
        c[0], c[1], c[2], c[3],
        tfirst[0], tfirst[1], tfirst[2],
        NUM_SEG=S, PER_CHANNEL=per_channel, HAS_SPLIT=split > 1,
        EVEN_N=even_n, PIPE=cfg.pipe, ACC2D=cfg.acc2d, BIG=big,
        BLOCK_K=bk, BLOCK_N=bn, RCHUNK=rchunk_for(cfg, split),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def launch_gated(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresholds: torch.Tensor,
    config: Optional[GemvConfig] = None,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None,
    scratch: Optional[torch.Tensor] = None,
    sparsity: float = 0.0,
) -> torch.Tensor:
    """x: (K,); wt: (K, 2F) row-major (gate | up); thresholds (2,) or (2, K) fp32;
    sparsity: expected fraction dropped (picks the algorithm when config is None)."""
    K, N2 = wt.shape
    F = N2 // 2
    _check_x(x)
    cfg, split, kps = pick_config("gated", K, F, lambda bn: cdiv(F, bn), _num_sms(x.device), config, sparsity)
    bn, bk = cfg.block_n, cfg.block_k
    n_tiles = cdiv(F, bn)
    if out is None:
        out = torch.empty(F, dtype=x.dtype, device=x.device)
    if split > 1:
        workspace = _workspace(workspace, split * 2 * F, x.device)
    part = workspace if split > 1 else out
    cnt = counters(x.device, n_tiles) if split > 1 else out
    per_channel, stride_tk, big = _common(K, wt.stride(0), thresholds)
    if cfg.algo == "compact":
        sidx, sx = _scratch(x, 2, split, kps, scratch)
        sparse_gated_cmp_kernel[(n_tiles, split)](
            x, wt, thresholds, part, cnt, out, sidx, sx,
            K, wt.stride(0), thresholds.stride(0), stride_tk, split, F,
            PER_CHANNEL=per_channel, HAS_SPLIT=split > 1,
            EVEN_N=(F % bn == 0), ACC2D=cfg.acc2d, BIG=big,
            KSPLIT=kps, BLOCK_K=bk, BLOCK_N=bn, RCHUNK=rchunk_for(cfg, split),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out
    if cfg.algo in ("list", "ilist"):
        inline = cfg.algo == "ilist"
        idx, xv, kc = _keep_lists(x, thresholds, 2, split, kps, per_channel, stride_tk, inline)
        sparse_gated_list_kernel[(n_tiles, split)](
            x, thresholds, wt, idx, xv, kc, part, cnt, out,
            K, wt.stride(0), thresholds.stride(0), stride_tk, split, F,
            PER_CHANNEL=per_channel, INLINE=inline, HAS_SPLIT=split > 1, EVEN_N=(F % bn == 0), BIG=big, KS=kps,
            **_mma_kw(cfg, split),
        )
        return out
    if cfg.algo == "dot":
        sparse_gated_dot_kernel[(n_tiles, split)](
            x, wt, thresholds, part, cnt, out,
            K, wt.stride(0), thresholds.stride(0), stride_tk, kps, split, F,
            PER_CHANNEL=per_channel, HAS_SPLIT=split > 1,
            EVEN_N=(F % bn == 0), BIG=big,
            WARM=warm_for(cfg, kps), **_mma_kw(cfg, split),
        )
        return out
    sparse_gated_gemv_kernel[(n_tiles, split)](
        x, wt, thresholds, part, cnt, out,
        K, wt.stride(0), thresholds.stride(0), stride_tk, kps, split, F,
        PER_CHANNEL=per_channel, HAS_SPLIT=split > 1,
        EVEN_N=(F % bn == 0), PIPE=cfg.pipe, ACC2D=cfg.acc2d, BIG=big,
        BLOCK_K=bk, BLOCK_N=bn, RCHUNK=rchunk_for(cfg, split),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


_ATTN_BLOCK_S = 64      # cache positions per step
_ATTN_MIN_SLICE = 256   # positions per program before the cache is split over programs


def launch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: (H, D) contiguous, H = n_kv_head * rep; k, v: (n_kv_head, S, D) with unit last
    stride; mask: (S,) bool, contiguous.  Returns (H, D) in q's dtype (see triton_attention)."""
    from .triton_attention import decode_attention_kernel

    H, D = q.shape
    G, S, _ = k.shape
    rep = H // G
    block_r = max(16, 1 << (rep - 1).bit_length())
    split = max(1, min(cdiv(S, _ATTN_MIN_SLICE), max(1, 2 * _num_sms(q.device) // G)))
    sps = cdiv(cdiv(S, split), _ATTN_BLOCK_S) * _ATTN_BLOCK_S
    split = cdiv(S, sps)
    if out is None:
        out = torch.empty_like(q)
    if split > 1:
        part = torch.empty(G * split * block_r * D, dtype=torch.float32, device=q.device)
        ml = torch.empty(G * split * 2 * block_r, dtype=torch.float32, device=q.device)
        cnt = counters(q.device, G)
    else:
        part = ml = cnt = out
    decode_attention_kernel[(G, split)](
        q, k, v, mask.view(torch.uint8), out, part, ml, cnt,
        S, sps, split, k.stride(0), k.stride(1), v.stride(0), v.stride(1), D ** -0.5,
        REP=rep, D=D, BLOCK_R=block_r, BLOCK_S=_ATTN_BLOCK_S, HAS_SPLIT=split > 1, DOT_F32=_INTERP,
        num_warps=4,
    )
    return out
