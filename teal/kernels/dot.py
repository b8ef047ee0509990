"""Algorithm "dot": the sparse GEMV as tensor-core tiles (imports Triton).

Triton software-pipelines (cp.async ring buffers in shared memory, num_stages deep) only the
loads that feed ``tl.dot``.  So the GEMV is written as a [BLOCK_M, BLOCK_K] x [BLOCK_K,
BLOCK_N] product whose A operand holds the masked x in row 0 and zeros elsewhere (BLOCK_M =
16, the smallest MMA tile: the extra rows cost tensor-core cycles, not bytes).  The weight
tile is loaded with the keep-mask as its row mask: a dropped row is a zero-filled async copy
(no DRAM read), so bytes follow the kept rows while num_stages tiles stay in flight per
program.  A prologue (`range_kept`) reads the program's x range into L1 and skips ranges
with no kept channel.

Several rows (MULTI, 1 < M <= BLOCK_M; batch decoding, speculative verification): row m of
A holds input row m with the channels *that row* drops zeroed, so each output row is its
own masked GEMV; the weight tile's row mask is the union of the M rows' keep-masks (a weight
row is read once if any row keeps it), and the epilogue (`finish_rows`) stores M rows.
M = 1 (MULTI False) is the one-row kernel unchanged.

Numerics: bf16/fp16 products are exact in fp32 and accumulate in fp32; rows M..BLOCK_M-1
of the accumulator are exact zeros.  Deterministic (fixed order, same split-K tail).
Measured (notes/kernels.md): the winner on the Llama shapes below ~80% sparsity.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (finish, finish_rows, load_keep, load_threshold, load_weight_tile,
                     program_columns, range_kept, weight_columns)

BLOCK_M = 16  # rows of the A operand (smallest MMA tile; x in row 0, or M <= 16 input rows)


@triton.jit
def mma(acc, a, w, DOT_F32: tl.constexpr):
    """acc + a @ w.  DOT_F32 (the CPU interpreter, whose bf16 dot is broken): the same exact
    products in fp32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w, acc)


@triton.jit
def _dot_step(acc, x_ptr, w_ptr, s_ptr, t_ptr, t_off, k0, offs_k, k_end, cols, wcols, wmask, nmask,
              rm, stride_wk, stride_s, stride_tk, PER_CHANNEL: tl.constexpr, EVEN_N: tl.constexpr,
              BIG: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] += A(masked x in row 0) @ wt[offs_k, cols] (dropped rows not read);
    dense or int8 weights (int8 scales applied in the epilogue)."""
    tl.static_assert(WFMT != 2, "the tensor-core GEMV takes dense or int8 weights")
    xr, keep = load_keep(x_ptr, t_ptr, t_off, offs_k, k_end, stride_tk, PER_CHANNEL)
    w = load_weight_tile(w_ptr, offs_k, wcols, wmask, stride_wk, keep, EVEN_N, BIG, WFMT)
    w = w.to(tl.float32).to(xr.dtype)  # int8 codes: exact in bf16 / fp16
    a = tl.where((rm[:, None] == 0) & keep[None, :], xr[None, :], 0.0).to(xr.dtype)
    return mma(acc, a, w, DOT_F32)


@triton.jit
def _dot_step_rows(acc, x_ptr, w_ptr, t_ptr, t_off, offs_k, k_end, wcols, wmask, rm, M,
                   stride_xm, stride_wk, stride_tk, PER_CHANNEL: tl.constexpr,
                   EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr,
                   DOT_F32: tl.constexpr, MROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] += A @ wt[offs_k, cols] where row m < M of A is input row m
    masked by its own |x[m, k]| > t_k; weight rows no input row keeps are not read.

    The MROWS (>= M, a power of two) input rows are read as MROWS one-row vector loads, like
    the one-row step, so the weight tile's mask derives from plain vector loads and the tile
    stays software-pipelined (a 2-D x load reduced to the union mask measured 2-3x slower at
    every sparsity, bench_gemv --rows at ebc9ebd)."""
    tl.static_assert(WFMT != 2, "the tensor-core GEMV takes dense or int8 weights")
    kin = offs_k < k_end
    tk = load_threshold(t_ptr, t_off, offs_k, kin, stride_tk, PER_CHANNEL)
    keep_any = offs_k < 0
    a = tl.zeros([BLOCK_M, BLOCK_K], dtype=x_ptr.dtype.element_ty)
    for m in tl.static_range(MROWS):
        inm = kin & ((offs_k * 0 + m) < M)  # (a tensor compare: an int1 mask everywhere)
        xm = tl.load(x_ptr + m * stride_xm + offs_k, mask=inm, other=0.0)
        km = (tl.abs(xm.to(tl.float32)) > tk) & inm
        keep_any = keep_any | km
        a = tl.where((rm[:, None] == m) & km[None, :], xm[None, :], a)
    w = load_weight_tile(w_ptr, offs_k, wcols, wmask, stride_wk, keep_any, EVEN_N, BIG, WFMT)
    w = w.to(tl.float32).to(a.dtype)  # int8 codes: exact in bf16 / fp16
    return mma(acc, a, w, DOT_F32)


