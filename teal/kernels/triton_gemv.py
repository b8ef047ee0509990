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
def _load_keep(x_ptr, t_ptr, t_off, offs_k, k_end, stride_tk, PER_CHANNEL: tl.constexpr):
    """x[offs_k] (input dtype, 0 where offs_k >= k_end) and its TEAL keep-mask |x_k| > t_k
    (compared in fp32; t scalar at t_ptr + t_off, or per channel with stride stride_tk)."""
    kin = offs_k < k_end
    xr = tl.load(x_ptr + offs_k, mask=kin, other=0.0)
    if PER_CHANNEL:
        tk = tl.load(t_ptr + t_off + offs_k * stride_tk, mask=kin, other=float("inf"))
    else:
        tk = tl.load(t_ptr + t_off)
    return xr, (tl.abs(xr.to(tl.float32)) > tk) & kin


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
def _seg_tile(pid_n, c1, c2, c3, c4, tile1, tile2, tile3, BLOCK_N: tl.constexpr):
    """(segment, columns, column mask) of column tile pid_n; segment s spans [c_s, c_{s+1})
    (c0 = 0) and its tiles start at tile index tile_s (tile0 = 0). Scalar arithmetic only."""
    seg = (pid_n >= tile1).to(tl.int32) + (pid_n >= tile2).to(tl.int32) + (pid_n >= tile3).to(tl.int32)
    seg_start = tl.where(seg == 0, 0, tl.where(seg == 1, c1, tl.where(seg == 2, c2, c3)))
    seg_end = tl.where(seg == 0, c1, tl.where(seg == 1, c2, tl.where(seg == 2, c3, c4)))
    t_first = tl.where(seg == 0, 0, tl.where(seg == 1, tile1, tl.where(seg == 2, tile2, tile3)))
    cols = seg_start + (pid_n - t_first) * BLOCK_N + tl.arange(0, BLOCK_N)
    return seg, cols, cols < seg_end


