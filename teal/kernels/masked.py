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

from .common import (finish, group_scales, load_threshold, load_weight_tile, program_columns,
                     weight_columns)


@triton.jit
def _masked_x(x_ptr, t_ptr, t_off, offs_k, k_end, stride_tk, PER_CHANNEL: tl.constexpr):
    """(x in fp32 with dropped channels zeroed, keep-mask): inf/nan in a dropped channel can
    never leak into the sum (0 * inf)."""
    kin = offs_k < k_end
    xk = tl.load(x_ptr + offs_k, mask=kin, other=0.0).to(tl.float32)
    tk = load_threshold(t_ptr, t_off, offs_k, kin, stride_tk, PER_CHANNEL)
    keep = (tl.abs(xk) > tk) & kin
    return tl.where(keep, xk, 0.0), keep


@triton.jit
def _accum(acc, w, xk, s_ptr, k0, cols, nmask, stride_s, keep, ACC2D: tl.constexpr,
           WFMT: tl.constexpr, GROUP: tl.constexpr):
    """acc += the tile's products in fp32 (int4: its codes times the group's scale plus the
    group's bias times x, `group_scales`)."""
    prod = w.to(tl.float32) * xk[:, None]
    if WFMT == 2:
        s, b = group_scales(s_ptr, k0, cols, nmask, stride_s, keep, WFMT, GROUP)
        if ACC2D:
            acc += prod * s[None, :] + xk[:, None] * b[None, :]
        else:
            acc += tl.sum(prod, axis=0) * s + tl.sum(xk, axis=0) * b
    elif ACC2D:
        acc += prod
    else:
        acc += tl.sum(prod, axis=0)
    return acc


@triton.jit
def masked_gemv_kernel(
    x_ptr, w_ptr, t_ptr, part_ptr, cnt_ptr, y_ptr,
    K, stride_wk, stride_ts, stride_tk, k_per_split, split, ncols,
    c1, c2, c3, c4, tile1, tile2, tile3, s_ptr, stride_s,
    GATED: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, BIG: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RCHUNK: tl.constexpr,
    PIPE: tl.constexpr, ACC2D: tl.constexpr,
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
    wcols, wmask = weight_columns(cols, nmask, WFMT, BLOCK_N)
    wcols_u, _ = weight_columns(cols_u, nmask, WFMT, BLOCK_N)
    if ACC2D:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros_like(acc)
    xk, keep = _masked_x(x_ptr, t_ptr, t_off, k_lo + ar, k_end, stride_tk, PER_CHANNEL)
    if GATED:
        xu, ku = _masked_x(x_ptr, t_ptr, t_off + stride_ts, k_lo + ar, k_end, stride_tk, PER_CHANNEL)
    if PIPE == 2:
        w = load_weight_tile(w_ptr, k_lo + ar, wcols, wmask, stride_wk, keep, EVEN_N, BIG, WFMT)
        if GATED:
            wu = load_weight_tile(w_ptr, k_lo + ar, wcols_u, wmask, stride_wk, ku, EVEN_N, BIG, WFMT)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        if PIPE == 1:
            w = load_weight_tile(w_ptr, k0 + ar, wcols, wmask, stride_wk, keep, EVEN_N, BIG, WFMT)
            if GATED:
                wu = load_weight_tile(w_ptr, k0 + ar, wcols_u, wmask, stride_wk, ku, EVEN_N, BIG, WFMT)
            xn, kn = _masked_x(x_ptr, t_ptr, t_off, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            if GATED:
                xun, kun = _masked_x(x_ptr, t_ptr, t_off + stride_ts, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            acc = _accum(acc, w, xk, s_ptr, k0, cols, nmask, stride_s, keep, ACC2D, WFMT, GROUP)
            if GATED:
                acc_u = _accum(acc_u, wu, xu, s_ptr, k0, cols_u, nmask, stride_s, ku, ACC2D, WFMT,
                                   GROUP)
                xu, ku = xun, kun
            xk, keep = xn, kn
        else:
            xn, kn = _masked_x(x_ptr, t_ptr, t_off, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            if GATED:
                xun, kun = _masked_x(x_ptr, t_ptr, t_off + stride_ts, k0 + BLOCK_K + ar, k_end, stride_tk, PER_CHANNEL)
            wn = load_weight_tile(w_ptr, k0 + BLOCK_K + ar, wcols, wmask, stride_wk, kn, EVEN_N,
                                  BIG, WFMT)
            if GATED:
                wun = load_weight_tile(w_ptr, k0 + BLOCK_K + ar, wcols_u, wmask, stride_wk, kun,
                                       EVEN_N, BIG, WFMT)
            acc = _accum(acc, w, xk, s_ptr, k0, cols, nmask, stride_s, keep, ACC2D, WFMT, GROUP)
            if GATED:
                acc_u = _accum(acc_u, wu, xu, s_ptr, k0, cols_u, nmask, stride_s, ku, ACC2D, WFMT,
                                   GROUP)
                xu, ku, wu = xun, kun, wun
            xk, keep, w = xn, kn, wn
    finish(acc, acc_u, s_ptr, cols, cols_u, nmask, part_ptr, cnt_ptr, y_ptr, pid_n, pid_k, split,
           ncols, GATED, HAS_SPLIT, WFMT, ACC2D, BLOCK_N, RCHUNK)


def launch(plan, lc) -> None:
    """Launch over `plan` (teal.kernels.launch.Plan) with the resolved launch `lc`."""
    masked_gemv_kernel[plan.grid](*plan.args, **plan.meta, PIPE=lc.pipe, ACC2D=bool(lc.acc2d),
                                  num_warps=lc.num_warps, num_stages=lc.num_stages)
