"""Single-query GQA attention over a static KV cache (decode step): kernel and launcher.

Imports Triton at top level (imported lazily by teal.kernels.ops).

One program per (KV head g, slice of cache positions).  The REP = n_head / n_kv_head query
heads of group g are the rows of a [BLOCK_R, D] operand (rows >= REP are zero and ignored),
so every cached key/value row is read once for the whole group, and the scores and the
probability-weighted values are tensor-core products ([BLOCK_R, D] x [D, BLOCK_S] and
[BLOCK_R, BLOCK_S] x [BLOCK_S, D]).  Softmax is the online (running max / running sum)
form in fp32.  Cache blocks whose positions are all masked out (the unused tail of the
static cache) are skipped without reading K or V, so the work follows the filled length,
not the cache size.

Split over positions (flash-decoding): with SPLIT > 1 slices each program writes its fp32
(acc, running max, running sum) to a workspace and bumps a per-group arrival counter; the
last program of a group merges the slices in a fixed order (deterministic), normalises and
writes the output, then resets its counter (the GEMV kernels' scheme, same counter buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import arrive_last
from .dispatch import cdiv, num_sms
from .launch import counters, interpreted


@triton.jit
def _qk(q, k, DOT_F32: tl.constexpr):
    """[BLOCK_R, D] x [BLOCK_S, D]^T -> fp32 scores (DOT_F32: exact fp32 products, interpreter)."""
    if DOT_F32:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _pv(p, v, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_ptr, ml_ptr, cnt_ptr,
    S, s_per_split, split, stride_kh, stride_ks, stride_vh, stride_vs, scale,
    REP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
):
    """q: (n_kv_head * REP, D) contiguous; k/v: cache (n_kv_head, S, D) with strides
    (stride_kh, stride_ks, 1); m: (S,) uint8, nonzero = position may be attended;
    o: (n_kv_head * REP, D) in q's dtype.  Scores are scaled by ``scale`` (1/sqrt(D))."""
    g = tl.program_id(0)
    sp = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, D)
    rmask = rr < REP
    q = tl.load(q_ptr + (g * REP + rr)[:, None] * D + dd[None, :], mask=rmask[:, None], other=0.0)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    lo = sp * s_per_split
    hi = tl.minimum(S, lo + s_per_split)
    kbase = k_ptr + g.to(tl.int64) * stride_kh
    vbase = v_ptr + g.to(tl.int64) * stride_vh
    for s0 in range(lo, hi, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        mk = (tl.load(m_ptr + offs, mask=offs < hi, other=0) != 0)
        if tl.sum(mk.to(tl.int32), axis=0) > 0:
            k = tl.load(kbase + offs[:, None].to(tl.int64) * stride_ks + dd[None, :], mask=mk[:, None], other=0.0)
            v = tl.load(vbase + offs[:, None].to(tl.int64) * stride_vs + dd[None, :], mask=mk[:, None], other=0.0)
            s = _qk(q, k, DOT_F32) * scale
            s = tl.where(mk[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = _pv(p, v, acc * alpha[:, None], DOT_F32)
            m_i = m_new

    if not HAS_SPLIT:
        out = acc / l_i[:, None]
        tl.store(o_ptr + (g * REP + rr)[:, None] * D + dd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rmask[:, None])
    else:
        slot = g * split + sp
        tl.store(part_ptr + slot * (BLOCK_R * D) + rr[:, None] * D + dd[None, :], acc)
        tl.store(ml_ptr + slot * (2 * BLOCK_R) + rr, m_i)
        tl.store(ml_ptr + slot * (2 * BLOCK_R) + BLOCK_R + rr, l_i)
        if arrive_last(cnt_ptr, g, split):
            # merge the slices in a fixed order: global max first (some slice attends a
            # position, so it is finite), then rescaled sums
            mx = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
            for j in range(0, split):
                mx = tl.maximum(mx, tl.load(ml_ptr + (g * split + j) * (2 * BLOCK_R) + rr, cache_modifier=".cg"))
            tot = tl.zeros([BLOCK_R, D], dtype=tl.float32)
            den = tl.zeros([BLOCK_R], dtype=tl.float32)
            for j in range(0, split):
                base = (g * split + j) * (2 * BLOCK_R)
                w = tl.exp(tl.load(ml_ptr + base + rr, cache_modifier=".cg") - mx)
                den += w * tl.load(ml_ptr + base + BLOCK_R + rr, cache_modifier=".cg")
                a = tl.load(part_ptr + (g * split + j) * (BLOCK_R * D) + rr[:, None] * D + dd[None, :],
                            cache_modifier=".cg")
                tot += a * w[:, None]
            out = tot / den[:, None]
            tl.store(o_ptr + (g * REP + rr)[:, None] * D + dd[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=rmask[:, None])
            tl.atomic_xchg(cnt_ptr + g, 0, sem="relaxed", scope="gpu")


BLOCK_S = 64      # cache positions per step
MIN_SLICE = 256   # positions per program before the cache is split over programs


def launch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            out=None) -> torch.Tensor:
    """q: (H, D) contiguous, H = n_kv_head * rep; k, v: (n_kv_head, S, D) with unit last
    stride; mask: (S,) bool, contiguous.  Returns (H, D) in q's dtype."""
    H, D = q.shape
    G, S, _ = k.shape
    rep = H // G
    block_r = max(16, 1 << (rep - 1).bit_length())
    split = max(1, min(cdiv(S, MIN_SLICE), max(1, 2 * num_sms(q.device) // G)))
    sps = cdiv(cdiv(S, split), BLOCK_S) * BLOCK_S
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
        REP=rep, D=D, BLOCK_R=block_r, BLOCK_S=BLOCK_S, HAS_SPLIT=split > 1, DOT_F32=interpreted(),
        num_warps=4,
    )
    return out
