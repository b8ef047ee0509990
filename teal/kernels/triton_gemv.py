"""Triton kernels: fused sparse-activation GEMV for single-token decode (TEAL).

Imported lazily by :mod:`teal.kernels.ops` (this module imports Triton at top level).

Layout.  The weight is stored input-channel major, ``wt = W.t()`` contiguous with shape
(K, N): row k holds the weights of input channel k for every output.  A program owns a
slab of BLOCK_K input channels (a split-K range) times BLOCK_N output columns.  For each
slab it loads x, computes the TEAL mask ``|x_k| > t`` (TEAL Section 4, Eq. 2-3) and loads
the weight rows *only where the mask is set*: the row mask is broadcast along N, so a
masked-out row issues no memory transaction at all.  Accumulation is fp32.

Reduction (no atomics on data, deterministic).  With SPLIT > 1 programs along K, each
program writes its fp32 partial sums to a workspace ``part[SPLIT, N_total]``, then bumps a
per-column-tile arrival counter (acq_rel atomic).  The program that arrives last sums the
SPLIT partials in a fixed order, runs the epilogue (cast, or silu(gate) * up) and writes the
output, then resets its counter to zero, so the counter buffer stays zero between launches
and no memset/finishing kernel is needed: one launch per projection.

Family.  One kernel body serves
  * segments (S <= 4 column blocks of one buffer, each with its own threshold): single
    projection (S = 1) and fused q/k/v (S = 3); a column tile never straddles segments;
  * gated (gate/up fused): a program loads the gate tile and the up tile of the same
    output columns (each with its own mask) and applies silu(g) * u in the epilogue.
Quantized weights (int8 per-output-channel scale, int4 group-wise along K) can reuse
``_row_mask`` / ``_slab_dot`` / ``_finish`` by swapping the weight-load helper.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_mask(x_ptr, t_ptr, t_off, offs_k, k_end, stride_tk, PER_CHANNEL: tl.constexpr):
    """Load an x slab (fp32) and its TEAL keep-mask |x_k| > t_k, restricted to k < k_end.

    Masked x entries are zeroed, so inf/nan in skipped channels can never leak (0 * inf).
    """
    kin = offs_k < k_end
    xk = tl.load(x_ptr + offs_k, mask=kin, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        tk = tl.load(t_ptr + t_off + offs_k * stride_tk, mask=kin, other=float("inf"))
    else:
        tk = tl.load(t_ptr + t_off)
    keep = (tl.abs(xk) > tk) & kin
    xk = tl.where(keep, xk, 0.0)
    return xk, keep


@triton.jit
def _load_w(w_ptr, offs_k, cols, nmask, stride_wk, keep, EVEN_N: tl.constexpr, BIG: tl.constexpr):
    """Weight tile wt[offs_k, cols]; rows with keep == False issue no memory transaction.

    (Quantized variants replace only this helper: load int8/int4 codes + scales.)
    """
    if BIG:
        rows = offs_k.to(tl.int64) * stride_wk
    else:
        rows = offs_k * stride_wk
    ptrs = w_ptr + rows[:, None] + cols[None, :]
    if EVEN_N:
        m = keep[:, None]
    else:
        m = keep[:, None] & nmask[None, :]
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def _accum(acc, w, xk, ACC2D: tl.constexpr):
    prod = w.to(tl.float32) * xk[:, None]
    if ACC2D:
        acc += prod
    else:
        acc += tl.sum(prod, axis=0)
    return acc


@triton.jit
def _fold(acc, ACC2D: tl.constexpr):
    if ACC2D:
        return tl.sum(acc, axis=0)
    else:
        return acc


@triton.jit
def _reduce_partials(part_ptr, N_TOTAL, cols, nmask, split, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr):
    """Sum part[0:split, cols] in a fixed order (deterministic), reading from L2 (.cg)."""
    tot = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_r = tl.arange(0, RCHUNK)
    for s0 in range(0, split, RCHUNK):
        rr = s0 + offs_r
        p = tl.load(part_ptr + rr[:, None] * N_TOTAL + cols[None, :],
                    mask=(rr[:, None] < split) & nmask[None, :], other=0.0, cache_modifier=".cg")
        tot += tl.sum(p, axis=0)
    return tot


@triton.jit
def sparse_gemv_seg_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, N_TOTAL,
    c1, c2, c3, c4,           # segment column starts (c0 = 0); c_S = N_TOTAL
    tile1, tile2, tile3,      # first column-tile index of segments 1..3 (huge when absent)
    NUM_SEG: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, PIPE: tl.constexpr, ACC2D: tl.constexpr, BIG: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
):
    """y[cols] = sum_k keep_s(k) x_k wt[k, cols] for the column tile's segment s."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    # which segment does this column tile belong to?  (scalar arithmetic only)
    seg = (pid_n >= tile1).to(tl.int32) + (pid_n >= tile2).to(tl.int32) + (pid_n >= tile3).to(tl.int32)
    seg_start = tl.where(seg == 0, 0, tl.where(seg == 1, c1, tl.where(seg == 2, c2, c3)))
    seg_end = tl.where(seg == 0, c1, tl.where(seg == 1, c2, tl.where(seg == 2, c3, c4)))
    t_first = tl.where(seg == 0, 0, tl.where(seg == 1, tile1, tl.where(seg == 2, tile2, tile3)))
    n0 = seg_start + (pid_n - t_first) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    nmask = cols < seg_end
    t_off = seg * stride_ts

    k_lo = pid_k * k_per_split
    k_end = tl.minimum(K, k_lo + k_per_split)
    ar = tl.arange(0, BLOCK_K)
    if ACC2D:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # PIPE 0: plain; 1: mask of slab i+1 computed while slab i loads;
    # 2: also the weight tile of slab i+1 (register double buffer).
    xk, keep = _row_mask(x_ptr, t_ptr, t_off, k_lo + ar, k_end, stride_tk, PER_CHANNEL)
    if PIPE >= 2:
        w = _load_w(w_ptr, k_lo + ar, cols, nmask, stride_wk, keep, EVEN_N, BIG)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        if PIPE == 0:
            xk, keep = _row_mask(x_ptr, t_ptr, t_off, k0 + ar, k_end, stride_tk, PER_CHANNEL)
            w = _load_w(w_ptr, k0 + ar, cols, nmask, stride_wk, keep, EVEN_N, BIG)
            acc = _accum(acc, w, xk, ACC2D)
        elif PIPE == 1:
            w = _load_w(w_ptr, k0 + ar, cols, nmask, stride_wk, keep, EVEN_N, BIG)
            xn, kn = _row_mask(x_ptr, t_ptr, t_off, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            acc = _accum(acc, w, xk, ACC2D)
            xk, keep = xn, kn
        else:
            xn, kn = _row_mask(x_ptr, t_ptr, t_off, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            wn = _load_w(w_ptr, k0 + BLOCK_K + ar, cols, nmask, stride_wk, kn, EVEN_N, BIG)
            acc = _accum(acc, w, xk, ACC2D)
            xk, keep, w = xn, kn, wn
    accv = _fold(acc, ACC2D)

    if not HAS_SPLIT:
        tl.store(y_ptr + cols, accv.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(part_ptr + pid_k * N_TOTAL + cols, accv, mask=nmask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == split - 1:
            tot = _reduce_partials(part_ptr, N_TOTAL, cols, nmask, split, BLOCK_N, RCHUNK)
            tl.store(y_ptr + cols, tot.to(y_ptr.dtype.element_ty), mask=nmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def sparse_gated_gemv_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, F,
    PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, PIPE: tl.constexpr, ACC2D: tl.constexpr, BIG: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
):
    """y[cols] = silu(gate[cols]) * up[cols]; gate = wt[:, cols], up = wt[:, F + cols]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < F

    k_lo = pid_k * k_per_split
    k_end = tl.minimum(K, k_lo + k_per_split)
    ar = tl.arange(0, BLOCK_K)
    cols_u = F + cols
    if ACC2D:
        acc_g = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    xg, kg = _row_mask(x_ptr, t_ptr, 0, k_lo + ar, k_end, stride_tk, PER_CHANNEL)
    xu, ku = _row_mask(x_ptr, t_ptr, stride_ts, k_lo + ar, k_end, stride_tk, PER_CHANNEL)
    if PIPE >= 2:
        wg = _load_w(w_ptr, k_lo + ar, cols, nmask, stride_wk, kg, EVEN_N, BIG)
        wu = _load_w(w_ptr, k_lo + ar, cols_u, nmask, stride_wk, ku, EVEN_N, BIG)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        if PIPE == 0:
            xg, kg = _row_mask(x_ptr, t_ptr, 0, k0 + ar, k_end, stride_tk, PER_CHANNEL)
            xu, ku = _row_mask(x_ptr, t_ptr, stride_ts, k0 + ar, k_end, stride_tk, PER_CHANNEL)
            wg = _load_w(w_ptr, k0 + ar, cols, nmask, stride_wk, kg, EVEN_N, BIG)
            wu = _load_w(w_ptr, k0 + ar, cols_u, nmask, stride_wk, ku, EVEN_N, BIG)
            acc_g = _accum(acc_g, wg, xg, ACC2D)
            acc_u = _accum(acc_u, wu, xu, ACC2D)
        elif PIPE == 1:
            wg = _load_w(w_ptr, k0 + ar, cols, nmask, stride_wk, kg, EVEN_N, BIG)
            wu = _load_w(w_ptr, k0 + ar, cols_u, nmask, stride_wk, ku, EVEN_N, BIG)
            xgn, kgn = _row_mask(x_ptr, t_ptr, 0, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            xun, kun = _row_mask(x_ptr, t_ptr, stride_ts, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            acc_g = _accum(acc_g, wg, xg, ACC2D)
            acc_u = _accum(acc_u, wu, xu, ACC2D)
            xg, kg, xu, ku = xgn, kgn, xun, kun
        else:
            xgn, kgn = _row_mask(x_ptr, t_ptr, 0, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            xun, kun = _row_mask(x_ptr, t_ptr, stride_ts, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            wgn = _load_w(w_ptr, k0 + BLOCK_K + ar, cols, nmask, stride_wk, kgn, EVEN_N, BIG)
            wun = _load_w(w_ptr, k0 + BLOCK_K + ar, cols_u, nmask, stride_wk, kun, EVEN_N, BIG)
            acc_g = _accum(acc_g, wg, xg, ACC2D)
            acc_u = _accum(acc_u, wu, xu, ACC2D)
            xg, kg, xu, ku, wg, wu = xgn, kgn, xun, kun, wgn, wun
    g = _fold(acc_g, ACC2D)
    u = _fold(acc_u, ACC2D)

    if not HAS_SPLIT:
        out = g * tl.sigmoid(g) * u
        tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(part_ptr + pid_k * (2 * F) + cols, g, mask=nmask)
        tl.store(part_ptr + pid_k * (2 * F) + F + cols, u, mask=nmask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == split - 1:
            g = _reduce_partials(part_ptr, 2 * F, cols, nmask, split, BLOCK_N, RCHUNK)
            u = _reduce_partials(part_ptr, 2 * F, F + cols, nmask, split, BLOCK_N, RCHUNK)
            out = g * tl.sigmoid(g) * u
            tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=nmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")
