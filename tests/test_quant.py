"""teal.quant against an independent numpy reference of its formulas (tests/quant_ref.py):
codes and scales equal it exactly for every format, odd K and a short last group included;
dequantize is exact; packing; errors; the quantization error is small (sanity).

Every test draws a fresh seed (printed in the failure message)."""
from __future__ import annotations

import random

import pytest
import torch

from quant_ref import (bf16_round, layout_scales, pack_ref, ref_dequantize, ref_int4, ref_int4_codes,
                       ref_int8)
from teal import quant
from teal.quant import QuantSpec

INT4 = ["int4-g32", "int4-g64", "int4-g128"]
FORMATS = ["int8"] + INT4
# (N, K): odd K, a K shorter than a group, a K with a short last group for every group size
SHAPES = [(6, 77), (48, 200), (2, 5), (40, 128), (10, 300)]


def _seed() -> int:
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _weight(N, K, dtype=torch.float32):
    """N(0, 1) rows with a few rows/columns of very different scale (outlier channels)."""
    w = torch.randn(N, K)
    w[0] *= 30.0                            # one loud output channel
    w[:, K // 2] *= 0.01                    # one quiet input channel
    if N > 2:
        w[1] = torch.randn(K).abs() + 0.5   # all-positive row (int4 min > 0)
        w[2] = -(torch.randn(K).abs() + 0.5)  # all-negative row (int8 amax from a negative)
    return w.to(dtype)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("N,K", SHAPES)
def test_int8_equals_reference(N, K, wdtype):
    seed = _seed()
    w = _weight(N, K, wdtype)
    codes, scales = quant.quantize_int8(w)
    rq, rs = ref_int8(w)
    assert codes.dtype == torch.int8 and codes.shape == (K, N) and codes.is_contiguous()
    assert scales.dtype == torch.float32 and scales.shape == (N,)
    assert torch.equal(scales, rs), f"int8 scales differ seed={seed}"
    assert torch.equal(codes, rq), f"int8 codes differ at {(codes != rq).nonzero()[:5].tolist()} seed={seed}"
    assert int(codes.abs().max()) == 127  # every column reaches its amax
    assert (codes.int().abs().amax(dim=0) == 127).all(), f"seed={seed}"
    # dequantize is exactly q * s (float64 product rounded once to fp32)
    deq = quant.dequantize("int8", codes, scales)
    assert deq.dtype == torch.float32 and deq.shape == (K, N)
    assert torch.equal(deq, ref_dequantize("int8", w)), f"seed={seed}"
    # each weight is within half a step of its code (float64 check; 2e-5 steps: the fp32
    # rounding of w / s, |w / s| <= 127)
    err = (w.double().t() - codes.double() * scales.double()).abs()
    assert (err <= scales.double() * (0.5 + 2e-5)).all(), f"seed={seed}"


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", INT4)
@pytest.mark.parametrize("N,K", SHAPES)
def test_int4_equals_reference(N, K, fmt, wdtype):
    seed = _seed()
    group = int(fmt.split("-g")[1])
    w = _weight(N, K, wdtype)
    packed, scales = quant.quantize_int4(w, group)
    G = -(-K // group)
    assert packed.dtype == torch.uint8 and packed.shape == (K, N // 2) and packed.is_contiguous()
    assert scales.dtype == torch.bfloat16 and scales.shape == (G, 4, N // 2) and scales.is_contiguous()
    rp, rs = ref_int4(w, group)
    assert torch.equal(scales, rs), f"{fmt} scales differ at {(scales != rs).nonzero()[:5].tolist()} seed={seed}"
    assert torch.equal(packed, rp), f"{fmt} codes differ at {(packed != rp).nonzero()[:5].tolist()} seed={seed}"
    q, s, b = ref_int4_codes(w, group)
    qs, qb = quant.int4_scale_bias(scales)  # the plain (G, N) view
    assert qs.dtype == torch.float32 and torch.equal(qs, s) and torch.equal(qb, b), f"{fmt} seed={seed}"
    # the per-group statistics are over the real channels of the (possibly short) last group
    last = w[:, (G - 1) * group:].float()
    assert torch.equal(qb[-1], torch.from_numpy(bf16_round(last.min(dim=1).values.numpy()))), f"seed={seed}"
    deq = quant.dequantize(fmt, packed, scales)
    assert deq.dtype == torch.float32 and deq.shape == (K, N)
    assert torch.equal(deq, ref_dequantize(fmt, w)), f"{fmt} dequantize seed={seed}"
    # float64 error bound: half a step, plus the bf16 rounding of the bias (clamp at 0) and of
    # the step (clamp at 15: 15 steps of at most half a bf16 ulp each)
    rows = torch.arange(K) // group
    wt = w.double().t()
    lo = torch.stack([wt[g * group:(g + 1) * group].min(dim=0).values for g in range(G)])
    slack = (b.double() - lo).abs() + 15 * s.double() * 2.0 ** -8
    err = (wt - deq.double()).abs()
    assert (err <= (s.double() * (0.5 + 2e-5) + slack)[rows]).all(), f"{fmt} seed={seed}"


def test_int8_zero_row_and_int4_constant_group():
    """An all-zero int8 row: scale 1, codes 0. An int4 group that is constant along K:
    step 0, every code 0, dequantized to the bf16 bias (no division by zero)."""
    w = torch.randn(4, 70)
    w[1] = 0.0
    codes, scales = quant.quantize_int8(w)
    assert scales[1] == 1.0 and (codes[:, 1] == 0).all()
    assert torch.isfinite(quant.dequantize("int8", codes, scales)).all()
    w4 = torch.randn(4, 70)
    w4[2, 32:64] = 0.3  # group 1 of column 2 (g32)
    w4[3, :] = 0.0
    packed, sc = quant.quantize_int4(w4, 32)
    q = quant.unpack_int4(packed)
    s, b = quant.int4_scale_bias(sc)
    assert s[1, 2] == 0 and (q[32:64, 2] == 0).all()
    assert (s[:, 3] == 0).all() and (b[:, 3] == 0).all() and (q[:, 3] == 0).all()
    assert sc[1, 0, 1] == 0 and (sc[:, 1, 1] == 0).all() and (sc[:, 3, 1] == 0).all()  # stored by byte
    deq = quant.dequantize("int4-g32", packed, sc)
    assert (deq[32:64, 2] == torch.tensor(0.3).bfloat16().float()).all()
    assert (deq[:, 3] == 0).all() and torch.isfinite(deq).all()


def test_pack_unpack_round_trip():
    seed = _seed()
    q = torch.randint(0, 16, (13, 22), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (13, 11)
    assert torch.equal(packed, pack_ref(q)), f"seed={seed}"
    assert torch.equal(quant.unpack_int4(packed), q), f"seed={seed}"
    # the documented byte layout on a known row: columns (1, 2) -> 0x21, (15, 0) -> 0x0F
    row = torch.tensor([[1, 2, 15, 0, 0, 15]], dtype=torch.uint8)
    assert quant.pack_int4(row).tolist() == [[0x21, 0x0F, 0xF0]]
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 256)  # every byte value unpacks and repacks
    assert torch.equal(quant.pack_int4(quant.unpack_int4(every)), every)
    assert quant.unpack_int4(every)[0, :4].tolist() == [0, 0, 1, 0]


def test_int4_scale_layout():
    """The stored int4 scales by byte column: [g, 0, j] / [g, 1, j] the steps of columns 2j /
    2j + 1, [g, 2, j] / [g, 3, j] their biases; int4_scale_bias inverts it."""
    seed = _seed()
    s = torch.randn(3, 10).bfloat16().float()
    b = torch.randn(3, 10).bfloat16().float()
    st = layout_scales(s, b)
    assert st.shape == (3, 4, 5)
    ss, bb = quant.int4_scale_bias(st)
    assert torch.equal(ss, s) and torch.equal(bb, b), f"seed={seed}"
    w = torch.randn(6, 40)
    _, sc = quant.quantize_int4(w, 32)
    col = w[3].float()  # column 3: odd, byte 1
    assert sc[0, 3, 1].float() == torch.tensor(col[:32].min().item()).bfloat16().float()
    assert sc[1, 3, 1].float() == torch.tensor(col[32:].min().item()).bfloat16().float()


def test_quantize_dispatch_and_spec():
    seed = _seed()
    w = torch.randn(8, 40)
    for fmt in FORMATS:
        mode, g = quant.parse_format(fmt)
        spec = QuantSpec(mode, g)
        assert spec.wformat == fmt and quant.format_name(mode, g) == fmt
        assert QuantSpec.from_dict(spec.to_dict()) == spec
        codes, sc = quant.quantize(w, spec)
        ref_codes, ref_sc = ref_int8(w) if mode == "int8" else ref_int4(w, g)
        assert torch.equal(codes, ref_codes) and torch.equal(sc, ref_sc), f"{fmt} seed={seed}"
    assert QuantSpec("int4", 64, head=True).to_dict() == {"mode": "int4", "group_size": 64, "head": True}
    assert QuantSpec.from_dict({"mode": "int8"}) == QuantSpec("int8")
    assert quant.parse_format("dense") == ("dense", 0) and quant.format_name("dense") == "dense"


@pytest.mark.parametrize("fn,match", [
    (lambda: quant.quantize_int4(torch.randn(7, 64), 32), "even number of output"),
    (lambda: quant.quantize_int4(torch.randn(8, 64), 16), "group size"),
    (lambda: quant.quantize_int4(torch.randn(8, 64), 0), "group size"),
    (lambda: quant.quantize_int8(torch.tensor([[1.0, float("nan")]])), "inf or NaN"),
    (lambda: quant.quantize_int8(torch.tensor([[1.0, float("inf")], [0.0, 1.0]])), "inf or NaN"),
    (lambda: quant.quantize_int4(torch.tensor([[1.0, -float("inf")], [0.0, 1.0]]), 32), "inf or NaN"),
    (lambda: quant.quantize_int8(torch.randn(16)), "2-D|\\(N, K\\)"),
    (lambda: quant.quantize_int4(torch.randn(16), 32), "\\(N, K\\)"),
    (lambda: quant.quantize_int8(torch.randn(2, 3, 4)), "\\(N, K\\)"),
    (lambda: quant.quantize_int8(torch.randint(0, 5, (4, 4))), "floating-point"),
    (lambda: quant.pack_int4(torch.zeros(3, 5, dtype=torch.uint8)), "even"),
    (lambda: QuantSpec("int3"), "unknown quantization mode"),
    (lambda: QuantSpec("int4", 48), "group size"),
    (lambda: QuantSpec("int4"), "group size"),
    (lambda: QuantSpec("int8", 32), "no group size"),
    (lambda: QuantSpec.from_dict({"group_size": 32}), "mode"),
    (lambda: QuantSpec.from_dict("int8"), "mode"),
    (lambda: quant.parse_format("int4-g16"), "unknown weight format"),
    (lambda: quant.parse_format("int4-gx"), "unknown weight format"),
    (lambda: quant.parse_format("fp8"), "unknown weight format"),
    (lambda: quant.dequantize("dense", torch.zeros(2, 2), torch.ones(2)), "not a quantized format"),
    (lambda: quant.dequantize("int4-g20", torch.zeros(2, 2, dtype=torch.uint8), torch.ones(1, 2, 4)), "unknown weight format"),
])
def test_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_quantization_error_is_small():
    """Sanity on N(0, 1) weights (not exactness): relative Frobenius error of int8 below 1%,
    int4 below ~10%, growing with the group size."""
    seed = _seed()
    w = torch.randn(256, 512)
    rel = {}
    for fmt in FORMATS:
        mode, g = quant.parse_format(fmt)
        codes, sc = quant.quantize(w, QuantSpec(mode, g))
        deq = quant.dequantize(fmt, codes, sc)
        rel[fmt] = ((deq.t() - w).norm() / w.norm()).item()
    assert rel["int8"] < 0.01, f"{rel} seed={seed}"
    assert rel["int4-g32"] < 0.09 and rel["int4-g64"] < 0.10 and rel["int4-g128"] < 0.11, f"{rel} seed={seed}"
    assert rel["int8"] < rel["int4-g32"] < rel["int4-g64"] < rel["int4-g128"], f"{rel} seed={seed}"
    assert rel["int8"] > 1e-4, "int8 error implausibly small (not quantized?)"