@triton.jit
def _arrive_last(cnt_ptr, pid_n, split):
    """After this program's partials are stored: True for the last of the split programs of
    column tile pid_n (acq_rel: it then sees every partial)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    return arrived == split - 1


@triton.jit
def _seg_tail(accv, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, N_TOTAL,
              HAS_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr):
    """Store y[cols] = accv, or (split-K) this program's fp32 partial; the last-arriving
    program sums all partials in a fixed order, stores y and resets its counter to zero."""
    if not HAS_SPLIT:
        tl.store(y_ptr + cols, accv.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(part_ptr + pid_k * N_TOTAL + cols, accv, mask=nmask)
        if _arrive_last(cnt_ptr, pid_n, split):
            tot = _reduce_partials(part_ptr, N_TOTAL, cols, nmask, split, BLOCK_N, RCHUNK)
            tl.store(y_ptr + cols, tot.to(y_ptr.dtype.element_ty), mask=nmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _gated_tail(g, u, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, F,
                HAS_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr):
    """As _seg_tail for gate/up partials (workspace rows [gate | up], 2F wide); the output is
    silu(gate) * up."""
    if not HAS_SPLIT:
        out = g * tl.sigmoid(g) * u
        tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(part_ptr + pid_k * (2 * F) + cols, g, mask=nmask)
        tl.store(part_ptr + pid_k * (2 * F) + F + cols, u, mask=nmask)
        if _arrive_last(cnt_ptr, pid_n, split):
            g = _reduce_partials(part_ptr, 2 * F, cols, nmask, split, BLOCK_N, RCHUNK)
            u = _reduce_partials(part_ptr, 2 * F, F + cols, nmask, split, BLOCK_N, RCHUNK)
            out = g * tl.sigmoid(g) * u
            tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=nmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


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
    seg, cols, nmask = _seg_tile(pid_n, c1, c2, c3, c4, tile1, tile2, tile3, BLOCK_N)
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

    _seg_tail(accv, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, N_TOTAL,
              HAS_SPLIT, BLOCK_N, RCHUNK)


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

    _gated_tail(g, u, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, F,
                HAS_SPLIT, BLOCK_N, RCHUNK)


# ----------------------------------------------------------------------------------------
# Round 2: row compaction ("compact" algorithm).
#
# The masked-slab loop above walks every BLOCK_K slab of a program's K range whether its
# rows are kept or not: its trip count and its chain of dependent memory round trips do not
# shrink with sparsity, and at 50-90% sparsity each trip carries few bytes (latency-bound).
# Here a program first loads x for its WHOLE K range (KSPLIT channels, one vector load),
# computes the keep mask and, unless every channel is kept, writes the kept channels'
# (relative index, x value) in increasing k order to a scratch list (exclusive cumsum of the
# mask = slot).  It then loops over ceil(n_kept / BLOCK_K) FULL chunks of gathered rows (each
# row still a contiguous BLOCK_N segment, 16-byte loads), with the next chunk's rows and the
# chunk after that's indices already in flight (register double buffer).  Trip count and
# bytes are proportional to the kept rows.
#
# The scratch list of a (segment, K range) is shared by all column tiles of that range: they
# all compute and write identical values (same x, same thresholds), so a program that reads
# the list after its own stores + CTA barrier sees its own values or identical ones.  Reads
# go to L2 (.cg), never to a possibly stale L1 line.  Order of accumulation is fixed (k
# ascending within a program, fixed-order split-K sum): deterministic.
#
# Status (H200, notes/kernels.md round 2): faster than the masked loop only at ~90% sparsity,
# slower at 0-50%; opt-in through GemvConfig(algo="compact"), not in the default table.
# ----------------------------------------------------------------------------------------


@triton.jit
def _keep_list(xk, kin, t_ptr, t_off, kk, stride_tk, n_valid, ak, sidx_ptr, sx_ptr, PER_CHANNEL: tl.constexpr):
    """Keep mask of one K range; writes the kept (relative k, x) list unless all are kept.

    Returns (n_kept, dense) where dense == (n_kept == n_valid), i.e. the list is the
    identity and was not written.
    """
    if PER_CHANNEL:
        tk = tl.load(t_ptr + t_off + kk * stride_tk, mask=kin, other=float("inf"))
    else:
        tk = tl.load(t_ptr + t_off)
    keep = (tl.abs(xk) > tk) & kin
    ki = keep.to(tl.int32)
    n_kept = tl.sum(ki, axis=0)
    dense = n_kept == n_valid
    if n_kept != n_valid:  # (uniform branch) no list, no scan when every channel is kept
        slot = tl.cumsum(ki, axis=0) - 1
        tl.store(sidx_ptr + slot, ak, mask=keep)
        tl.store(sx_ptr + slot, xk, mask=keep)
    return n_kept, dense


@triton.jit
def _chunk(x_ptr, k_lo, sidx_ptr, sx_ptr, c, n_kept, dense, ar):
    """(relative row index, x value) of kept-list entries c + ar (0 beyond n_kept)."""
    r = c + ar
    inb = r < n_kept
    if dense:
        idx = r
        xv = tl.load(x_ptr + k_lo + r, mask=inb, other=0.0).to(tl.float32)
    else:
        idx = tl.load(sidx_ptr + r, mask=inb, other=0, cache_modifier=".cg")
        xv = tl.load(sx_ptr + r, mask=inb, other=0.0, cache_modifier=".cg")
    return idx, xv


@triton.jit
def _load_rows(w_ptr, k_lo, idx, inb, cols, nmask, stride_wk, EVEN_N: tl.constexpr, BIG: tl.constexpr):
    """Gathered weight rows wt[k_lo + idx, cols]; rows with inb == False issue no transaction."""
    if BIG:
        rows = (k_lo + idx).to(tl.int64) * stride_wk
    else:
        rows = (k_lo + idx) * stride_wk
    ptrs = w_ptr + rows[:, None] + cols[None, :]
    if EVEN_N:
        m = inb[:, None]
    else:
        m = inb[:, None] & nmask[None, :]
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def sparse_gemv_cmp_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr, sidx_ptr, sx_ptr,
    K, stride_wk, stride_ts, stride_tk, split, N_TOTAL,
    c1, c2, c3, c4,
    tile1, tile2, tile3,
    NUM_SEG: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, ACC2D: tl.constexpr, BIG: tl.constexpr,
    KSPLIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
):
    """Compacted version of sparse_gemv_seg_kernel (same math, same outputs)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg, cols, nmask = _seg_tile(pid_n, c1, c2, c3, c4, tile1, tile2, tile3, BLOCK_N)

    # pass 1: mask of the whole K range, kept-row list
    k_lo = pid_k * KSPLIT
    ak = tl.arange(0, KSPLIT)
    kk = k_lo + ak
    kin = kk < K
    xk = tl.load(x_ptr + kk, mask=kin, other=0.0).to(tl.float32)
    n_valid = tl.minimum(K - k_lo, KSPLIT)
    sbase = (seg * split + pid_k) * KSPLIT
    n_kept, dense = _keep_list(xk, kin, t_ptr, seg * stride_ts, kk, stride_tk, n_valid, ak,
                               sidx_ptr + sbase, sx_ptr + sbase, PER_CHANNEL)
    tl.debug_barrier()

    # pass 2: full chunks of kept rows, the next chunk's rows and the indices of the one after
    # it in flight (register double buffer; see notes/kernels.md, round 2, for why a rolled
    # double buffer still waits once per trip, and what the ping-pong variant measured)
    ar = tl.arange(0, BLOCK_K)
    if ACC2D:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    sI = sidx_ptr + sbase
    sX = sx_ptr + sbase
    i0, x0 = _chunk(x_ptr, k_lo, sI, sX, 0, n_kept, dense, ar)
    i1, x1 = _chunk(x_ptr, k_lo, sI, sX, BLOCK_K, n_kept, dense, ar)
    w0 = _load_rows(w_ptr, k_lo, i0, ar < n_kept, cols, nmask, stride_wk, EVEN_N, BIG)
    for c in range(0, n_kept, BLOCK_K):
        w1 = _load_rows(w_ptr, k_lo, i1, (c + BLOCK_K + ar) < n_kept, cols, nmask, stride_wk, EVEN_N, BIG)
        i2, x2 = _chunk(x_ptr, k_lo, sI, sX, c + 2 * BLOCK_K, n_kept, dense, ar)
        acc = _accum(acc, w0, x0, ACC2D)
        w0, x0, i1, x1 = w1, x1, i2, x2
    accv = _fold(acc, ACC2D)

    _seg_tail(accv, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, N_TOTAL,
              HAS_SPLIT, BLOCK_N, RCHUNK)


