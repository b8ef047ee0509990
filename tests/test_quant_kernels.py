"""The sparse GEMV kernels on quantized weights (int8, int4-g32/64/128) against float64
references of the dequantized weight (teal.kernels.reference on `teal.quant.dequantize`,
itself checked exactly against an independent quantizer in test_quant.py).

CPU (CI): Triton's interpreter on small odd shapes (K odd, short last int4 groups, widths
not a multiple of block_n); CUDA: also the Llama-3-8B shapes.  Error bounds as in
test_kernels.py (fp32 accumulation, one rounding to the output dtype): the int8 scale and the
int4 (scale, bias) are applied to fp32 sums, so the dequantized weight in float64 is the
exact reference up to fp32 summation order.  Every test draws a fresh seed (printed in the
failure message).
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import replace

import pytest
import torch

_CUDA = torch.cuda.is_available()
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import teal.kernels as tk  # noqa: E402
from teal import quant  # noqa: E402
from teal.kernels import reference as R  # noqa: E402

DEV = torch.device("cuda" if _CUDA else "cpu")

if not tk.kernels_available(DEV):
    pytest.skip("Triton kernels not available on this device (interpreter off?)", allow_module_level=True)
if not _CUDA and _LATE:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set (see tests/conftest.py)",
                allow_module_level=True)

from teal.kernels import dispatch as D, launch  # noqa: E402
from teal.kernels.dispatch import GemvConfig, KernelPolicy, TableRow  # noqa: E402
from teal.kernels.formats import get_format  # noqa: E402

RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "fp16"]
POLICY = KernelPolicy(interpreter=not _CUDA)
FORMATS = ["int8", "int4-g32", "int4-g64", "int4-g128"]
MODES = ["zero", "inf", "q50", "channel"]

# (K, segment widths); every width even (int4), none a multiple of 16; K odd or with a short
# last group for every group size
SMALL = {"single": [(77, (42,)), (200, (70,))],
         "segments": [(61, (12, 6, 22))],
         "gated": [(200, (22, 22))]}
REAL = {"single": [(4096, (4096,)), (14336, (4096,))],
        "segments": [(4096, (4096, 1024, 1024))],
        "gated": [(4096, (14336, 14336))]}


def _seed() -> int:
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _spec(fmt):
    mode, g = quant.parse_format(fmt)
    return quant.QuantSpec(mode, g)


def _qweight(K, N, fmt):
    """(codes, scales, dequantized fp32 (K, N)) of a random (N, K) weight ~ N(0, 1/K), with a
    few loud output channels and input channels (outliers shape the int8/int4 scales)."""
    w = torch.randn(N, K, device=DEV) / K ** 0.5
    w[:: max(1, N // 5)] *= 8.0
    w[:, :: max(1, K // 7)] *= 4.0
    codes, scales = quant.quantize(w, _spec(fmt))
    return codes, scales, quant.dequantize(fmt, codes, scales)


def _thresholds(x, mode, rows):
    ax = x.float().abs()
    K = x.numel()
    if mode == "zero":
        t = torch.zeros(rows)
    elif mode == "inf":
        t = torch.full((rows,), float("inf"))
    elif mode == "q50":
        t = torch.quantile(ax.cpu(), torch.rand(rows) * 0.4 + 0.3)  # ~30-70% sparsity per row
    elif mode == "channel":
        t = torch.rand(rows, K) * 2 * torch.quantile(ax.cpu(), 0.5)
    else:
        raise AssertionError(mode)
    return t.to(torch.float32).to(x.device)


def _close(y, ref, dtype, seed, what):
    assert y.dtype == dtype, what
    assert not torch.isnan(y).any(), f"{what}: NaN in output (unwritten?) seed={seed}"
    err = (y.double() - ref).norm().item()
    bound = RTOL[dtype] * ref.norm().item() + 1e-6 * ref.numel() ** 0.5
    assert err <= bound, (f"{what}: ||y-ref||={err:.3g} > {bound:.3g} (||ref||="
                          f"{ref.norm().item():.3g}) seed={seed}")


def _bounds(sizes):
    return tuple(int(b) for b in torch.tensor(sizes).cumsum(0))


def _ref(x, deq, t, kind, sizes):
    if kind == "gated":
        return R.sparse_gated_gemv_ref(x, deq, t)
    return R.sparse_gemv_ref(x, deq, t, _bounds(sizes))


def _public(x, codes, scales, t, kind, sizes, fmt, **kw):
    if kind == "gated":
        return tk.sparse_gated_gemv(x, codes, t, policy=POLICY, wformat=fmt, scales=scales, **kw)
    return tk.sparse_gemv(x, codes, t, _bounds(sizes), policy=POLICY, wformat=fmt, scales=scales, **kw)


def _check_all_modes(K, sizes, kind, fmt, dtype):
    seed = _seed()
    N = sum(sizes)
    codes, scales, deq = _qweight(K, N, fmt)
    x = torch.randn(K, device=DEV).to(dtype)
    rows = 2 if kind == "gated" else len(sizes)
    n_out = sizes[0] if kind == "gated" else N
    what = f"{fmt} {kind} K={K} sizes={sizes} {dtype}"
    for mode in MODES:
        t = _thresholds(x, mode, rows)
        y = _public(x, codes, scales, t, kind, sizes, fmt)
        assert y.shape == (n_out,), what
        if mode == "inf":
            assert (y == 0).all(), f"{what} inf: seed={seed}"
            continue
        ref = _ref(x, deq, t, kind, sizes)
        _close(y, ref, dtype, seed, f"{what} {mode}")
        if mode == "zero" and kind != "gated":  # no threshold: the dense product
            _close(y, x.double() @ deq.double(), dtype, seed, f"{what} vs dense")
        if mode == "q50":  # the inputs make the mask matter (dense differs; >= 1.7% in 3000 draws)
            dense = _ref(x, deq, torch.zeros_like(t), kind, sizes)
            assert (dense - ref).norm() > 0.005 * ref.norm(), f"{what}: thresholds drop nothing? seed={seed}"
    if kind == "segments":  # each segment alone = the op on its column slice of codes / scales
        t = _thresholds(x, "q50", rows)
        ref = _ref(x, deq, t, kind, sizes)
        div = 1 if fmt == "int8" else 2  # int4: codes and scales by byte column
        a = 0
        for s, n in enumerate(sizes):
            cs = codes[:, a // div:(a + n) // div].contiguous()
            ss = scales[..., a // div:(a + n) // div].contiguous()
            ys = tk.sparse_gemv(x, cs, t[s], policy=POLICY, wformat=fmt, scales=ss)
            _close(ys, ref[a:a + n], dtype, seed, f"{what} segment {s}")
            a += n


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", ["single", "segments", "gated"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_gemv(fmt, kind, dtype):
    """Public API, every format x call kind x threshold mode (zero, inf, ~50% scalar,
    per-channel) x activation dtype, small odd shapes."""
    for K, sizes in SMALL[kind]:
        _check_all_modes(K, sizes, kind, fmt, dtype)


@pytest.mark.skipif(not _CUDA, reason="Llama shapes need a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", ["single", "segments", "gated"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_gemv_llama_shapes(fmt, kind, dtype):
    for K, sizes in REAL[kind]:
        _check_all_modes(K, sizes, kind, fmt, dtype)


# launch-level: every algorithm / pipelining / split-K path, NaN-poisoned buffers.  block_k
# <= 32 so every int4 group size takes every config (a tile lies inside one group).
_VARIANTS = [
    GemvConfig(block_n=16, block_k=16, split=1, pipe=1, acc2d=False),
    GemvConfig(block_n=32, block_k=16, split=3, pipe=1, acc2d=True),    # ranges 32, 32, 13
    GemvConfig(block_n=16, block_k=32, split=2, pipe=2, acc2d=True),    # block_k == g32
    GemvConfig(block_n=32, block_k=8, split=0, pipe=2, acc2d=False, waves=8, rchunk=2),
    GemvConfig(algo="dot", block_n=16, block_k=16, split=3, num_stages=3, rchunk=0),
    GemvConfig(algo="dot", block_n=32, block_k=32, split=1, num_stages=2),
    GemvConfig(algo="dot", block_n=16, block_k=16, split=5, num_stages=4, rchunk=2, warm=16),
    GemvConfig(algo="list", block_n=16, block_k=16, ksplit=32, num_stages=3, rchunk=0),
    GemvConfig(algo="list", inline=True, block_n=32, block_k=32, ksplit=128, num_stages=2),
]


def _cfg_id(c):
    if c.algo == "list":
        return f"list{'-inline' if c.inline else ''}-bn{c.block_n}bk{c.block_k}ks{c.ksplit}"
    if c.algo == "dot":
        return f"dot-bn{c.block_n}bk{c.block_k}s{c.split}r{c.rchunk}w{c.warm}"
    return f"mask-bn{c.block_n}bk{c.block_k}s{c.split}p{c.pipe}a{int(c.acc2d)}"


def _launch(x, codes, scales, t, sizes, cfg, fmt, gated=False, **kw):
    lc = D.resolve(cfg, "gated" if gated else "seg", x.numel(), sizes, D.num_sms(DEV))
    return launch.launch_gemv(x, codes, scales, t, list(sizes), gated, fmt, lc, **kw)


def _admitted(cfg, fmt):
    """The dispatch runs `cfg`'s algorithm for this format (teal.kernels.dispatch.fit_format:
    int4 never takes kept-row lists; whatever else it rules out is not launched here)."""
    return D.fit_format(cfg, "seg", 77, 64, fmt).algo == cfg.algo


# int8 takes every config; each int4 config the dispatch admits runs under two of the three
# group sizes (in turn), so every group size meets several masked (both pipes, both
# accumulators) configs
_INT4_VARIANTS = [c for c in _VARIANTS if _admitted(c, "int4-g32")]
_CASES = [("int8", cfg) for cfg in _VARIANTS] + [
    (FORMATS[1 + (i + j) % 3], cfg) for i, cfg in enumerate(_INT4_VARIANTS) for j in range(2)]


@pytest.mark.parametrize("fmt,cfg", _CASES, ids=[f"{f}-{_cfg_id(c)}" for f, c in _CASES])
def test_variants_poisoned(fmt, cfg):
    """Every config on segments and on gate/up, NaN-poisoned output and workspace, the
    activation dtype alternating with the config; arrival counters left zero; bitwise
    reproducible."""
    seed = _seed()
    dtype = DTYPES[(_VARIANTS.index(cfg) + FORMATS.index(fmt)) % 2]
    K, sizes = 77, (18, 40, 6)
    N = sum(sizes)
    codes, scales, deq = _qweight(K, N, fmt)
    x = torch.randn(K, device=DEV).to(dtype)
    t = _thresholds(x, "channel", 3)
    out = torch.full((N,), float("nan"), dtype=dtype, device=DEV)
    ws = torch.full((64, N), float("nan"), dtype=torch.float32, device=DEV)
    _launch(x, codes, scales, t, sizes, cfg, fmt, out=out, workspace=ws)
    _close(out, R.sparse_gemv_ref(x, deq, t, _bounds(sizes)), dtype, seed, f"{fmt} segments {cfg}")
    F = 22
    cg, sg, dg = _qweight(K, 2 * F, fmt)
    tg = _thresholds(x, "q50", 2)
    outg = torch.full((F,), float("nan"), dtype=dtype, device=DEV)
    wsg = torch.full((64, 2 * F), float("nan"), dtype=torch.float32, device=DEV)
    _launch(x, cg, sg, tg, (F, F), cfg, fmt, gated=True, out=outg, workspace=wsg)
    _close(outg, R.sparse_gated_gemv_ref(x, dg, tg), dtype, seed, f"{fmt} gated {cfg}")
    assert int(launch.counters(DEV, 1).abs().sum()) == 0, "arrival counters not reset"
    assert torch.equal(out, _launch(x, codes, scales, t, sizes, cfg, fmt)), f"non-deterministic seed={seed}"
    assert torch.equal(outg, _launch(x, cg, sg, tg, (F, F), cfg, fmt, gated=True)), \
        f"gated non-deterministic seed={seed}"


def test_int8_rows_own_masks():
    """int8 weights, M = 4 rows per call (the dot kernel, scales in the epilogue): each row
    equals its own masked GEMV of the dequantized weight; int4 refuses several rows."""
    seed = _seed()
    K, sizes, F, M = 70, (16, 24, 8), 12, 4
    codes, scales, deq = _qweight(K, sum(sizes), "int8")
    cg, sg, dg = _qweight(K, 2 * F, "int8")
    x = (torch.randn(M, K) * (0.5 + torch.rand(M, 1))).to(torch.bfloat16).to(DEV)
    t = torch.tensor([0.5, 0.8, 1.1], device=DEV)
    tg = (torch.rand(2, K) + 0.4).to(DEV)
    y = _public(x, codes, scales, t, "segments", sizes, "int8")
    yg = _public(x, cg, sg, tg, "gated", (F, F), "int8")
    assert y.shape == (M, sum(sizes)) and yg.shape == (M, F)
    for m in range(M):
        _close(y[m], _ref(x[m], deq, t, "segments", sizes), torch.bfloat16, seed, f"int8 row {m}")
        _close(yg[m], _ref(x[m], dg, tg, "gated", (F, F)), torch.bfloat16, seed, f"int8 gated row {m}")
    c4, s4, _ = _qweight(K, 16, "int4-g32")
    with pytest.raises(ValueError, match="one row per call"):
        _public(x, c4, s4, t[:1], "single", (16,), "int4-g32")


def test_int4_group_edges():
    """int4 with K = 200 (g128: one full group and a short one of 72) under the largest
    tiles a group admits (block_k == group) and ranges that end inside a group, on column
    tiles that start on 32-column boundaries (16-byte aligned bytes) and on ones that do not:
    a mis-indexed scale row, a tile straddling groups or a misplaced nibble shows as a large
    error."""
    seed = _seed()
    K = 200
    x = torch.randn(K, device=DEV).to(torch.float16)
    cfgs = [GemvConfig(block_n=32, block_k=64, split=2, pipe=2),
            GemvConfig(block_n=64, block_k=16, split=4, pipe=1, acc2d=False),
            GemvConfig(algo="dot", block_n=32, block_k=64, split=2, num_stages=2),
            GemvConfig(algo="dot", block_n=16, block_k=16, split=4, num_stages=2, warm=0)]
    for fmt, cfg in zip(("int4-g64", "int4-g128") * 2, cfgs):
        if _admitted(cfg, fmt):
            # aligned starts (N / 2 odd, and N a multiple of 8 but not of 32: the scale rows'
            # stride is not 16-aligned); one tile; unaligned starts
            for sizes in ((32, 64, 10), (32, 8), (38,), (6, 32)):
                N = sum(sizes)
                codes, scales, deq = _qweight(K, N, fmt)
                t = _thresholds(x, "q50", len(sizes))
                y = _launch(x, codes, scales, t, sizes, cfg, fmt)
                _close(y, R.sparse_gemv_ref(x, deq, t, _bounds(sizes)), torch.float16, seed,
                       f"{fmt} {_cfg_id(cfg)} {sizes}")
            F = 32  # gate and up both start on 32-column boundaries
            cg, sg, dg = _qweight(K, 2 * F, fmt)
            tg = _thresholds(x, "channel", 2)
            yg = _launch(x, cg, sg, tg, (F, F), cfg, fmt, gated=True)
            _close(yg, R.sparse_gated_gemv_ref(x, dg, tg), torch.float16, seed,
                   f"{fmt} {_cfg_id(cfg)} gated")


def test_dispatch_fits_int4_configs():
    """The policy never gives int4 a kept-row list or a tile wider than a group, also when
    its table asks for one; the call then still equals the reference."""
    seed = _seed()
    lst = GemvConfig(algo="list", inline=True, block_n=16, block_k=64, ksplit=64)
    for fmt in ("int4-g32", "int4-g64"):
        g = int(fmt.split("-g")[1])
        for cfg in (lst, replace(lst, algo="dot", block_k=128), replace(lst, algo="mask", block_k=128)):
            fitted = D.fit_format(cfg, "seg", 77, 40, fmt)
            assert fitted.algo != "list" and fitted.block_k <= g, (fmt, cfg, fitted)
    assert D.fit_format(lst, "seg", 77, 40, "int8") == lst  # int8 takes every algorithm
    K, sizes = 77, (18, 22)
    table = D.DEFAULT_TABLE.with_rows([
        TableRow(D.device_key(DEV), "seg", K, 40, lst, wformat=f, source="test") for f in FORMATS])
    policy = replace(POLICY, table=table)
    x = torch.randn(K, device=DEV).to(torch.bfloat16)
    t = _thresholds(x, "q50", 2)
    for fmt in FORMATS:
        lc = policy.launch("seg", K, sizes, x.dtype, fmt, 0.5, DEV)
        g = quant.parse_format(fmt)[1]
        assert (lc.algo_name == "list") == (fmt == "int8"), (fmt, lc)
        assert not g or lc.block_k <= g
        codes, scales, deq = _qweight(K, 40, fmt)
        y = tk.sparse_gemv(x, codes, t, _bounds(sizes), sparsity=0.5, policy=policy, wformat=fmt, scales=scales)
        _close(y, R.sparse_gemv_ref(x, deq, t, _bounds(sizes)), torch.bfloat16, seed, f"{fmt} via table")


def test_errors():
    K = 64
    x = torch.randn(K, device=DEV).to(torch.bfloat16)
    t = torch.tensor(0.1, device=DEV)
    c8, s8, _ = _qweight(K, 40, "int8")
    c4, s4, _ = _qweight(K, 40, "int4-g32")
    big = GemvConfig(block_n=16, block_k=64, split=1)
    cases = [
        # int4: odd segment widths (two columns share a byte)
        (lambda: tk.sparse_gemv(x, c4, torch.zeros(2, device=DEV), (19, 40), policy=POLICY,
                                wformat="int4-g32", scales=s4), "even"),
        (lambda: tk.sparse_gated_gemv(x, torch.zeros(K, 21, dtype=torch.uint8, device=DEV),
                                      torch.zeros(2, device=DEV), policy=POLICY, wformat="int4-g32",
                                      scales=torch.ones(get_format("int4-g32").scale_shape(K, 42),
                                                        dtype=torch.bfloat16, device=DEV)), "even"),
        # scales: missing, wrong dtype, wrong shape, non-contiguous
        (lambda: tk.sparse_gemv(x, c8, t, policy=POLICY, wformat="int8"), "scales"),
        (lambda: tk.sparse_gemv(x, c8, t, policy=POLICY, wformat="int8", scales=s8.half()), "scales"),
        (lambda: tk.sparse_gemv(x, c8, t, policy=POLICY, wformat="int8", scales=s8[:-2]), "scales"),
        (lambda: tk.sparse_gemv(x, c8, t, policy=POLICY, wformat="int8", scales=s8.view(1, -1)), "scales"),
        (lambda: tk.sparse_gemv(x, c4, t, policy=POLICY, wformat="int4-g32", scales=s4.float()), "scales"),
        (lambda: tk.sparse_gemv(x, c4, t, policy=POLICY, wformat="int4-g32", scales=s4[:1]), "scales"),
        (lambda: tk.sparse_gemv(x, c4, t, policy=POLICY, wformat="int4-g64", scales=s4), "scales"),
        (lambda: tk.sparse_gemv(x, c4, t, policy=POLICY, wformat="int4-g32",
                                scales=s4.transpose(0, 2).contiguous().transpose(0, 2)), "scales"),
        # codes: wrong dtype / format mix-ups, wrong K, non-contiguous
        (lambda: tk.sparse_gemv(x, c4, t, policy=POLICY, wformat="int8", scales=s8), "int8"),
        (lambda: tk.sparse_gemv(x, c8, t, policy=POLICY, wformat="int4-g32", scales=s4), "uint8"),
        (lambda: tk.sparse_gemv(x, c8.float(), t, policy=POLICY, wformat="int8", scales=s8), "int8"),
        (lambda: tk.sparse_gemv(x, c8.to(torch.bfloat16), t, policy=POLICY, scales=s8), "scales"),
        (lambda: tk.sparse_gemv(x, c8[:-1], t, policy=POLICY, wformat="int8", scales=s8), "K = 64"),
        (lambda: tk.sparse_gemv(x, c8.t().contiguous().t(), t, policy=POLICY, wformat="int8", scales=s8), "contiguous"),
        (lambda: tk.sparse_gemv(x, c8, t, policy=POLICY, wformat="int2", scales=s8), "weight format"),
        # a launch resolved for another format: int4 tiles must lie inside one group
        (lambda: tk.sparse_gemv(x, c4, t.view(1), policy=POLICY, wformat="int4-g32", scales=s4,
                                launch=D.resolve(big, "seg", K, [40], 4)), "group"),
        (lambda: tk.sparse_gemv(x, c4, t.view(1), policy=POLICY, wformat="int4-g32", scales=s4,
                                launch=D.resolve(GemvConfig(algo="list", block_n=16, block_k=16),
                                                 "seg", K, [40], 4)), "list"),
    ]
    if _CUDA:
        cases.append((lambda: tk.sparse_gemv(x, c8, t, wformat="int8", scales=s8.cpu()), "device"))
    for i, (fn, word) in enumerate(cases):
        with pytest.raises(ValueError, match=word):
            fn()
            raise AssertionError(f"case {i} raised nothing")


# the words kernel (int8 / int4 code words split into bit planes): segments and gate/up
# widths that are whole words, several tiles per segment, ranges ending inside a group
_WORDS = [GemvConfig(algo="words", block_n=64, block_k=8, num_warps=1, split=3),
          GemvConfig(algo="words", block_n=32, block_k=16, num_warps=2, split=1),
          GemvConfig(algo="words", block_n=256, block_k=32, num_warps=4, split=0, rchunk=2)]
_WORDS_CASES = [(f, c) for f in FORMATS for c in _WORDS]


@pytest.mark.parametrize("fmt,cfg", _WORDS_CASES,
                         ids=[f"{f}-bn{c.block_n}bk{c.block_k}w{c.num_warps}s{c.split}"
                              for f, c in _WORDS_CASES])
def test_words_poisoned(fmt, cfg):
    """The words kernel on segments (K = 200: a short last group for every group size) and
    on gate/up (always paired through the workspace), NaN-poisoned output and workspace,
    per-channel and scalar thresholds, against the float64 reference; counters left zero,
    bitwise reproducible."""
    seed = _seed()
    dtype = DTYPES[_WORDS_CASES.index((fmt, cfg)) % 2]
    cfg = D.fit_format(cfg, "seg", 200, 64, fmt)
    g = get_format(fmt).group
    K, sizes = 200, (16, 40, 8)
    N = sum(sizes)
    codes, scales, deq = _qweight(K, N, fmt)
    x = torch.randn(K, device=DEV).to(dtype)
    t = _thresholds(x, "channel", 3)
    lc = D.resolve(cfg, "seg", K, sizes, D.num_sms(DEV), g)
    assert lc.algo_name == "words"
    out = torch.full((N,), float("nan"), dtype=dtype, device=DEV)
    ws = torch.full((64, N), float("nan"), dtype=torch.float32, device=DEV)
    launch.launch_gemv(x, codes, scales, t, list(sizes), False, fmt, lc, out=out, workspace=ws)
    _close(out, R.sparse_gemv_ref(x, deq, t, _bounds(sizes)), dtype, seed, f"{fmt} words segments {cfg}")
    F = 24
    cg, sg, dg = _qweight(K, 2 * F, fmt)
    tg = _thresholds(x, "q50", 2)
    lcg = D.resolve(cfg, "gated", K, (F, F), D.num_sms(DEV), g)
    outg = torch.full((F,), float("nan"), dtype=dtype, device=DEV)
    wsg = torch.full((64, 2 * F), float("nan"), dtype=torch.float32, device=DEV)
    launch.launch_gemv(x, cg, sg, tg, [F, F], True, fmt, lcg, out=outg, workspace=wsg)
    _close(outg, R.sparse_gated_gemv_ref(x, dg, tg), dtype, seed, f"{fmt} words gated {cfg}")
    assert int(launch.counters(DEV, 1).abs().sum()) == 0, "arrival counters not reset"
    again = launch.launch_gemv(x, codes, scales, t, list(sizes), False, fmt, lc)
    assert torch.equal(out, again), f"non-deterministic seed={seed}"
    t0 = torch.zeros(3, device=DEV)
    y0 = launch.launch_gemv(x, codes, scales, t0, list(sizes), False, fmt, lc)
    _close(y0, x.double() @ deq.double(), dtype, seed, f"{fmt} words dense")


def test_words_dispatch_and_errors():
    """A words config falls back to the masked loop where segments are not whole words (the
    policy) and is refused by the launcher; dense weights never take it."""
    K = 64
    words = GemvConfig(algo="words", block_n=64, block_k=16, num_warps=1)
    policy = replace(POLICY, config=words)
    assert policy.launch("seg", K, (16, 24), torch.bfloat16, "int8", 0.5, DEV).algo_name == "words"
    assert policy.launch("seg", K, (16, 24), torch.bfloat16, "int4-g32", 0.5, DEV).algo_name == "words"
    assert policy.launch("seg", K, (18, 22), torch.bfloat16, "int8", 0.5, DEV).algo_name == "mask"
    assert policy.launch("seg", K, (12, 28), torch.bfloat16, "int4-g32", 0.5, DEV).algo_name == "mask"
    assert policy.launch("seg", K, (16, 24), torch.bfloat16, "dense", 0.5, DEV).algo_name != "words"
    x = torch.randn(K, device=DEV).to(torch.bfloat16)
    c4, s4, _ = _qweight(K, 40, "int4-g32")
    lc = D.resolve(words, "seg", K, (12, 28), 4, 32)
    with pytest.raises(ValueError, match="whole"):
        launch.launch_gemv(x, c4, s4, torch.zeros(2, device=DEV), [12, 28], False, "int4-g32", lc)
    lc = D.resolve(words, "seg", K, (16, 24), 4)  # no group given: ranges not whole groups
    if lc.k_per_split % 32:
        with pytest.raises(ValueError, match="groups"):
            launch.launch_gemv(x, c4, s4, torch.zeros(2, device=DEV), [16, 24], False, "int4-g32", lc)
