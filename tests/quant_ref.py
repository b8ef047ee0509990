"""An independent reference of teal.quant's quantizers, written from their formulas in numpy
(shared by test_quant.py, test_quant_kernels.py and test_quantized_model.py).

The contract (teal/quant.py module doc), with every operation an IEEE fp32 operation as the
library states (fp32 weights and scales), bf16 by round-to-nearest-even on the bit pattern:

- int8, per output row n: s_n = amax_k |W[n, k]| / 127 (1 for an all-zero row),
  q = clamp(rint(W / s), -127, 127); codes (K, N) int8, scales fp32 (N,).
- int4, per group g of `group` consecutive input channels (the last one possibly short) and
  output row n: s = bf16((max - min) / 15), b = bf16(min), q = clamp(rint((W - b) / s), 0, 15)
  (s == 0: q = 0); codes packed two per byte along N (column 2j low nibble, 2j + 1 high),
  scales bf16 (G, 4, N / 2) by byte column j: rows [s of column 2j, s of column 2j + 1,
  b of column 2j, b of column 2j + 1].
- dequantize: float64 q * s (+ b), rounded once to fp32 (q * s is exact in fp32 for int4; for
  int8 the float64 product is exact, so one rounding equals fp32's).
Nothing here calls teal.quant.
"""
from __future__ import annotations

import numpy as np
import torch


def bf16_round(a: np.ndarray) -> np.ndarray:
    """fp32 -> the nearest bf16 value (ties to even), returned as fp32 (finite inputs)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).reshape(a.shape)


def ref_int8(w: torch.Tensor):
    """(codes int8 (K, N), scales fp32 (N,)) of an (N, K) weight."""
    wf = w.detach().float().cpu().numpy()
    amax = np.abs(wf).max(axis=1)
    s = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(wf / s[:, None]), -127, 127).astype(np.int8)
    return torch.from_numpy(np.ascontiguousarray(q.T)), torch.from_numpy(s)


def ref_int4_codes(w: torch.Tensor, group: int):
    """(codes uint8 (K, N) in [0, 15], scale fp32 (G, N), bias fp32 (G, N)), unpacked."""
    wf = w.detach().float().cpu().numpy()  # (N, K)
    N, K = wf.shape
    G = -(-K // group)
    q = np.zeros((K, N), dtype=np.uint8)
    s_all = np.zeros((G, N), dtype=np.float32)
    b_all = np.zeros((G, N), dtype=np.float32)
    for g in range(G):
        blk = wf[:, g * group:min((g + 1) * group, K)]          # (N, <= group) real channels only
        lo, hi = blk.min(axis=1), blk.max(axis=1)
        s = bf16_round((hi - lo) / np.float32(15.0))
        b = bf16_round(lo)
        safe = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
        qq = np.clip(np.rint((blk - b[:, None]) / safe[:, None]), 0, 15)
        qq = np.where(s[:, None] > 0, qq, 0)
        q[g * group:g * group + blk.shape[1]] = qq.T.astype(np.uint8)
        s_all[g], b_all[g] = s, b
    return torch.from_numpy(q), torch.from_numpy(s_all), torch.from_numpy(b_all)


def pack_ref(q: torch.Tensor) -> torch.Tensor:
    """uint8 (K, N) codes -> (K, N / 2) bytes, element by element (column 2j low nibble)."""
    qn = q.numpy().astype(np.uint8)
    K, N = qn.shape
    out = np.zeros((K, N // 2), dtype=np.uint8)
    for j in range(N // 2):
        out[:, j] = qn[:, 2 * j] + 16 * qn[:, 2 * j + 1]
    return torch.from_numpy(out)


def layout_scales(s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(G, N) scale and bias -> the stored bf16 (G, 4, N / 2), entry by entry."""
    G, N = s.shape
    out = torch.zeros(G, 4, N // 2, dtype=torch.float32)
    for j in range(N // 2):
        out[:, 0, j], out[:, 1, j] = s[:, 2 * j], s[:, 2 * j + 1]
        out[:, 2, j], out[:, 3, j] = b[:, 2 * j], b[:, 2 * j + 1]
    return out.to(torch.bfloat16)  # exact: s, b are bf16 values


def ref_int4(w: torch.Tensor, group: int):
    """(packed uint8 (K, N / 2), scales bf16 (G, 4, N / 2)) of an (N, K) weight."""
    q, s, b = ref_int4_codes(w, group)
    return pack_ref(q), layout_scales(s, b)


def ref_quantize(w: torch.Tensor, wformat: str):
    if wformat == "int8":
        return ref_int8(w)
    return ref_int4(w, int(wformat.split("-g")[1]))


def ref_dequantize(wformat: str, w: torch.Tensor) -> torch.Tensor:
    """fp32 (K, N) weight the format represents for the (N, K) weight `w` (quantized here)."""
    if wformat == "int8":
        q, s = ref_int8(w)
        return (q.double() * s.double()[None, :]).float()
    group = int(wformat.split("-g")[1])
    q, s, b = ref_int4_codes(w, group)
    rows = torch.arange(q.shape[0]) // group
    return (q.double() * s.double()[rows] + b.double()[rows]).float()