@triton.jit
def sparse_gated_cmp_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr, sidx_ptr, sx_ptr,
    K, stride_wk, stride_ts, stride_tk, split, F,
    PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, ACC2D: tl.constexpr, BIG: tl.constexpr,
    KSPLIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
):
    """Compacted version of sparse_gated_gemv_kernel: one kept list for gate, one for up."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < F
    cols_u = F + cols

    k_lo = pid_k * KSPLIT
    ak = tl.arange(0, KSPLIT)
    kk = k_lo + ak
    kin = kk < K
    xk = tl.load(x_ptr + kk, mask=kin, other=0.0).to(tl.float32)
    n_valid = tl.minimum(K - k_lo, KSPLIT)
    sg = pid_k * KSPLIT
    su = (split + pid_k) * KSPLIT
    n_g, dense_g = _keep_list(xk, kin, t_ptr, 0, kk, stride_tk, n_valid, ak,
                              sidx_ptr + sg, sx_ptr + sg, PER_CHANNEL)
    n_u, dense_u = _keep_list(xk, kin, t_ptr, stride_ts, kk, stride_tk, n_valid, ak,
                              sidx_ptr + su, sx_ptr + su, PER_CHANNEL)
    tl.debug_barrier()

    # pass 2: as in sparse_gemv_cmp_kernel, gate and up rows side by side
    ar = tl.arange(0, BLOCK_K)
    if ACC2D:
        acc_g = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    gI = sidx_ptr + sg
    gX = sx_ptr + sg
    uI = sidx_ptr + su
    uX = sx_ptr + su
    g0, xg0 = _chunk(x_ptr, k_lo, gI, gX, 0, n_g, dense_g, ar)
    u0, xu0 = _chunk(x_ptr, k_lo, uI, uX, 0, n_u, dense_u, ar)
    g1, xg1 = _chunk(x_ptr, k_lo, gI, gX, BLOCK_K, n_g, dense_g, ar)
    u1, xu1 = _chunk(x_ptr, k_lo, uI, uX, BLOCK_K, n_u, dense_u, ar)
    wg0 = _load_rows(w_ptr, k_lo, g0, ar < n_g, cols, nmask, stride_wk, EVEN_N, BIG)
    wu0 = _load_rows(w_ptr, k_lo, u0, ar < n_u, cols_u, nmask, stride_wk, EVEN_N, BIG)
    n_max = tl.maximum(n_g, n_u)
    for c in range(0, n_max, BLOCK_K):
        wg1 = _load_rows(w_ptr, k_lo, g1, (c + BLOCK_K + ar) < n_g, cols, nmask, stride_wk, EVEN_N, BIG)
        wu1 = _load_rows(w_ptr, k_lo, u1, (c + BLOCK_K + ar) < n_u, cols_u, nmask, stride_wk, EVEN_N, BIG)
        g2, xg2 = _chunk(x_ptr, k_lo, gI, gX, c + 2 * BLOCK_K, n_g, dense_g, ar)
        u2, xu2 = _chunk(x_ptr, k_lo, uI, uX, c + 2 * BLOCK_K, n_u, dense_u, ar)
        acc_g = _accum(acc_g, wg0, xg0, ACC2D)
        acc_u = _accum(acc_u, wu0, xu0, ACC2D)
        wg0, xg0, g1, xg1 = wg1, xg1, g2, xg2
        wu0, xu0, u1, xu1 = wu1, xu1, u2, xu2
    g = _fold(acc_g, ACC2D)
    u = _fold(acc_u, ACC2D)

    _gated_tail(g, u, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, F,
                HAS_SPLIT, BLOCK_N, RCHUNK)


# ----------------------------------------------------------------------------------------
# Round 3: tensor-core formulation ("dot" algorithm), software-pipelined loads.
#
# Why: the masked slab loop of round 1 is latency-bound.  Triton pipelines (cp.async ring
# buffers in shared memory, num_stages deep) only loads that feed ``tl.dot``; plain loads
# consumed by elementwise math wait one memory round trip per trip.  So the GEMV is written
# as a [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] product whose A operand holds the masked x in
# row 0 and zeros elsewhere (BLOCK_M = 16, the smallest MMA tile; the extra rows cost
# tensor-core cycles, not bytes).  The weight tile is loaded with the row mask ``keep``:
# a masked-out row is a zero-filled async copy (no DRAM read), so bytes still follow the
# active rows while num_stages tiles stay in flight per program.
#
# Numerics: bf16/fp16 x bf16/fp16 products are exact in fp32 and accumulate in fp32 (as in
# round 1; only the summation order differs); rows 1..BLOCK_M-1 of the accumulator are exact
# zeros, so summing them in is exact.  Deterministic (fixed order, same split-K tail).
# ----------------------------------------------------------------------------------------


@triton.jit
def _dot_step(acc, x_ptr, w_ptr, t_ptr, t_off, offs_k, k_end, cols, nmask, rm, stride_wk, stride_tk,
              PER_CHANNEL: tl.constexpr, EVEN_N: tl.constexpr, BIG: tl.constexpr, DOT_F32: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] += A(masked x in row 0) @ wt[offs_k, cols] (masked rows not read).

    DOT_F32 (CPU interpreter only, whose bf16 dot is broken): the same exact products in fp32.
    """
    xr, keep = _load_keep(x_ptr, t_ptr, t_off, offs_k, k_end, stride_tk, PER_CHANNEL)
    w = _load_w(w_ptr, offs_k, cols, nmask, stride_wk, keep, EVEN_N, BIG)
    a = tl.where((rm[:, None] == 0) & keep[None, :], xr[None, :], 0.0).to(w.dtype)
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w, acc)