@triton.jit
def dot_gemv_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, ncols,
    c1, c2, c3, c4, tile1, tile2, tile3, s_ptr, stride_s,
    GATED: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    WALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr, WARM: tl.constexpr,
    M, stride_xm, MULTI: tl.constexpr, MROWS: tl.constexpr,
):
    """Tensor-core version of masked_gemv_kernel (same math, same outputs).

    MULTI: x is (M, K) with row stride stride_xm, y (M, ncols), the workspace
    (split, M, ncols) (gated: (split, M, 2F)), MROWS the power of two >= M the main loop is
    compiled for; otherwise M, stride_xm and MROWS are unused."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    _, cols, nmask, t_off = program_columns(pid_n, ncols, c1, c2, c3, c4, tile1, tile2, tile3, stride_ts,
                                         GATED, BLOCK_N)
    cols_u = ncols + cols  # up's columns (GATED)
    k_lo = pid_k * k_per_split
    k_end = tl.minimum(K, k_lo + k_per_split)
    ar = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    wcols, wmask = weight_columns(cols, nmask, WFMT, BLOCK_N, WALIGN)
    wcols_u, _ = weight_columns(cols_u, nmask, WFMT, BLOCK_N, WALIGN)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_stop = k_lo + k_per_split
    if WARM > 0:
        if MULTI:  # kept channels of any row (each row's x range pulled into L1)
            n_kept = 0
            for m in range(0, M):
                n_kept += range_kept(x_ptr + m * stride_xm, t_ptr, t_off, k_lo, k_end,
                                     stride_tk, PER_CHANNEL, WARM)
                if GATED:
                    n_kept += range_kept(x_ptr + m * stride_xm, t_ptr, t_off + stride_ts, k_lo,
                                         k_end, stride_tk, PER_CHANNEL, WARM)
        else:
            n_kept = range_kept(x_ptr, t_ptr, t_off, k_lo, k_end, stride_tk, PER_CHANNEL, WARM)
            if GATED:
                n_kept += range_kept(x_ptr, t_ptr, t_off + stride_ts, k_lo, k_end, stride_tk,
                                     PER_CHANNEL, WARM)
        k_stop = tl.where(n_kept > 0, k_stop, k_lo)
    if MULTI:
        for k0 in range(k_lo, k_stop, BLOCK_K):
            acc = _dot_step_rows(acc, x_ptr, w_ptr, t_ptr, t_off, k0 + ar, k_end, wcols, wmask,
                                 rm, M, stride_xm, stride_wk, stride_tk, PER_CHANNEL, EVEN_N,
                                 BIG, WFMT, DOT_F32, MROWS, BLOCK_M, BLOCK_K)
            if GATED:
                acc_u = _dot_step_rows(acc_u, x_ptr, w_ptr, t_ptr, t_off + stride_ts, k0 + ar,
                                       k_end, wcols_u, wmask, rm, M, stride_xm, stride_wk,
                                       stride_tk, PER_CHANNEL, EVEN_N, BIG, WFMT, DOT_F32, MROWS,
                                       BLOCK_M, BLOCK_K)
        finish_rows(acc, acc_u, s_ptr, cols, cols_u, nmask, rm, M, part_ptr, cnt_ptr, y_ptr,
                    pid_n, pid_k, split, ncols, GATED, HAS_SPLIT, WFMT, BLOCK_M, BLOCK_N)
        return
    for k0 in range(k_lo, k_stop, BLOCK_K):
        acc = _dot_step(acc, x_ptr, w_ptr, s_ptr, t_ptr, t_off, k0, k0 + ar, k_end, cols, wcols,
                        wmask, nmask, rm, stride_wk, stride_s, stride_tk, PER_CHANNEL, EVEN_N, BIG,
                        WFMT, GROUP, DOT_F32)
        if GATED:
            acc_u = _dot_step(acc_u, x_ptr, w_ptr, s_ptr, t_ptr, t_off + stride_ts, k0, k0 + ar,
                              k_end, cols_u, wcols_u, wmask, nmask, rm, stride_wk, stride_s,
                              stride_tk, PER_CHANNEL, EVEN_N, BIG, WFMT, GROUP, DOT_F32)
    finish(acc, acc_u, s_ptr, cols, cols_u, nmask, part_ptr, cnt_ptr, y_ptr, pid_n, pid_k, split,
           ncols, GATED, HAS_SPLIT, WFMT, True, BLOCK_N, RCHUNK)


def rows_bucket(rows: int) -> int:
    """The power of two >= rows (1, 2, 4, 8, 16) the several-row main loop is compiled for."""
    return 1 << max(0, rows - 1).bit_length()


def launch(plan, lc) -> None:
    """Launch over `plan` (teal.kernels.launch.Plan) with the resolved launch `lc`."""
    dot_gemv_kernel[plan.grid](*plan.args, **plan.meta, BLOCK_M=BLOCK_M, DOT_F32=plan.interpreted,
                               WARM=lc.warm, M=plan.rows, stride_xm=plan.stride_xm,
                               MULTI=plan.rows > 1, MROWS=rows_bucket(plan.rows),
                               num_warps=lc.num_warps, num_stages=lc.num_stages)
