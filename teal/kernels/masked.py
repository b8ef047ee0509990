"""Algorithm "mask": the masked slab loop on CUDA cores (imports Triton).

A program walks its K range BLOCK_K input channels at a time: load x, compute the keep-mask,
load the weight rows only where it is set (a masked row issues no memory transaction), and
multiply-accumulate in fp32.  PIPE 1 computes the next step's mask while the current rows
load; PIPE 2 also issues the next step's weight tile (register double buffer): Triton does
not software-pipeline loads that do not feed a tl.dot, so this is done by hand.  ACC2D keeps
a (BLOCK_K, BLOCK_N) fp32 accumulator reduced once at the end.  One kernel serves column
segments (single projection, fused q/k/v) and, with GATED, gate/up with the SwiGLU epilogue.

Measured (notes/kernels.md): the winner on small shapes and on Llama-2's fused q/k/v
(4096 x 12288); the tensor-core "dot" algorithm wins the other Llama shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (finish, group_scales, int4_planes, int8_codes_f32, interleave_columns,
                     load_weight_tile, masked_x, program_columns, weight_columns)


@triton.jit
def _accum(acc, acc_o, w, xk, s_ptr, k0, wcols, wmask, stride_s, keep, ACC2D: tl.constexpr,
           WFMT: tl.constexpr, GROUP: tl.constexpr, WALIGN: tl.constexpr):
    """(acc, acc_o) += the tile's products in fp32.  int4 (WFMT 2): acc / acc_o hold the even /
    odd columns, each plane's codes times the group's scale plus the group's bias times x
    (`group_scales`); other formats: acc only (acc_o passes through)."""
    if WFMT == 2:
        q_e, q_o = int4_planes(w)
        s_e, b_e, s_o, b_o = group_scales(s_ptr, k0, wcols, wmask, stride_s, keep, GROUP, WALIGN)
        xc = xk[:, None]
        if ACC2D:
            acc += (q_e * s_e[None, :] + b_e[None, :]) * xc
            acc_o += (q_o * s_o[None, :] + b_o[None, :]) * xc
        else:
            xs = tl.sum(xk, axis=0)
            acc += tl.sum(q_e * xc, axis=0) * s_e + xs * b_e
            acc_o += tl.sum(q_o * xc, axis=0) * s_o + xs * b_o
    else:
        if WFMT == 1:
            prod = int8_codes_f32(w) * xk[:, None]
        else:
            prod = w.to(tl.float32) * xk[:, None]
        if ACC2D:
            acc += prod
        else:
            acc += tl.sum(prod, axis=0)
    return acc, acc_o


@triton.jit
def _columns(acc, acc_o, WFMT: tl.constexpr, ACC2D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_N,) sums in column order (int4: the two planes interleaved) and whether
    they still need folding over rows."""
    if WFMT == 2:
        if ACC2D:
            acc = tl.sum(acc, axis=0)
            acc_o = tl.sum(acc_o, axis=0)
        out = interleave_columns(acc, acc_o, BLOCK_N)
    else:
        out = acc
    return out