@triton.jit
def _range_kept(x_ptr, t_ptr, t_off, k_lo, k_end, stride_tk, PER_CHANNEL: tl.constexpr, WARM: tl.constexpr):
    """Kept channels of the program's whole K range [k_lo, k_end), read WARM at a time.

    Besides allowing an early exit for an all-dropped range, this pulls the range's x (and
    per-channel thresholds) into L1 up front: inside the pipelined loop the mask of the tile
    being issued is then an L1 hit instead of one L2 round trip per trip (round-3 finding:
    that round trip, not bytes, set the time at high sparsity).
    """
    n = 0
    for c0 in range(k_lo, k_end, WARM):
        offs = c0 + tl.arange(0, WARM)
        m = offs < k_end
        xw = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            tw = tl.load(t_ptr + t_off + offs * stride_tk, mask=m, other=float("inf"))
        else:
            tw = tl.load(t_ptr + t_off)
        n += tl.sum(((tl.abs(xw) > tw) & m).to(tl.int32), axis=0)
    return n


@triton.jit
def sparse_gemv_dot_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, N_TOTAL,
    c1, c2, c3, c4,
    tile1, tile2, tile3,
    NUM_SEG: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, BIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    DOT_F32: tl.constexpr, WARM: tl.constexpr,
):
    """Tensor-core version of sparse_gemv_seg_kernel (same math, same outputs)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg, cols, nmask = _seg_tile(pid_n, c1, c2, c3, c4, tile1, tile2, tile3, BLOCK_N)
    t_off = seg * stride_ts

    k_lo = pid_k * k_per_split
    k_end = tl.minimum(K, k_lo + k_per_split)
    ar = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_stop = k_lo + k_per_split
    if WARM > 0:
        n_kept = _range_kept(x_ptr, t_ptr, t_off, k_lo, k_end, stride_tk, PER_CHANNEL, WARM)
        k_stop = tl.where(n_kept > 0, k_stop, k_lo)
    for k0 in range(k_lo, k_stop, BLOCK_K):
        acc = _dot_step(acc, x_ptr, w_ptr, t_ptr, t_off, k0 + ar, k_end, cols, nmask, rm, stride_wk,
                        stride_tk, PER_CHANNEL, EVEN_N, BIG, DOT_F32)
    accv = tl.sum(acc, axis=0)

    _seg_tail(accv, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, N_TOTAL,
              HAS_SPLIT, BLOCK_N, RCHUNK)


@triton.jit
def sparse_gated_dot_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, F,
    PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, BIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    DOT_F32: tl.constexpr, WARM: tl.constexpr,
):
    """Tensor-core version of sparse_gated_gemv_kernel: silu(gate) * up epilogue."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < F
    cols_u = F + cols

    k_lo = pid_k * k_per_split
    k_end = tl.minimum(K, k_lo + k_per_split)
    ar = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_stop = k_lo + k_per_split
    if WARM > 0:
        n_kept = _range_kept(x_ptr, t_ptr, 0, k_lo, k_end, stride_tk, PER_CHANNEL, WARM) + \
            _range_kept(x_ptr, t_ptr, stride_ts, k_lo, k_end, stride_tk, PER_CHANNEL, WARM)
        k_stop = tl.where(n_kept > 0, k_stop, k_lo)
    for k0 in range(k_lo, k_stop, BLOCK_K):
        acc_g = _dot_step(acc_g, x_ptr, w_ptr, t_ptr, 0, k0 + ar, k_end, cols, nmask, rm, stride_wk,
                          stride_tk, PER_CHANNEL, EVEN_N, BIG, DOT_F32)
        acc_u = _dot_step(acc_u, x_ptr, w_ptr, t_ptr, stride_ts, k0 + ar, k_end, cols_u, nmask, rm,
                          stride_wk, stride_tk, PER_CHANNEL, EVEN_N, BIG, DOT_F32)
    g = tl.sum(acc_g, axis=0)
    u = tl.sum(acc_u, axis=0)

    _gated_tail(g, u, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, F,
                HAS_SPLIT, BLOCK_N, RCHUNK)


