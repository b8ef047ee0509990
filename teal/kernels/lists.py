"""Algorithm "list": kept-row lists, gathered rows (imports Triton).

The masked algorithms walk every weight row of a program's K range, kept or not, so their
time has a floor well above the kept bytes at high sparsity (a dropped row still costs its
instructions).  Here each (threshold row, K range of KS channels) first gets the list of its
kept channels as (index, x value) in increasing k order plus their count; the GEMV programs
then loop over ceil(count / BLOCK_K) full chunks of gathered rows (each row a contiguous
BLOCK_N segment), the indices feeding the addresses of the pipelined tensor-core loads, so
trip count, instructions and bytes all follow the kept rows.  The lists are built either by
a small pre-pass launch (`keep_list_kernel`) or, with INLINE, by every GEMV program for its
own range (a scan and a CTA barrier instead of a launch; the column tiles of a range all
write identical entries).  Same split-K tail, deterministic.

Measured (notes/kernels.md rounds 4-5): 1.5-2x faster than "dot" at 90% sparsity, slower at
50% (a fixed ~6-8 us per call), so the table uses it for calls calibrated at >= 80%.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import finish, load_keep, load_weight_tile, program_columns, weight_columns
from .dot import BLOCK_M, mma


@triton.jit
def _range_list(x_ptr, t_ptr, t_off, k_lo, K, stride_tk, idx_ptr, xv_ptr,
                PER_CHANNEL: tl.constexpr, KS: tl.constexpr):
    """Kept channels of x[k_lo : k_lo + KS] (k < K) under the threshold row at t_off: writes
    idx_ptr[j] = k (absolute) and xv_ptr[j] = x[k] for the j-th kept k (increasing k) and
    returns the count.  Entries past the count are left unwritten (never read)."""
    offs = k_lo + tl.arange(0, KS)
    xr, keep = load_keep(x_ptr, t_ptr, t_off, offs, K, stride_tk, PER_CHANNEL)
    ki = keep.to(tl.int32)
    slot = tl.cumsum(ki, axis=0) - 1
    tl.store(idx_ptr + slot, offs, mask=keep)
    tl.store(xv_ptr + slot, xr, mask=keep)
    return tl.sum(ki, axis=0)


@triton.jit
def keep_list_kernel(x_ptr, t_ptr, idx_ptr, xv_ptr, kc_ptr, K, stride_ts, stride_tk, split,
                     PER_CHANNEL: tl.constexpr, KS: tl.constexpr):
    """Program (s, r): kept channels of x[r*KS : (r+1)*KS] under threshold row s.

    Writes idx[(s*split + r)*KS + j] = k (absolute) and xv[...] = x[k] for the j-th kept k
    (increasing k), and kc[s*split + r] = the number kept.
    """
    s = tl.program_id(0)
    r = tl.program_id(1)
    li = s * split + r
    n = _range_list(x_ptr, t_ptr, s * stride_ts, r * KS, K, stride_tk, idx_ptr + li * KS,
                    xv_ptr + li * KS, PER_CHANNEL, KS)
    tl.store(kc_ptr + li, n)


@triton.jit
def _list_count(x_ptr, t_ptr, t_off, k_lo, K, stride_tk, idx_ptr, xv_ptr, kc_ptr, li,
                PER_CHANNEL: tl.constexpr, KS: tl.constexpr, INLINE: tl.constexpr):
    """Kept count of list li: read from the pre-pass (kc_ptr), or (INLINE) built here by
    this program; the CTA barrier makes its own stores visible to its gathered loads."""
    if INLINE:
        n = _range_list(x_ptr, t_ptr, t_off, k_lo, K, stride_tk, idx_ptr + li * KS,
                        xv_ptr + li * KS, PER_CHANNEL, KS)
        tl.debug_barrier()
    else:
        n = tl.load(kc_ptr + li)
    return n


@triton.jit
def _list_step(acc, w_ptr, idx_ptr, xv_ptr, base, c, n, ar, wcols, wmask, rm, stride_wk,
               EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr,
               DOT_F32: tl.constexpr):
    """acc += A(kept x values of list entries c + ar, row 0) @ wt[their rows, cols] (formats
    with per-column scales only: a gathered tile spans several int4 groups)."""
    tl.static_assert(WFMT != 2, "kept-row lists take dense or int8 weights")
    j = c + ar
    inb = j < n
    idx = tl.load(idx_ptr + base + j, mask=inb, other=0)
    xv = tl.load(xv_ptr + base + j, mask=inb, other=0.0)
    w = load_weight_tile(w_ptr, idx, wcols, wmask, stride_wk, inb, EVEN_N, BIG, WFMT)
    w = w.to(tl.float32).to(xv.dtype)  # int8 codes: exact
    a = tl.where(rm[:, None] == 0, xv[None, :], 0.0).to(xv.dtype)
    return mma(acc, a, w, DOT_F32)


@triton.jit
def list_gemv_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, ncols,
    c1, c2, c3, c4, tile1, tile2, tile3, s_ptr, stride_s,
    idx_ptr, xv_ptr, kc_ptr,
    GATED: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    WALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr, INLINE: tl.constexpr, KS: tl.constexpr,
):
    """Kept-row-list version of masked_gemv_kernel (same math, same outputs); list row s of a
    K range is threshold row s (segment s; GATED: 0 gate, 1 up)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg, cols, nmask, t_off = program_columns(pid_n, ncols, c1, c2, c3, c4, tile1, tile2, tile3,
                                              stride_ts, GATED, BLOCK_N)
    li = seg * split + pid_k
    n = _list_count(x_ptr, t_ptr, t_off, pid_k * KS, K, stride_tk, idx_ptr, xv_ptr, kc_ptr, li,
                    PER_CHANNEL, KS, INLINE)
    ar = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_max = n
    cols_u = ncols + cols  # up's columns (GATED)
    wcols, wmask = weight_columns(cols, nmask, WFMT, BLOCK_N, WALIGN)
    wcols_u, _ = weight_columns(cols_u, nmask, WFMT, BLOCK_N, WALIGN)
    if GATED:
        n_u = _list_count(x_ptr, t_ptr, t_off + stride_ts, pid_k * KS, K, stride_tk, idx_ptr,
                          xv_ptr, kc_ptr, split + pid_k, PER_CHANNEL, KS, INLINE)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        n_max = tl.maximum(n, n_u)
    for c in range(0, n_max, BLOCK_K):
        acc = _list_step(acc, w_ptr, idx_ptr, xv_ptr, li * KS, c, n, ar, wcols, wmask, rm,
                         stride_wk, EVEN_N, BIG, WFMT, DOT_F32)
        if GATED:
            acc_u = _list_step(acc_u, w_ptr, idx_ptr, xv_ptr, (split + pid_k) * KS, c, n_u, ar,
                               wcols_u, wmask, rm, stride_wk, EVEN_N, BIG, WFMT, DOT_F32)
    finish(acc, acc_u, s_ptr, cols, cols_u, nmask, part_ptr, cnt_ptr, y_ptr, pid_n, pid_k, split,
           ncols, GATED, HAS_SPLIT, WFMT, True, BLOCK_N, RCHUNK)


def launch(plan, lc) -> None:
    """Build the kept-row lists (pre-pass launch unless inline) and launch the GEMV over
    `plan` (teal.kernels.launch.Plan) with the resolved launch `lc`."""
    x, t = plan.x, plan.thresholds
    ks, split, rows = lc.k_per_split, lc.split, plan.threshold_rows
    n = rows * split * ks
    idx = torch.empty(n, dtype=torch.int32, device=x.device)
    xv = torch.empty(n, dtype=x.dtype, device=x.device)
    kc = idx
    if not lc.inline:
        kc = torch.empty(rows * split, dtype=torch.int32, device=x.device)
        keep_list_kernel[(rows, split)](x, t, idx, xv, kc, plan.K, t.stride(0), plan.stride_tk,
                                        split, PER_CHANNEL=plan.per_channel, KS=ks, num_warps=4)
    list_gemv_kernel[plan.grid](*plan.args, idx, xv, kc, **plan.meta, BLOCK_M=BLOCK_M,
                                DOT_F32=plan.interpreted, INLINE=bool(lc.inline), KS=ks,
                                num_warps=lc.num_warps, num_stages=lc.num_stages)