@triton.jit
def masked_gemv_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, ncols,
    c1, c2, c3, c4, tile1, tile2, tile3, s_ptr, stride_s,
    GATED: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    WALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    PIPE: tl.constexpr, ACC2D: tl.constexpr, ACC_N: tl.constexpr,
):
    """y[cols] = sum_k keep(k) x_k wt[k, cols] (GATED: silu(gate) * up, up = wt[:, F + cols])."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    _, cols, nmask, t_off = program_columns(pid_n, ncols, c1, c2, c3, c4, tile1, tile2, tile3, stride_ts,
                                         GATED, BLOCK_N)
    k_lo = pid_k * k_per_split
    k_end = tl.minimum(K, k_lo + k_per_split)
    ar = tl.arange(0, BLOCK_K)
    cols_u = ncols + cols  # up's columns (GATED)
    wcols, wmask = weight_columns(cols, nmask, WFMT, BLOCK_N, WALIGN)
    wcols_u, _ = weight_columns(cols_u, nmask, WFMT, BLOCK_N, WALIGN)
    # accumulators: ACC_N columns (int4: BLOCK_N / 2 per nibble plane, *_o the odd columns)
    if ACC2D:
        acc = tl.zeros([BLOCK_K, ACC_N], dtype=tl.float32)
    else:
        acc = tl.zeros([ACC_N], dtype=tl.float32)
    acc_u = tl.zeros_like(acc)
    if WFMT == 2:
        acc_o = tl.zeros_like(acc)
        acc_uo = tl.zeros_like(acc)
    else:
        acc_o = 0.0
        acc_uo = 0.0
    xk, keep = masked_x(x_ptr, t_ptr, t_off, k_lo + ar, k_end, stride_tk, PER_CHANNEL)
    if GATED:
        xu, ku = masked_x(x_ptr, t_ptr, t_off + stride_ts, k_lo + ar, k_end, stride_tk, PER_CHANNEL)
    if PIPE == 2:
        w = load_weight_tile(w_ptr, k_lo + ar, wcols, wmask, stride_wk, keep, EVEN_N, BIG, WFMT)
        if GATED:
            wu = load_weight_tile(w_ptr, k_lo + ar, wcols_u, wmask, stride_wk, ku, EVEN_N, BIG, WFMT)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        if PIPE == 1:
            w = load_weight_tile(w_ptr, k0 + ar, wcols, wmask, stride_wk, keep, EVEN_N, BIG, WFMT)
            if GATED:
                wu = load_weight_tile(w_ptr, k0 + ar, wcols_u, wmask, stride_wk, ku, EVEN_N, BIG, WFMT)
            xn, kn = masked_x(x_ptr, t_ptr, t_off, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            if GATED:
                xun, kun = masked_x(x_ptr, t_ptr, t_off + stride_ts, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            acc, acc_o = _accum(acc, acc_o, w, xk, s_ptr, k0, wcols, wmask, stride_s, keep, ACC2D,
                                WFMT, GROUP, WALIGN)
            if GATED:
                acc_u, acc_uo = _accum(acc_u, acc_uo, wu, xu, s_ptr, k0, wcols_u, wmask, stride_s,
                                        ku, ACC2D, WFMT, GROUP, WALIGN)
                xu, ku = xun, kun
            xk, keep = xn, kn
        else:
            xn, kn = masked_x(x_ptr, t_ptr, t_off, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            if GATED:
                xun, kun = masked_x(x_ptr, t_ptr, t_off + stride_ts, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            wn = load_weight_tile(w_ptr, k0 + BLOCK_K + ar, wcols, wmask, stride_wk, kn, EVEN_N,
                                  BIG, WFMT)
            if GATED:
                wun = load_weight_tile(w_ptr, k0 + BLOCK_K + ar, wcols_u, wmask, stride_wk, kun,
                                       EVEN_N, BIG, WFMT)
            acc, acc_o = _accum(acc, acc_o, w, xk, s_ptr, k0, wcols, wmask, stride_s, keep, ACC2D,
                                WFMT, GROUP, WALIGN)
            if GATED:
                acc_u, acc_uo = _accum(acc_u, acc_uo, wu, xu, s_ptr, k0, wcols_u, wmask, stride_s,
                                        ku, ACC2D, WFMT, GROUP, WALIGN)
                xu, ku, wu = xun, kun, wun
            xk, keep, w = xn, kn, wn
    if WFMT == 2:
        acc = _columns(acc, acc_o, WFMT, ACC2D, BLOCK_N)
        if GATED:
            acc_u = _columns(acc_u, acc_uo, WFMT, ACC2D, BLOCK_N)
        finish(acc, acc_u, s_ptr, cols, cols_u, nmask, part_ptr, cnt_ptr, y_ptr, pid_n, pid_k,
               split, ncols, GATED, HAS_SPLIT, WFMT, False, BLOCK_N, RCHUNK)
    else:
        finish(acc, acc_u, s_ptr, cols, cols_u, nmask, part_ptr, cnt_ptr, y_ptr, pid_n, pid_k,
               split, ncols, GATED, HAS_SPLIT, WFMT, ACC2D, BLOCK_N, RCHUNK)


def launch(plan, lc) -> None:
    """Launch over `plan` (teal.kernels.launch.Plan) with the resolved launch `lc`."""
    acc_n = plan.meta["BLOCK_N"] // 2 if plan.meta["WFMT"] == 2 else plan.meta["BLOCK_N"]
    masked_gemv_kernel[plan.grid](*plan.args, **plan.meta, PIPE=lc.pipe, ACC2D=bool(lc.acc2d),
                                  ACC_N=acc_n, num_warps=lc.num_warps, num_stages=lc.num_stages)