# ----------------------------------------------------------------------------------------
# Round 4 (opt-in): kept-row lists built once per call ("list").  Measured (H200, session 3,
# notes/kernels.md): 1.5-2x faster than "dot" at 90% sparsity, slower at 0-50% (a fixed
# ~6-8 us per call), so the config table does not use it.
#
# Round 3's ncu profile: at 50-90% sparsity the pipelined "dot" loop is issue-bound, because
# a masked-out row still costs its async-copy instructions, address arithmetic and MMA share.
# Here a small pre-pass (`keep_list_kernel`, one program per (threshold row, K range)) writes
# each range's kept channels as (index, x value) in increasing k order plus their count;
# the GEMV programs then loop over ceil(count / BLOCK_K) full chunks of gathered rows (each
# row a contiguous BLOCK_N segment), the indices feeding the addresses of the pipelined weight
# loads.  Trip count, instructions and bytes all scale with the kept rows.  Unlike round 2
# (every program rebuilt its range's list in a serial prologue), the list is built once per
# call, at the cost of a second launch.  Same split-K tail, deterministic.
# Variant "ilist" (INLINE): no pre-pass launch; every program builds its range's list itself
# (one vector load of the range's x, a cumsum, scattered stores, CTA barrier) before the
# same pipelined loop: the launch traded for a per-program prologue.
# ----------------------------------------------------------------------------------------


