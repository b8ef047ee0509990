"""Algorithm "words": int8 / int4 weights on CUDA cores, 32-bit words split into bit planes
(imports Triton).

Why.  A quantized GEMV at batch 1 reads 0.5 (int4) or 1 (int8) byte per multiply-add, so on
an H200 (about 4.3 TB/s, about 33e12 fp32 lane-instructions/s) it has only ~4 (int4) or ~8
(int8) instructions per code to spend before it is instruction-bound.  This kernel spends
about 3.3: per code one LOP3 (mask the code in place and OR in the exponent of 2^23), one
FADD (subtract 2^23: the code times a power of two, exactly) and one FFMA.

Layout.  The codes are read as 32-bit words: int8 4 codes per word (byte b of word w is
column 4w + b), int4 8 (nibble p of word w is column 8w + p; teal.quant packs two per byte
along N, low nibble first).  A program owns BW = BLOCK_N / codes-per-word words of each row
of its K range; its NW = num_warps warps take different rows (warp j: rows k0 + i * NW + j,
i < BLOCK_K / NW per step) and its threads 16-byte vectors of 4 words, so each plane's
[NW, BW] fp32 accumulator is updated by one FFMA per code and summed across warps once per
program.  Plane p of a word is the code at its place in the word:
(word & mask_p) | 0x4B000000 is exactly the float 2^23 + code * 2^(shift_p) for codes below
bit 23 (int8 bytes 2 and 3 and int4 nibbles 5..7 come from the word shifted right by 16);
the power of two 2^(shift_p) is folded into the plane's scale.  int8 codes are signed:
XOR 0x80 per byte makes them code + 128 (the FADD removes the 128 as well).

Scales, in fp32.  int8: per output column, applied once to the fp32 sums (`scale_output`).
int4: per group of GROUP input channels; the program's K range is a whole number of groups,
each group's raw sums p = sum_k x_k q_k are scaled once, p * s + (sum_k x_k) * b, and the
group's (scale, bias) rows are read only when the group keeps a channel.

Gate/up (GATED): program n < T computes gate tile n, program T + n the up tile n (T tiles of
BLOCK_N columns of F); both write fp32 partials and count on tile n's arrival counter; the last
of the 2 x SPLIT programs sums gate and up in a fixed order and stores silu(gate) * up.

Dropped rows (|x| <= t) are never loaded (masked loads); their instructions are still spent.
Deterministic (fixed order).  Measured: notes/kernels.md, "The words kernel".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (_reduce_partials, arrive_last, load_weight_tile, masked_x, program_columns,
                     scale_output, store_output)

_MAGIC = 0x4B000000  # the bit pattern of 2^23 (a kernel argument: see `_plane`)
_X80 = tl.constexpr(-2139062144)  # 0x80808080 as int32: flips the sign bit of every byte


@triton.jit
def _plane(u, magic, MASK: tl.constexpr, BIAS: tl.constexpr):
    """(u & MASK) as fp32, exactly: OR the exponent of 2^23 (`magic`, 0x4B000000, a runtime
    value so that the AND and the OR compile to one LOP3: it takes one immediate), subtract
    BIAS (2^23 + offset)."""
    return ((u & MASK) | magic).to(tl.float32, bitcast=True) - BIAS


@triton.jit
def _zeros8(NW: tl.constexpr, BW: tl.constexpr):
    """Eight [NW, BW] fp32 zero accumulators (one per int4 nibble plane)."""
    z = tl.zeros([NW, BW], dtype=tl.float32)
    return z, z, z, z, z, z, z, z


@triton.jit
def _int4_scales(s_ptr, g, stride_s, words, wmask, kept, P: tl.constexpr, FACTOR: tl.constexpr):
    """int4 (scale / 2^shift_p, bias) of plane P for `words` in group g, fp32 ([BW] each);
    the scales are (G, 4, N / 2) bf16, rows s_even, s_odd, b_even, b_odd by byte column
    (plane P of word w is byte column 4w + P // 2, parity P % 2)."""
    q = stride_s // 4
    base = s_ptr + g * stride_s + 4 * words + (P // 2)
    m = wmask & kept
    s = tl.load(base + (P % 2) * q, mask=m, other=0.0).to(tl.float32) * (1.0 / FACTOR)
    b = tl.load(base + (2 + P % 2) * q, mask=m, other=0.0).to(tl.float32)
    return s, b


@triton.jit
def _int8_step(a0, a1, a2, a3, c, x3, magic):
    """Accumulate the 4 byte planes of int8 code words c (x3: x broadcast over the words)."""
    u = c ^ _X80
    v = u >> 16
    a0 += _plane(u, magic, 0xFF, 8388736.0) * x3
    a1 += _plane(u, magic, 0xFF00, 8421376.0) * x3
    a2 += _plane(v, magic, 0xFF, 8388736.0) * x3
    a3 += _plane(v, magic, 0xFF00, 8421376.0) * x3
    return a0, a1, a2, a3


@triton.jit
def _int4_step(p0, p1, p2, p3, p4, p5, p6, p7, c, x3, magic):
    """Accumulate the 8 nibble planes of int4 code words c (raw codes times 2^shift_p)."""
    v = c >> 16
    p0 += _plane(c, magic, 0xF, 8388608.0) * x3
    p1 += _plane(c, magic, 0xF0, 8388608.0) * x3
    p2 += _plane(c, magic, 0xF00, 8388608.0) * x3
    p3 += _plane(c, magic, 0xF000, 8388608.0) * x3
    p4 += _plane(c, magic, 0xF0000, 8388608.0) * x3
    p5 += _plane(v, magic, 0xF0, 8388608.0) * x3
    p6 += _plane(v, magic, 0xF00, 8388608.0) * x3
    p7 += _plane(v, magic, 0xF000, 8388608.0) * x3
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _scaled(acc, p, xs, s_ptr, g, stride_s, words, wmask, kept, P: tl.constexpr,
            FACTOR: tl.constexpr):
    """acc + p * s + (sum x) * b for plane P of group g."""
    s, b = _int4_scales(s_ptr, g, stride_s, words, wmask, kept, P, FACTOR)
    return acc + p * s[None, :] + xs[:, None] * b[None, :]


@triton.jit
def _interleave4(a0, a1, a2, a3, BLOCK_N: tl.constexpr):
    """Planes (BW,) of bytes 0..3 -> (4 BW,) columns 4w + b."""
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [BLOCK_N])


@triton.jit
def _interleave8(a0, a1, a2, a3, a4, a5, a6, a7, BLOCK_N: tl.constexpr):
    """Planes (BW,) of nibbles 0..7 -> (8 BW,) columns 8w + p."""
    lo = tl.join(tl.join(a0, a4), tl.join(a2, a6))
    hi = tl.join(tl.join(a1, a5), tl.join(a3, a7))
    return tl.reshape(tl.join(lo, hi), [BLOCK_N])


@triton.jit
def words_gemv_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, ncols,
    c1, c2, c3, c4, tile1, tile2, tile3, s_ptr, stride_s, magic,
    GATED: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    WALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    NW: tl.constexpr,
):
    """y[cols] = sum_k keep(k) x_k dequant(w)[k, cols] (GATED: silu(gate) * up) for int8
    (WFMT 1) or int4 (WFMT 2) code words; w_ptr is the codes viewed as int32, stride_wk in
    words."""
    tl.static_assert(WFMT != 0, "the words GEMV takes int8 or int4 weights")
    CPW: tl.constexpr = 4 if WFMT == 1 else 8  # codes per word
    BW: tl.constexpr = BLOCK_N // CPW
    U: tl.constexpr = BLOCK_K // NW  # rows per warp per step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GATED:
        n_tiles = tl.cdiv(ncols, BLOCK_N)
        half = (pid_n >= n_tiles).to(tl.int32)  # 0: gate, 1: up
        tile = pid_n - half * n_tiles
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < ncols
        t_off = half * stride_ts
        c0 = tile * BLOCK_N + half * ncols  # first stored column (up: F + ...)
        n_valid = ncols - tile * BLOCK_N
    else:
        _, cols, nmask, t_off = program_columns(pid_n, ncols, c1, c2, c3, c4, tile1, tile2,
                                                tile3, stride_ts, False, BLOCK_N)
        c0 = tl.min(cols, axis=0)
        n_valid = tl.sum(nmask.to(tl.int32), axis=0)
        tile = pid_n
    lw = tl.arange(0, BW)
    w0 = c0 // CPW
    if WALIGN:  # every tile starts on 32 columns: 16-byte aligned words, 16-byte loads
        w0 = tl.multiple_of(w0, 4)
    words = w0 + lw
    wmask = lw * CPW < n_valid
    rw = tl.arange(0, NW)  # warp j takes rows k0 + i * NW + j
    k_lo = pid_k * k_per_split
    k_end = tl.minimum(K, k_lo + k_per_split)
    if WFMT == 1:
        a0 = tl.zeros([NW, BW], dtype=tl.float32)
        a1 = tl.zeros_like(a0)
        a2 = tl.zeros_like(a0)
        a3 = tl.zeros_like(a0)
        for k0 in range(k_lo, k_end, BLOCK_K):
            for i in tl.static_range(U):
                r = k0 + i * NW + rw
                xk, keep = masked_x(x_ptr, t_ptr, t_off, r, k_end, stride_tk, PER_CHANNEL)
                c = load_weight_tile(w_ptr, r, words, wmask, stride_wk, keep, EVEN_N, BIG, WFMT)
                a0, a1, a2, a3 = _int8_step(a0, a1, a2, a3, c, xk[:, None], magic)
        out = _interleave4(tl.sum(a0, axis=0), tl.sum(a1, axis=0) * (1.0 / 256),
                           tl.sum(a2, axis=0), tl.sum(a3, axis=0) * (1.0 / 256), BLOCK_N)
        out = scale_output(out, s_ptr, c0 + tl.arange(0, BLOCK_N), nmask, WFMT)
    else:
        a0, a1, a2, a3, a4, a5, a6, a7 = _zeros8(NW, BW)
        for g0 in range(k_lo, k_end, GROUP):
            p0, p1, p2, p3, p4, p5, p6, p7 = _zeros8(NW, BW)
            xs = tl.zeros([NW], dtype=tl.float32)
            nk = tl.zeros([NW], dtype=tl.int32)
            for k0 in range(g0, g0 + GROUP, BLOCK_K):
                for i in tl.static_range(U):
                    r = k0 + i * NW + rw
                    xk, keep = masked_x(x_ptr, t_ptr, t_off, r, k_end, stride_tk, PER_CHANNEL)
                    c = load_weight_tile(w_ptr, r, words, wmask, stride_wk, keep, EVEN_N, BIG, WFMT)
                    p0, p1, p2, p3, p4, p5, p6, p7 = _int4_step(p0, p1, p2, p3, p4, p5, p6,
                                                                p7, c, xk[:, None], magic)
                    xs += xk
                    nk += keep.to(tl.int32)
            g = g0 // GROUP
            kept = (lw * 0 + tl.sum(nk, axis=0)) > 0  # (a vector mask: the interpreter needs one)
            a0 = _scaled(a0, p0, xs, s_ptr, g, stride_s, words, wmask, kept, 0, 1.0)
            a1 = _scaled(a1, p1, xs, s_ptr, g, stride_s, words, wmask, kept, 1, 16.0)
            a2 = _scaled(a2, p2, xs, s_ptr, g, stride_s, words, wmask, kept, 2, 256.0)
            a3 = _scaled(a3, p3, xs, s_ptr, g, stride_s, words, wmask, kept, 3, 4096.0)
            a4 = _scaled(a4, p4, xs, s_ptr, g, stride_s, words, wmask, kept, 4, 65536.0)
            a5 = _scaled(a5, p5, xs, s_ptr, g, stride_s, words, wmask, kept, 5, 16.0)
            a6 = _scaled(a6, p6, xs, s_ptr, g, stride_s, words, wmask, kept, 6, 256.0)
            a7 = _scaled(a7, p7, xs, s_ptr, g, stride_s, words, wmask, kept, 7, 4096.0)
        out = _interleave8(tl.sum(a0, axis=0), tl.sum(a1, axis=0), tl.sum(a2, axis=0),
                           tl.sum(a3, axis=0), tl.sum(a4, axis=0), tl.sum(a5, axis=0),
                           tl.sum(a6, axis=0), tl.sum(a7, axis=0), BLOCK_N)
    if GATED:
        row = 2 * ncols
        tl.store(part_ptr + pid_k * row + half * ncols + cols, out, mask=nmask)
        if arrive_last(cnt_ptr, tile, 2 * split):
            gsum = _reduce_partials(part_ptr, row, cols, nmask, split, BLOCK_N, RCHUNK)
            usum = _reduce_partials(part_ptr, row, ncols + cols, nmask, split, BLOCK_N, RCHUNK)
            tl.store(y_ptr + cols, (gsum * tl.sigmoid(gsum) * usum).to(y_ptr.dtype.element_ty),
                     mask=nmask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        store_output(out, out, part_ptr, cnt_ptr, y_ptr, cols, nmask, pid_n, pid_k, split,
                     ncols, False, HAS_SPLIT, BLOCK_N, RCHUNK)


def launch(plan, lc) -> None:
    """Launch over `plan` (teal.kernels.launch.Plan) with the resolved launch `lc`: the codes
    as int32 words (stride in words); gated calls get 2 x the column tiles."""
    args = list(plan.args)
    w = args[1]
    args[1] = w.view(torch.int32)
    args[7] = args[1].stride(0)
    grid = (plan.grid[0] * (2 if plan.meta["GATED"] else 1), plan.grid[1])
    meta = dict(plan.meta, HAS_SPLIT=plan.grid[1] > 1 or plan.meta["GATED"])
    words_gemv_kernel[grid](*args, _MAGIC, **meta, NW=lc.num_warps, num_warps=lc.num_warps, num_stages=1)
