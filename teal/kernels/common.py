"""Triton helpers shared by every sparse-GEMV algorithm (imports Triton at top level).

Layout.  The weight is stored input-channel major, ``wt = W.t()`` of shape (K, N): row k
holds the weights of input channel k for every output column.  A program owns a K range of
input channels (split-K) times a BLOCK_N column tile.

Prologue (`load_keep`, `range_kept`): x and its TEAL keep-mask ``|x_k| > t`` (Section 4,
Eq. 2-3; scalar threshold, or one per channel for weight-informed scoring), compared in fp32.

Weight-format seam (`weight_columns`, `load_weight_tile`, `group_scales`, `scale_output`):
the only place that knows how a weight tile is stored (teal/kernels/formats.py).  A tile's
rows whose keep flag is False issue no memory transaction.  WFMT 0: dense (wt in the
activation dtype).  WFMT 1: int8 codes, one fp32 scale per output column, applied to the
fp32 sums in the epilogue (`scale_output`).  WFMT 2 (the masked loop only): int4 codes
packed two per byte along N, a bf16 (scale, bias) per group of GROUP input channels and
column: the bytes are loaded as 16-byte vectors and split into an even-column and an
odd-column plane (`int4_planes`), each tile lies in one group, its fp32 partial sums
p = sum_k x_k q_k become p * s + (sum_k x_k) * b (`group_scales`; a group's scales are read
only when the tile keeps a channel), and the two planes are interleaved once after the loop
(`interleave_columns`).  The
codes are exact in bf16/fp16 and every scale is applied in fp32, so no fp16/bf16
intermediate can overflow.  Every kernel takes (s_ptr, stride_s, WFMT, GROUP) for it.

Segments (`seg_tile`): one launch computes up to four column blocks of one buffer, each with
its own threshold (fused q/k/v); a column tile never straddles two blocks.

Split-K tail (`store_output`): with SPLIT > 1 programs along K, each program writes its fp32
partial sums to a workspace ``part[SPLIT, ncols]`` and bumps a per-column-tile arrival
counter (acq_rel atomic); the program that arrives last sums the partials in a fixed order
(deterministic), applies the epilogue (cast, or silu(gate) * up), stores y and resets its
counter to zero, so the counters stay zero between launches: one launch per projection.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_threshold(t_ptr, t_off, offs_k, kin, stride_tk, PER_CHANNEL: tl.constexpr):
    """Thresholds of channels offs_k: the scalar at t_ptr + t_off, or (PER_CHANNEL) one per
    channel with stride stride_tk (+inf outside kin, so nothing there is kept)."""
    if PER_CHANNEL:
        tk = tl.load(t_ptr + t_off + offs_k * stride_tk, mask=kin, other=float("inf"))
    else:
        tk = tl.load(t_ptr + t_off)
    return tk


@triton.jit
def load_keep(x_ptr, t_ptr, t_off, offs_k, k_end, stride_tk, PER_CHANNEL: tl.constexpr):
    """x[offs_k] (input dtype, 0 where offs_k >= k_end) and its keep-mask |x_k| > t_k
    (compared in fp32)."""
    kin = offs_k < k_end
    xr = tl.load(x_ptr + offs_k, mask=kin, other=0.0)
    tk = load_threshold(t_ptr, t_off, offs_k, kin, stride_tk, PER_CHANNEL)
    return xr, (tl.abs(xr.to(tl.float32)) > tk) & kin


@triton.jit
def masked_x(x_ptr, t_ptr, t_off, offs_k, k_end, stride_tk, PER_CHANNEL: tl.constexpr):
    """(x in fp32 with dropped channels zeroed, keep-mask): inf/nan in a dropped channel can
    never leak into the sum (0 * inf)."""
    kin = offs_k < k_end
    xk = tl.load(x_ptr + offs_k, mask=kin, other=0.0).to(tl.float32)
    tk = load_threshold(t_ptr, t_off, offs_k, kin, stride_tk, PER_CHANNEL)
    keep = (tl.abs(xk) > tk) & kin
    return tl.where(keep, xk, 0.0), keep


@triton.jit
def range_kept(x_ptr, t_ptr, t_off, k_lo, k_end, stride_tk, PER_CHANNEL: tl.constexpr,
               WARM: tl.constexpr):
    """Number of kept channels in the program's K range [k_lo, k_end), read WARM at a time.

    Besides letting a program skip a range with no kept channel, this pulls the range's x
    (and per-channel thresholds) into L1 up front, so the mask of each tile in the main loop
    is an L1 hit instead of one L2 round trip per trip.
    """
    n = 0
    for c0 in range(k_lo, k_end, WARM):
        offs = c0 + tl.arange(0, WARM)
        m = offs < k_end
        xw = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tw = load_threshold(t_ptr, t_off, offs, m, stride_tk, PER_CHANNEL)
        n += tl.sum(((tl.abs(xw) > tw) & m).to(tl.int32), axis=0)
    return n


@triton.jit
def weight_columns(cols, nmask, WFMT: tl.constexpr, BLOCK_N: tl.constexpr,
                   WALIGN: tl.constexpr):
    """(stored columns, their mask) of a program's output columns `cols` (computed once per
    program).  WFMT 0/1: the columns themselves.  WFMT 2 (int4, two columns per byte):
    the BLOCK_N / 2 bytes of the tile; its first column is even (segments have even widths)
    and its valid columns are a prefix, so byte j is valid iff column 2j is.  WALIGN (the
    host checked every tile starts on a multiple of 32 columns): the first byte is 16-byte
    aligned, which lets the loads be 16-byte vectors (the reduction hides it otherwise)."""
    if WFMT == 2:  # (one return statement: the compiler wants one return type)
        half = tl.arange(0, BLOCK_N // 2)
        c0 = tl.min(cols, axis=0) // 2
        if WALIGN:
            c0 = tl.multiple_of(c0, 16)
        n_valid = tl.sum(nmask.to(tl.int32), axis=0)
        wcols, wmask = c0 + half, 2 * half < n_valid
    else:
        wcols, wmask = cols, nmask
    return wcols, wmask


@triton.jit
def load_weight_tile(w_ptr, rows_k, wcols, wmask, stride_wk, keep,
                     EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr):
    """Weight tile of input channels rows_k (BLOCK_K,) x the columns behind `wcols`
    (`weight_columns`), as stored codes: rows with keep == False are not read (zeros).

    WFMT 0 (dense): wt[rows_k, cols] in the activation dtype.  WFMT 1 (int8): int8 codes.
    (The words kernel passes the codes viewed as int32 words.)  WFMT 2 (int4): the packed
    bytes (BLOCK_K, BLOCK_N / 2), loaded as they are (16-byte
    vectors); the caller splits the nibble planes (`int4_planes`).  Callers convert the codes
    (exactly: |code| <= 127) and apply the scales (`scale_output`, `group_scales`).
    """
    if BIG:
        rows = rows_k.to(tl.int64) * stride_wk
    else:
        rows = rows_k * stride_wk
    ptrs = w_ptr + rows[:, None] + wcols[None, :]
    if EVEN_N:
        m = keep[:, None]
    else:
        m = keep[:, None] & wmask[None, :]
    return tl.load(ptrs, mask=m, other=0)


# Integer codes to fp32 without the quarter-rate I2F conversion: for 0 <= m < 2^23 the fp32
# with bit pattern 0x4B000000 + m is exactly 2^23 + m, so an integer add (or OR) and one
# fp32 subtraction give the code exactly.
# (0x4B000000 is the bit pattern of 2^23 = 8388608.0)


@triton.jit
def int8_codes_f32(w):
    """int8 codes (any shape) as exact fp32 values (bias 128 keeps the mantissa positive)."""
    u = w.to(tl.int32) + 0x4B000080
    return u.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def int4_planes(w):
    """The codes of packed int4 bytes as exact fp32: (low nibbles = even columns, high
    nibbles = odd columns), each (BLOCK_K, BLOCK_N / 2).  Kept as two planes (no interleave
    in the loop: a join/reshape there makes the compiler load bytes one at a time)."""
    u = w.to(tl.int32)
    lo = ((u & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    hi = ((u >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return lo, hi


@triton.jit
def interleave_columns(even, odd, BLOCK_N: tl.constexpr):
    """(BLOCK_N / 2,) even-column and odd-column sums -> (BLOCK_N,) in column order (once
    per program, after the loop)."""
    return tl.reshape(tl.join(even, odd), [BLOCK_N])


@triton.jit
def group_scales(s_ptr, k0, wcols, wmask, stride_s, keep, GROUP: tl.constexpr,
                 WALIGN: tl.constexpr):
    """int4: fp32 (scale, bias) of the even and of the odd columns of byte columns `wcols`
    ((BLOCK_N / 2,) each: s_even, b_even, s_odd, b_odd; contiguous rows of the (G, 4, N / 2)
    scales) in the group holding the tile that
    starts at channel k0 (a tile never straddles two groups: BLOCK_K divides GROUP), read
    only if the tile keeps a channel."""
    n_kept = tl.max(keep.to(tl.int32), axis=0)
    sm = wmask & ((wcols * 0 + n_kept) > 0)  # (a vector mask: the interpreter needs one)
    base = s_ptr + (k0 // GROUP) * stride_s + wcols  # rows: s_even, s_odd, b_even, b_odd
    q = stride_s // 4
    if WALIGN:  # every segment starts on 32 columns, so N / 2 is a multiple of 16
        q = tl.multiple_of(q, 16)
    s_e = tl.load(base, mask=sm, other=0.0).to(tl.float32)
    s_o = tl.load(base + q, mask=sm, other=0.0).to(tl.float32)
    b_e = tl.load(base + 2 * q, mask=sm, other=0.0).to(tl.float32)
    b_o = tl.load(base + 3 * q, mask=sm, other=0.0).to(tl.float32)
    return s_e, b_e, s_o, b_o


@triton.jit
def scale_output(acc, s_ptr, cols, nmask, WFMT: tl.constexpr):
    """fp32 sums (BLOCK_N,) of the columns cols times their per-output-column weight scale:
    WFMT 1 (int8) multiplies by s[cols] in fp32; the others return acc unchanged."""
    if WFMT == 1:
        return acc * tl.load(s_ptr + cols, mask=nmask, other=0.0)
    return acc


@triton.jit
def finish(acc, acc_u, s_ptr, cols, cols_u, nmask, part_ptr, cnt_ptr, y_ptr, pid_n, pid_k, split,
           ncols, GATED: tl.constexpr, HAS_SPLIT: tl.constexpr, WFMT: tl.constexpr,
           FOLD: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr):
    """The epilogue every GEMV shares: sum the accumulators over their rows (FOLD: 2-D),
    apply per-column weight scales (`scale_output`), then `store_output`.  acc_u / cols_u
    (up's) are read only when GATED."""
    if FOLD:
        v = tl.sum(acc, axis=0)
    else:
        v = acc
    v = scale_output(v, s_ptr, cols, nmask, WFMT)
    if GATED:
        if FOLD:
            u = tl.sum(acc_u, axis=0)
        else:
            u = acc_u
        u = scale_output(u, s_ptr, cols_u, nmask, WFMT)
    else:
        u = v
    store_output(v, u, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, ncols, GATED,
                 HAS_SPLIT, BLOCK_N, RCHUNK)


@triton.jit
def seg_tile(pid_n, c1, c2, c3, c4, tile1, tile2, tile3, BLOCK_N: tl.constexpr):
    """(segment, columns, column mask) of column tile pid_n; segment s spans [c_s, c_{s+1})
    (c0 = 0) and its tiles start at tile index tile_s (tile0 = 0). Scalar arithmetic only."""
    seg = (pid_n >= tile1).to(tl.int32) + (pid_n >= tile2).to(tl.int32) + (pid_n >= tile3).to(tl.int32)
    seg_start = tl.where(seg == 0, 0, tl.where(seg == 1, c1, tl.where(seg == 2, c2, c3)))
    seg_end = tl.where(seg == 0, c1, tl.where(seg == 1, c2, tl.where(seg == 2, c3, c4)))
    t_first = tl.where(seg == 0, 0, tl.where(seg == 1, tile1, tl.where(seg == 2, tile2, tile3)))
    cols = seg_start + (pid_n - t_first) * BLOCK_N + tl.arange(0, BLOCK_N)
    return seg, cols, cols < seg_end


@triton.jit
def program_columns(pid_n, ncols, c1, c2, c3, c4, tile1, tile2, tile3, stride_ts,
                    GATED: tl.constexpr, BLOCK_N: tl.constexpr):
    """(segment, columns, column mask, threshold offset) of column tile pid_n.

    GATED: segment 0, the columns of the gate half (ncols = F; gate and up share them, up's
    threshold row is the next one); otherwise the tile's segment decides the columns and the
    threshold row (seg_tile)."""
    if GATED:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return 0, cols, cols < ncols, 0
    seg, cols, nmask = seg_tile(pid_n, c1, c2, c3, c4, tile1, tile2, tile3, BLOCK_N)
    return seg, cols, nmask, seg * stride_ts


@triton.jit
def arrive_last(cnt_ptr, pid_n, split):
    """After this program's partials are stored: True for the last of the split programs of
    column tile pid_n (acq_rel: it then sees every partial)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    return arrived == split - 1


@triton.jit
def _reduce_partials(part_ptr, stride_p, cols, nmask, split, BLOCK_N: tl.constexpr,
                     RCHUNK: tl.constexpr):
    """Sum part[0:split, cols] in a fixed order (deterministic), reading from L2 (.cg)."""
    tot = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_r = tl.arange(0, RCHUNK)
    for s0 in range(0, split, RCHUNK):
        rr = s0 + offs_r
        p = tl.load(part_ptr + rr[:, None] * stride_p + cols[None, :],
                    mask=(rr[:, None] < split) & nmask[None, :], other=0.0, cache_modifier=".cg")
        tot += tl.sum(p, axis=0)
    return tot


@triton.jit
def swiglu_epilogue(g, u, GATED: tl.constexpr):
    """The output of an fp32 sum: silu(g) * u for the gated (gate/up) GEMV, g otherwise."""
    out = g
    if GATED:
        out = g * tl.sigmoid(g) * u
    return out


@triton.jit
def store_output(acc, acc_u, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split,
                 ncols, GATED: tl.constexpr, HAS_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                 RCHUNK: tl.constexpr):
    """Store y[cols] = acc (GATED: silu(acc) * acc_u), or (split-K) this program's fp32
    partial(s); the last-arriving program sums all partials in a fixed order, stores y and
    resets its counter to zero.

    ncols: the workspace row length (N_total; GATED: F, the up partials sit at F + cols of
    rows 2F wide).
    """
    if not HAS_SPLIT:
        out = swiglu_epilogue(acc, acc_u, GATED)
        tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        if GATED:
            tl.store(part_ptr + pid_k * (2 * ncols) + cols, acc, mask=nmask)
            tl.store(part_ptr + pid_k * (2 * ncols) + ncols + cols, acc_u, mask=nmask)
        else:
            tl.store(part_ptr + pid_k * ncols + cols, acc, mask=nmask)
        if arrive_last(cnt_ptr, pid_n, split):
            if GATED:
                g = _reduce_partials(part_ptr, 2 * ncols, cols, nmask, split, BLOCK_N, RCHUNK)
                u = _reduce_partials(part_ptr, 2 * ncols, ncols + cols, nmask, split, BLOCK_N, RCHUNK)
                out = g * tl.sigmoid(g) * u
            else:
                out = _reduce_partials(part_ptr, ncols, cols, nmask, split, BLOCK_N, RCHUNK)
            tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=nmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


# --------------------------------------------------------------------------- several rows
# The "dot" kernel with MULTI: rows 0..M-1 of its accumulator are M different inputs (each
# with its own mask), so the epilogue keeps the rows apart instead of folding them.


@triton.jit
def finish_rows(acc, acc_u, s_ptr, cols, cols_u, nmask, rm, M, part_ptr, cnt_ptr, y_ptr, pid_n,
                pid_k, split, ncols, GATED: tl.constexpr, HAS_SPLIT: tl.constexpr,
                WFMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`finish` for M rows: acc / acc_u are (BLOCK_M, BLOCK_N) with row m < M the sums of
    input row m (rows >= M are not stored); per-column weight scales apply to every row."""
    v = scale_output(acc, s_ptr, cols, nmask, WFMT)
    if GATED:
        u = scale_output(acc_u, s_ptr, cols_u, nmask, WFMT)
    else:
        u = v
    store_rows(v, u, rm, M, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split, ncols,
               GATED, HAS_SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def store_rows(acc, acc_u, rm, M, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split,
               ncols, GATED: tl.constexpr, HAS_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """`store_output` for M rows: y is (M, ncols) (gated: ncols = F), the split-K workspace
    part[split, M, W] with W = ncols (gated: 2F, up's partials at F + cols).  The last
    arriving program sums the partials of split 0, 1, ... in that order (deterministic),
    applies the epilogue, stores its rows of y and resets its counter."""
    rmask = (rm < M)[:, None] & nmask[None, :]
    yoff = rm[:, None] * ncols + cols[None, :]
    if not HAS_SPLIT:
        out = swiglu_epilogue(acc, acc_u, GATED)
        tl.store(y_ptr + yoff, out.to(y_ptr.dtype.element_ty), mask=rmask)
    else:
        if GATED:
            width = 2 * ncols
        else:
            width = ncols
        poff = rm[:, None] * width + cols[None, :]
        tl.store(part_ptr + pid_k * (M * width) + poff, acc, mask=rmask)
        if GATED:
            tl.store(part_ptr + pid_k * (M * width) + ncols + poff, acc_u, mask=rmask)
        if arrive_last(cnt_ptr, pid_n, split):
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, split):
                p = part_ptr + s * (M * width) + poff
                g += tl.load(p, mask=rmask, other=0.0, cache_modifier=".cg")
                if GATED:
                    u += tl.load(p + ncols, mask=rmask, other=0.0, cache_modifier=".cg")
            out = swiglu_epilogue(g, u, GATED)
            tl.store(y_ptr + yoff, out.to(y_ptr.dtype.element_ty), mask=rmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")