@triton.jit
def _range_list(x_ptr, t_ptr, t_off, k_lo, K, stride_tk, idx_ptr, xv_ptr,
                PER_CHANNEL: tl.constexpr, KS: tl.constexpr):
    """Kept channels of x[k_lo : k_lo + KS] (k < K) under the threshold row at t_off: writes
    idx_ptr[j] = k (absolute) and xv_ptr[j] = x[k] for the j-th kept k (increasing k) and
    returns the count.  Entries past the count are left unwritten (never read)."""
    offs = k_lo + tl.arange(0, KS)
    xr, keep = _load_keep(x_ptr, t_ptr, t_off, offs, K, stride_tk, PER_CHANNEL)
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
    """Kept count of list li: read from the pre-pass (kc_ptr), or (INLINE, "ilist") built here
    by this program; all column tiles of a K range write identical entries, and the CTA
    barrier makes this program's own stores visible to its gathered loads."""
    if INLINE:
        n = _range_list(x_ptr, t_ptr, t_off, k_lo, K, stride_tk, idx_ptr + li * KS,
                        xv_ptr + li * KS, PER_CHANNEL, KS)
        tl.debug_barrier()
    else:
        n = tl.load(kc_ptr + li)
    return n


@triton.jit
def _list_step(acc, w_ptr, idx_ptr, xv_ptr, base, c, n, ar, cols, nmask, rm, stride_wk,
               EVEN_N: tl.constexpr, BIG: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += A(kept x values of list entries c + ar, row 0) @ wt[their rows, cols]."""
    j = c + ar
    inb = j < n
    idx = tl.load(idx_ptr + base + j, mask=inb, other=0)
    xv = tl.load(xv_ptr + base + j, mask=inb, other=0.0)
    w = _load_w(w_ptr, idx, cols, nmask, stride_wk, inb, EVEN_N, BIG)
    a = tl.where(rm[:, None] == 0, xv[None, :], 0.0).to(w.dtype)
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w, acc)


@triton.jit
def sparse_gemv_list_kernel(
    x_ptr, t_ptr, w_ptr, idx_ptr, xv_ptr, kc_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, split, N_TOTAL,
    c1, c2, c3, c4,
    tile1, tile2, tile3,
    PER_CHANNEL: tl.constexpr, INLINE: tl.constexpr,
    HAS_SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BIG: tl.constexpr, KS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Kept-row-list version of sparse_gemv_seg_kernel (same math, same outputs)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg, cols, nmask = _seg_tile(pid_n, c1, c2, c3, c4, tile1, tile2, tile3, BLOCK_N)
    li = seg * split + pid_k
    n = _list_count(x_ptr, t_ptr, seg * stride_ts, pid_k * KS, K, stride_tk, idx_ptr, xv_ptr,
                    kc_ptr, li, PER_CHANNEL, KS, INLINE)
    ar = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(0, n, BLOCK_K):
        acc = _list_step(acc, w_ptr, idx_ptr, xv_ptr, li * KS, c, n, ar, cols, nmask, rm,
                         stride_wk, EVEN_N, BIG, DOT_F32)
    _seg_tail(tl.sum(acc, axis=0), part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split,
              N_TOTAL, HAS_SPLIT, BLOCK_N, RCHUNK)


@triton.jit
def sparse_gated_list_kernel(
    x_ptr, t_ptr, w_ptr, idx_ptr, xv_ptr, kc_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, split, F,
    PER_CHANNEL: tl.constexpr, INLINE: tl.constexpr,
    HAS_SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BIG: tl.constexpr, KS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Kept-row-list version of sparse_gated_gemv_kernel (list row 0: gate, row 1: up)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < F
    n_g = _list_count(x_ptr, t_ptr, 0, pid_k * KS, K, stride_tk, idx_ptr, xv_ptr, kc_ptr,
                      pid_k, PER_CHANNEL, KS, INLINE)
    n_u = _list_count(x_ptr, t_ptr, stride_ts, pid_k * KS, K, stride_tk, idx_ptr, xv_ptr, kc_ptr,
                      split + pid_k, PER_CHANNEL, KS, INLINE)
    ar = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(0, tl.maximum(n_g, n_u), BLOCK_K):
        acc_g = _list_step(acc_g, w_ptr, idx_ptr, xv_ptr, pid_k * KS, c, n_g, ar, cols, nmask,
                           rm, stride_wk, EVEN_N, BIG, DOT_F32)
        acc_u = _list_step(acc_u, w_ptr, idx_ptr, xv_ptr, (split + pid_k) * KS, c, n_u, ar,
                           F + cols, nmask, rm, stride_wk, EVEN_N, BIG, DOT_F32)
    _gated_tail(tl.sum(acc_g, axis=0), tl.sum(acc_u, axis=0), part_ptr, cnt_ptr, y_ptr, cols,
                nmask, pid_n, pid_k, split, F, HAS_SPLIT, BLOCK_N, RCHUNK)
