"""Tests for the fused sparse GEMV kernels (teal/kernels).

CPU (CI): kernels run through Triton's interpreter on small odd shapes; this module sets
TRITON_INTERPRET=1 before anything imports our Triton kernels (Triton reads the variable
when a kernel is *decorated*, i.e. when teal.kernels' kernel modules are first imported,
which teal.kernels does lazily).  CUDA: the same tests plus real Llama shapes.

Error bounds (||y - ref|| <= rtol ||ref|| + atol sqrt(n), ref in float64): the kernel
accumulates in fp32 (relative error ~ K * 2^-24, negligible) and rounds once to the output
dtype, unit roundoff 2^-9 ~ 2e-3 for bf16 and 2^-12 ~ 2.4e-4 for fp16.  rtol = 1e-2 (bf16)
and 2e-3 (fp16) leave ~5-8x headroom; atol = 1e-6 covers fp16 subnormal outputs.
Every test draws a fresh seed (printed in the failure message).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

_CUDA = torch.cuda.is_available()
# Triton must not have been imported before TRITON_INTERPRET=1 is set: triton.language's own
# @jit helpers (used by tl.sum, tl.sigmoid, ...) are decorated at Triton import time.
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import teal.kernels as tk  # noqa: E402
from teal.kernels import reference as R  # noqa: E402

DEV = torch.device("cuda" if _CUDA else "cpu")

if not tk.kernels_available(DEV):
    pytest.skip("Triton kernels not available on this device (interpreter off?)", allow_module_level=True)

if not _CUDA and _LATE:
    pytest.skip(
        "triton was imported (by another test module) before TRITON_INTERPRET=1 could be set; "
        "set it in tests/conftest.py when CUDA is unavailable",
        allow_module_level=True,
    )

from teal.kernels import dispatch as D, launch  # noqa: E402
from teal.kernels.dispatch import DispatchTable, GemvConfig, KernelPolicy, TableRow  # noqa: E402

RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "fp16"]
POLICY = KernelPolicy(interpreter=not _CUDA)

SMALL = [(96, 80), (1000, 3), (7, 1), (130, 300)]
REAL = [(4096, 4096), (4096, 1024), (14336, 4096), (4096, 14336)] if _CUDA else []
SEGS_SMALL = [(96, (30, 17, 33)), (61, (5, 1, 7, 3)), (40, (9,))]
SEGS_REAL = [(4096, (4096, 1024, 1024)), (4096, (4096, 4096, 4096))] if _CUDA else []
GATED_SMALL = [(96, 37), (33, 1), (200, 64)]
GATED_REAL = [(4096, 14336), (4096, 11008)] if _CUDA else []


def _seed() -> int:
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _thresholds(x: torch.Tensor, mode: str, rows: int | None) -> torch.Tensor:
    """rows None: () or (K,); else (rows,) or (rows, K)."""
    ax = x.float().abs()
    K = x.numel()
    n = 1 if rows is None else rows
    if mode == "zero":
        t = torch.zeros(n)
    elif mode == "inf":
        t = torch.full((n,), float("inf"))
    elif mode == "q50":
        t = torch.quantile(ax.cpu(), torch.rand(n) * 0.4 + 0.3)  # ~30-70% sparsity per row
    elif mode == "channel":
        q = torch.quantile(ax.cpu(), 0.5)
        t = torch.rand(n, K) * 2 * q
    else:
        raise AssertionError(mode)
    t = t.to(torch.float32).to(x.device)
    if rows is None:
        t = t[0]
    return t


def _close(y: torch.Tensor, ref: torch.Tensor, dtype, seed: int, what: str) -> None:
    assert y.dtype == dtype, what
    assert not torch.isnan(y).any(), f"{what}: NaN in output (unwritten?) seed={seed}"
    err = (y.double() - ref).norm().item()
    bound = RTOL[dtype] * ref.norm().item() + 1e-6 * ref.numel() ** 0.5
    assert err <= bound, f"{what}: ||y-ref||={err:.3g} > {bound:.3g} (||ref||={ref.norm().item():.3g}) seed={seed}"


def _x(K, dtype):
    return torch.randn(K, dtype=dtype, device=DEV)


def _w(K, N, dtype):
    return (torch.randn(K, N, device=DEV) / K**0.5).to(dtype)


def _bounds(sizes):
    return tuple(int(b) for b in torch.tensor(sizes).cumsum(0))


def _launch(x, wt, t, sizes, cfg, gated=False, **kw):
    """One launch of `cfg` resolved for this device (the level below the public API)."""
    lc = D.resolve(cfg, "gated" if gated else "seg", x.numel(), sizes, D.num_sms(DEV))
    return launch.launch_gemv(x, wt, None, t, list(sizes), gated, "dense", lc, **kw)


MODES = ["zero", "inf", "q50", "channel"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,N", SMALL + REAL)
def test_sparse_gemv(K, N, mode, dtype):
    seed = _seed()
    x, wt = _x(K, dtype), _w(K, N, dtype)
    t = _thresholds(x, mode, None)
    y = tk.sparse_gemv(x, wt, t, policy=POLICY)
    assert y.shape == (N,)
    if mode == "inf":
        assert (y == 0).all(), f"seed={seed}"
        return
    ref = R.sparse_gemv_ref(x, wt, t)
    _close(y, ref, dtype, seed, f"sparse_gemv K={K} N={N} {mode}")
    if mode == "zero":  # dense except exact zeros == dense product
        dense = x.double() @ wt.double()
        _close(y, dense, dtype, seed, "t=0 vs dense")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,sizes", SEGS_SMALL + SEGS_REAL)
def test_sparse_gemv_segments(K, sizes, mode, dtype):
    seed = _seed()
    N = sum(sizes)
    x, wt = _x(K, dtype), _w(K, N, dtype)
    t = _thresholds(x, mode, len(sizes))
    bounds = _bounds(sizes)
    y = tk.sparse_gemv(x, wt, t, bounds, policy=POLICY)
    assert y.shape == (N,)
    if mode == "inf":
        assert (y == 0).all(), f"seed={seed}"
        return
    ref = R.sparse_gemv_ref(x, wt, t, bounds)
    _close(y, ref, dtype, seed, f"segments K={K} sizes={sizes} {mode}")
    # each segment on its own equals the single-projection op on the column-slice copy
    a = 0
    for s, n in enumerate(sizes):
        ys = tk.sparse_gemv(x, wt[:, a : a + n].contiguous(), t[s], policy=POLICY)
        _close(ys, ref[a : a + n], dtype, seed, f"segment {s}")
        a += n


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,F", GATED_SMALL + GATED_REAL)
def test_sparse_gated_gemv(K, F, mode, dtype):
    seed = _seed()
    x, wt = _x(K, dtype), _w(K, 2 * F, dtype)
    t = _thresholds(x, mode, 2)
    y = tk.sparse_gated_gemv(x, wt, t, policy=POLICY)
    assert y.shape == (F,)
    if mode == "inf":
        assert (y == 0).all(), f"seed={seed}"
        return
    ref = R.sparse_gated_gemv_ref(x, wt, t)
    _close(y, ref, dtype, seed, f"gated K={K} F={F} {mode}")


def test_row_shapes_and_masks():
    """x of shape (K,), (1, K) and (1, 1, K): outputs keep the leading dims; one segment's
    thresholds given as (), (1,), (K,) or (1, K) agree; inf in a dropped channel never leaks."""
    seed = _seed()
    K, N = 50, 24
    x, wt = _x(K, torch.bfloat16), _w(K, N, torch.bfloat16)
    t = _thresholds(x, "q50", None)
    y = tk.sparse_gemv(x.view(1, 1, K), wt, t, policy=POLICY)
    assert y.shape == (1, 1, N)
    ref = R.sparse_gemv_ref(x, wt, t)
    _close(y.reshape(N), ref, torch.bfloat16, seed, "batch dims")
    assert tk.sparse_gemv(x.view(1, K), wt, t, policy=POLICY).shape == (1, N)
    for tt in (t.view(1), t.expand(K).contiguous(), t.expand(1, K).contiguous()):
        _close(tk.sparse_gemv(x, wt, tt, policy=POLICY), ref, torch.bfloat16, seed, f"t {tuple(tt.shape)}")
    yg = tk.sparse_gated_gemv(x.view(1, K), _w(K, 8, torch.bfloat16), _thresholds(x, "q50", 2), policy=POLICY)
    assert yg.shape == (1, 4)
    x2 = x.clone()
    x2[3] = float("inf")
    y2 = tk.sparse_gemv(x2, wt, torch.tensor(float("inf"), device=DEV), policy=POLICY)
    assert (y2 == 0).all(), f"seed={seed}"


# launch-level: every algorithm / pipelining / split-K path, NaN-poisoned buffers
_VARIANTS = [
    GemvConfig(block_n=16, block_k=16, split=1, pipe=1, acc2d=False),
    GemvConfig(block_n=32, block_k=16, split=3, pipe=1, acc2d=True),
    GemvConfig(block_n=64, block_k=32, split=2, pipe=2, acc2d=True),
    GemvConfig(block_n=16, block_k=16, split=0, pipe=2, acc2d=False, waves=64),
    # dot (tensor-core tiles, pipelined masked loads): split-K with an odd tail range, a
    # single range wider than K, and a chunked tail sum
    GemvConfig(algo="dot", block_n=16, block_k=16, split=3, num_stages=3, rchunk=0),
    GemvConfig(algo="dot", block_n=32, block_k=32, split=1, num_stages=2),
    GemvConfig(algo="dot", block_n=16, block_k=16, split=5, num_stages=4, rchunk=2),
    GemvConfig(algo="dot", block_n=16, block_k=32, split=2, num_stages=3, warm=0),
    # list (kept-row lists from a pre-pass): ranges of 32 (odd tail), one range, chunked tail
    GemvConfig(algo="list", block_n=16, block_k=16, ksplit=32, num_stages=3, rchunk=0),
    GemvConfig(algo="list", block_n=32, block_k=32, ksplit=128, num_stages=2),
    GemvConfig(algo="list", block_n=16, block_k=16, ksplit=16, num_stages=3, rchunk=2),
    # list, inline (each program builds its range's list): ranges of 32 (odd tail), one range
    GemvConfig(algo="list", inline=True, block_n=16, block_k=16, ksplit=32, num_stages=3, rchunk=0),
    GemvConfig(algo="list", inline=True, block_n=32, block_k=32, ksplit=128, num_stages=2),
]


def _cfg_id(c):
    if c.algo == "list":
        return f"list{'-inline' if c.inline else ''}-bn{c.block_n}bk{c.block_k}ks{c.ksplit}st{c.num_stages}r{c.rchunk}"
    if c.algo == "dot":
        return f"dot-bn{c.block_n}bk{c.block_k}s{c.split}st{c.num_stages}r{c.rchunk}w{c.warm}"
    return f"mask-bn{c.block_n}bk{c.block_k}s{c.split}p{c.pipe}a{int(c.acc2d)}"


@pytest.mark.parametrize("cfg", _VARIANTS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_variants_poisoned(cfg, dtype):
    seed = _seed()
    K, sizes = 77, (19, 40, 6)
    N = sum(sizes)
    x, wt = _x(K, dtype), _w(K, N, dtype)
    t = _thresholds(x, "channel", 3)
    out = torch.full((N,), float("nan"), dtype=dtype, device=DEV)
    ws = torch.full((64, N), float("nan"), dtype=torch.float32, device=DEV)
    _launch(x, wt, t, sizes, cfg, out=out, workspace=ws)
    _close(out, R.sparse_gemv_ref(x, wt, t, (19, 59, 65)), dtype, seed, f"segments {cfg}")
    F = 21
    wg = _w(K, 2 * F, dtype)
    tg = _thresholds(x, "q50", 2)
    outg = torch.full((F,), float("nan"), dtype=dtype, device=DEV)
    wsg = torch.full((64, 2 * F), float("nan"), dtype=torch.float32, device=DEV)
    _launch(x, wg, tg, (F, F), cfg, gated=True, out=outg, workspace=wsg)
    _close(outg, R.sparse_gated_gemv_ref(x, wg, tg), dtype, seed, f"gated {cfg}")
    # arrival counters are left all-zero for the next launch
    assert int(launch.counters(DEV, 1).abs().sum()) == 0
    # deterministic: same inputs, bitwise same output
    out2 = _launch(x, wt, t, sizes, cfg)
    assert torch.equal(out, out2), f"non-deterministic seed={seed}"


_MASK = GemvConfig(block_n=16, block_k=8, split=4, pipe=2, rchunk=0)
# dot with K ranges of 32 (range 0 all dropped -> early exit), prologue read 16 channels at
# a time (2 trips per range)
_DOT = GemvConfig(algo="dot", block_n=16, block_k=16, split=4, num_stages=3, rchunk=0, warm=16)
_LIST = GemvConfig(algo="list", block_n=16, block_k=16, ksplit=32, num_stages=3, rchunk=0)
_ILIST = replace(_LIST, inline=True)


def _edge_x(K, dtype):
    """x with |x| in (0.5, 1.5): a threshold of 0 keeps everything, 2 keeps nothing."""
    sgn = torch.where(torch.rand(K) < 0.5, -1.0, 1.0)
    return (sgn * (0.5 + torch.rand(K))).to(dtype).to(DEV)


@pytest.mark.parametrize("cfg", [_MASK, _DOT, _LIST, _ILIST], ids=["mask", "dot", "list", "list-inline"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_range_edge_cases(dtype, cfg):
    """Per K range of 32 channels: none kept, all kept, exact zeros at t = 0 (dropped even
    then), exactly 2 full chunks of a list, a ragged last range; ranges of one launch mixing
    these; gate and up with different cases."""
    seed = _seed()
    K, sizes = 100, (24, 17)  # ranges of 32: [0,32) [32,64) [64,96) [96,100)
    N = sum(sizes)
    x = _edge_x(K, dtype)
    x[70:75] = 0.0
    wt = _w(K, N, dtype)
    tz = torch.zeros(2, K, device=DEV)
    t = tz.clone()
    t[:, 0:32] = 2.0                                   # range 0: no row kept
    t[0, 32:64] = 0.0                                  # range 1, seg 0: all kept
    t[1, 32:64] = torch.where(torch.arange(32, device=DEV) % 2 == 0, 0.0, 2.0)  # 16 = 2 chunks of 8
    t[:, 96:100] = torch.tensor([0.0, 2.0, 0.0, 2.0], device=DEV)  # ragged last range
    cases = {"mixed": t, "all": tz, "none": torch.full((2, K), 2.0, device=DEV), "scalar0": torch.zeros(2, device=DEV)}
    bounds = (24, 41)
    for name, tt in cases.items():
        out = torch.full((N,), float("nan"), dtype=dtype, device=DEV)
        _launch(x, wt, tt, sizes, cfg, out=out)
        if name == "none":
            assert (out == 0).all(), f"seed={seed}"
        else:
            _close(out, R.sparse_gemv_ref(x, wt, tt, bounds), dtype, seed, f"seg {name}")
        wg = _w(K, 2 * 21, dtype)
        tg = tt if tt.dim() == 1 else tt.flip(0).contiguous()  # gate/up swap the per-range cases
        outg = torch.full((21,), float("nan"), dtype=dtype, device=DEV)
        _launch(x, wg, tg, (21, 21), cfg, gated=True, out=outg)
        if name == "none":
            assert (outg == 0).all(), f"seed={seed}"
        else:
            _close(outg, R.sparse_gated_gemv_ref(x, wg, tg), dtype, seed, f"gated {name}")
    assert int(launch.counters(DEV, 1).abs().sum()) == 0


def test_algorithms_deterministic():
    """Every algorithm agrees with the reference and is bitwise reproducible (their fp32
    summation orders differ, so they need not be bitwise equal to each other)."""
    seed = _seed()
    K, N = 64, 48
    x, wt = _x(K, torch.float16), _w(K, N, torch.float16)
    t = _thresholds(x, "q50", None).reshape(1)
    ref = R.sparse_gemv_ref(x, wt, t[0])
    for cfg in (_MASK, _DOT, _LIST, GemvConfig(block_n=16, block_k=8, split=2)):
        y1 = _launch(x, wt, t, [N], cfg)
        y2 = _launch(x, wt, t, [N], cfg)
        assert torch.equal(y1, y2), f"seed={seed}"
        _close(y1, ref, torch.float16, seed, f"{cfg.algo}")


def test_split_rules():
    lst = GemvConfig(algo="list", block_n=128, block_k=16)
    # explicit ksplit: ranges of 512, last one ragged
    assert D._split_for(14336, 16, replace(lst, ksplit=512), 132) == (28, 512)
    assert D._split_for(1000, 4, replace(lst, ksplit=512), 132) == (2, 512)
    # derived from waves: 4 * 132 / 112 tiles ~ 5 ranges -> 4096 / 5 -> 1024 (power of 2)
    assert D._split_for(4096, 112, replace(lst, waves=4), 132) == (4, 1024)
    # never wider than the problem (next power of 2 of K), never narrower than a chunk
    assert D._split_for(77, 1, replace(lst, ksplit=4096), 4) == (1, 128)
    assert D._split_for(77, 1000, replace(lst, block_k=64, ksplit=16), 4) == (2, 64)
    # masked/dot: k_per_split a multiple of block_k, no empty range, at most 256 ranges
    dot = GemvConfig(algo="dot", block_n=128, block_k=128, waves=3)
    assert D._split_for(14336, 32, dot, 132) == (12, 1280)
    assert D._split_for(100, 1, GemvConfig(block_k=16, split=300), 4) == (7, 16)
    lc = D.resolve(replace(lst, rchunk=0), "seg", 14336, (4096,), 132)
    assert (lc.split, lc.k_per_split, lc.rchunk) == (14, 1024, 16)
    assert D.resolve(replace(lst, rchunk=0, block_n=512), "seg", 14336, (4096,), 132).rchunk == 16
    assert D.resolve(replace(lst, rchunk=8, ksplit=512), "seg", 14336, (4096,), 132).rchunk == 8
    # block_n shrinks to the problem; warm never wider than the range
    lc = D.resolve(GemvConfig(algo="dot", block_n=512, block_k=16, warm=2048), "seg", 40, (9,), 4)
    assert lc.block_n == 16 and lc.warm == 16
    assert D.next_pow2(1) == 1 and D.next_pow2(5) == 8 and D.next_pow2(8) == 8
    assert D.Launch.decode(lc.encode()) == lc


def test_config_validation():
    for bad in (dict(algo="compact"), dict(block_n=100), dict(block_k=4), dict(pipe=0),
                dict(waves=0), dict(split=-1), dict(num_warps=0), dict(num_warps=3), dict(num_stages=0)):
        with pytest.raises(ValueError):
            GemvConfig(**bad)


def test_table_rows_and_json_roundtrip(tmp_path):
    """The H200 table: masked/dot kernels below each shape's cut-off (65-80% calibrated
    sparsity), kept-row lists above it, the ballot rows ahead of both where they measured
    faster; shapes
    without a row take the generic rule; a table survives JSON; the policy uses the table
    it is given, and nothing in the environment changes the default table."""
    h200 = "NVIDIA H200"
    T = DispatchTable(D.H200_QUANT_ROWS + D.H200_ROWS + D.H200_SMALL_ROWS)  # the Triton rows

    def algo(kind, K, N, s, table=T):
        row = table.lookup(h200, kind, K, N, "bfloat16", "dense", s)
        return None if row is None else (row.config.algo, row.config.inline)
    assert algo("seg", 14336, 4096, 0.9) == ("list", True)
    assert algo("seg", 14336, 4096, 0.5) == ("dot", False)
    assert algo("gated", 4096, 14336, 0.7) == ("list", False)
    assert algo("gated", 4096, 14336, 0.69) == ("dot", False)
    assert algo("seg", 4096, 6144, 0.95) == ("list", True)
    assert algo("seg", 4096, 4096, 0.79) == ("dot", False)
    assert algo("seg", 4096, 12288, 0.5) == ("mask", False)
    assert algo("seg", 4096, 12288, 0.75) == ("list", True)
    assert algo("seg", 576, 960, 0.95) == ("torch", False)  # the default model: cuBLAS wins
    assert algo("gated", 576, 1536, 0.5) == ("torch", False)
    assert algo("seg", 576, 576, 0.5) == ("dot", False)
    assert algo("seg", 1536, 576, 0.5) == ("dot", False)
    assert algo("seg", 960, 2560, 0.5) is None
    # the ballot rows come first in the default table, where they measured faster; the
    # Triton rows still cover each shape's other sparsities
    B = D.DEFAULT_TABLE
    assert B.rows[:len(D.H200_QUANT_ROWS)] == D.H200_QUANT_ROWS
    assert algo("seg", 14336, 4096, 0.5, B) == ("ballot", False)
    assert algo("seg", 14336, 4096, 0.9, B) == ("list", True)
    assert algo("seg", 4096, 4096, 0.2, B) == ("dot", False)
    assert algo("gated", 4096, 14336, 0.3, B) == algo("gated", 4096, 14336, 0.3)
    assert algo("seg", 576, 960, 0.5, B) == ("torch", False)
    for r in D.H200_BALLOT_ROWS:  # disjoint ranges inside [0, 1), unroll 4 or 8
        assert r.config.algo == "ballot" and r.config.num_stages in (4, 8)
        ranges = sorted(x.sparsity for x in D.H200_BALLOT_ROWS if (x.kind, x.K, x.N) == (r.kind, r.K, r.N))
        assert 0.0 <= ranges[0][0] and ranges[-1][1] < 1.0
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), ranges
    for r in T.rows:  # every shape's ranges cover [0, 1) once
        ranges = sorted(x.sparsity for x in T.rows
                        if (x.kind, x.K, x.N, x.wformat) == (r.kind, r.K, r.N, r.wformat))
        assert ranges[0][0] == 0.0 and ranges[-1][1] == 1.0
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), ranges
    assert T.lookup("NVIDIA H100", "seg", 4096, 6144, "bfloat16", "dense", 0.5) is None
    assert T.lookup(h200, "seg", 4096, 6144, "bfloat16", "int8", 0.5).wformat == "int8"
    assert T.lookup(h200, "seg", 4096, 6144, "float16", "int8", 0.5) is None  # measured in bf16
    assert T.lookup(h200, "seg", 4096, 6144, "bfloat16", "int4-g128", 0.5) is None  # generic rule
    assert all(r.source for r in T.rows), "every row names its provenance"
    assert D.generic_config("seg", 576, 960).algo == "dot"  # small shapes: _DOT_SMALL
    assert D.generic_config("gated", 4096, 14336).algo == "dot"
    path = tmp_path / "table.json"
    mine = DispatchTable((TableRow(h200, "seg", 4096, 4096, GemvConfig(algo="list", ksplit=256, rchunk=0),
                                   sparsity=(0.0, 1.0), source="test"),))
    path.write_text(json.dumps(mine.to_json()))
    assert DispatchTable.load(path) == mine
    assert algo("seg", 4096, 4096, 0.5, DispatchTable.load(path).with_rows(()).with_rows(mine.rows)) == ("list", False)
    good = mine.to_json()[0]
    for bad in ([{"gpu": 1}], {"rows": []}, [dict(good, sparsity=[0.5])], [dict(good, K="40")],
                [dict(good, kind="segg")], [dict(good, dtypes="bfloat16")],
                [dict(good, config=dict(good["config"], num_warps=0))]):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="kernel table"):
            DispatchTable.load(tmp_path / "bad.json")
    code = ("import teal.kernels.dispatch as D\n"
            "r = D.DEFAULT_TABLE.lookup('NVIDIA H200', 'seg', 4096, 4096, 'bfloat16', 'dense', 0.2)\n"
            "assert r.config.algo == 'dot', r\nprint('ok')\n")
    env = dict(os.environ, TEAL_GEMV_TABLE=str(path), TEAL_LIST_FROM="0.1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_errors():
    K, N = 16, 8
    x = _x(K, torch.bfloat16)
    wt = _w(K, N, torch.bfloat16)
    t = torch.tensor(0.1, device=DEV)
    cases = [
        (lambda: tk.sparse_gemv(x.float(), wt, t, policy=POLICY), "dtype"),
        (lambda: tk.sparse_gemv(x, wt.half(), t, policy=POLICY), "dtype"),
        (lambda: tk.sparse_gemv(x.view(1, K).expand(17, K), wt, t, policy=POLICY), "1 to 16 rows"),
        (lambda: tk.sparse_gemv(x.view(1, K).expand(2, K), wt, t, policy=POLICY,
                                launch=D.resolve(GemvConfig(), "seg", K, [N], 4)), "dot algorithm"),
        (lambda: launch.launch_gemv(x.view(1, K).expand(2, K).contiguous(), wt, None, t.view(1),
                                    [N], False, "dense", D.resolve(GemvConfig(), "seg", K, [N], 4)),
         "dot algorithm"),
        (lambda: tk.sparse_gemv(x, _w(N, K, torch.bfloat16).t(), t, policy=POLICY), "contiguous"),
        (lambda: tk.sparse_gemv(x, _w(K + 1, N, torch.bfloat16), t, policy=POLICY), "K mismatch"),
        (lambda: tk.sparse_gemv(x, wt, t.double(), policy=POLICY), "float32"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(K + 1, device=DEV), policy=POLICY), "shape"),
        (lambda: tk.sparse_gemv(x, wt.reshape(-1), t, policy=POLICY), "2-D"),
        (lambda: tk.sparse_gemv(x, wt, t, wformat="int3", policy=POLICY), "weight format"),
        (lambda: tk.sparse_gemv(x, wt, t, scales=torch.ones(N, device=DEV), policy=POLICY), "scales"),
        (lambda: launch.launch_gemv(_x(2 * K, torch.bfloat16)[::2], wt, None, t.view(1), [N], False, "dense",
                                    D.resolve(GemvConfig(), "seg", K, [N], 4)), "contiguous"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(3, device=DEV), (4, 4, 8), policy=POLICY), "increasing"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(2, device=DEV), (4, 4), policy=POLICY), "increasing"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(2, device=DEV), (3, 5), policy=POLICY), "looks like sizes"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(2, device=DEV), (4, 7), policy=POLICY), "last end offset"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(3, device=DEV), (4, 8), policy=POLICY), "shape"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(5, device=DEV), (1, 2, 4, 6, 8), policy=POLICY), "1 to 4"),
        (lambda: tk.sparse_gated_gemv(x, _w(K, 7, torch.bfloat16), torch.zeros(2, device=DEV), policy=POLICY), "odd"),
        (lambda: tk.sparse_gated_gemv(x, wt, torch.zeros(3, device=DEV), policy=POLICY), "shape"),
        (lambda: tk.sparse_gemv(x, wt, t, sparsity=1.5, policy=POLICY), "sparsity"),
        (lambda: tk.sparse_gemv(x, wt, t, sparsity=1.0, policy=POLICY), "sparsity"),
    ]
    if not _CUDA:  # CPU tensors run on the interpreter only under a policy that allows it
        cases.append((lambda: tk.sparse_gemv(x, wt, t, policy=KernelPolicy()), "interpreter"))
    if _CUDA:
        cases.append((lambda: tk.sparse_gemv(x, wt.cpu(), t), "device"))
        cases.append((lambda: tk.sparse_gemv(x, wt, t.cpu()), "x is on"))
    for fn, word in cases:
        with pytest.raises(ValueError, match=word):
            fn()


# --------------------------------------------------------------------------- several rows
# Batch decoding and speculative verification: M rows per call, each with its own mask (the
# dot kernel's A operand holds the rows; a weight row is read if any row keeps it).
_ROWS_CASES = [
    (2, GemvConfig(algo="dot", block_n=16, block_k=16, split=3, num_stages=3, rchunk=0, warm=16)),
    (5, GemvConfig(algo="dot", block_n=32, block_k=32, split=1, num_stages=2)),
    (16, GemvConfig(algo="dot", block_n=16, block_k=16, split=4, num_stages=3, rchunk=2)),
]


def _rows_x(M, K, dtype, t_low):
    """M rows of independent draws with per-row scales (so the rows keep different channel
    sets); the last row lies below every threshold (`t_low`), so its output is exact zeros."""
    x = torch.randn(M, K) * (0.5 + torch.rand(M, 1))
    x[-1] = torch.where(torch.rand(K) < 0.5, -1.0, 1.0) * t_low * 0.5
    return x.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M,cfg", _ROWS_CASES, ids=[f"M{m}-{_cfg_id(c)}" for m, c in _ROWS_CASES])
def test_rows_own_masks(M, cfg, dtype):
    """Every row of an M-row call equals its own masked GEMV (float64 reference), for
    segments with scalar thresholds and for gate/up with per-channel ones, through
    NaN-poisoned outputs and workspaces; counters left zero; deterministic."""
    seed = _seed()
    K, sizes, F = 77, (19, 40, 6), 21
    N = sum(sizes)
    wt, wg = _w(K, N, dtype), _w(K, 2 * F, dtype)
    t = torch.tensor([0.6, 0.9, 1.2], device=DEV)
    tg = (torch.rand(2, K) * 1.5 + 0.3).to(DEV)
    x = _rows_x(M, K, dtype, 0.3)
    keeps = x.float().abs() > t[0]
    assert M == 2 or not torch.equal(keeps[0], keeps[1]), f"rows share a mask seed={seed}"
    bounds = _bounds(sizes)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    ws = torch.full((64 * M, N), float("nan"), dtype=torch.float32, device=DEV)
    lc = D.resolve(cfg, "seg", K, sizes, D.num_sms(DEV))
    launch.launch_gemv(x, wt, None, t, list(sizes), False, "dense", lc, out=out, workspace=ws)
    outg = torch.full((M, F), float("nan"), dtype=dtype, device=DEV)
    wsg = torch.full((64 * M, 2 * F), float("nan"), dtype=torch.float32, device=DEV)
    lcg = D.resolve(cfg, "gated", K, (F, F), D.num_sms(DEV))
    launch.launch_gemv(x, wg, None, tg, [F, F], True, "dense", lcg, out=outg, workspace=wsg)
    for m in range(M):
        _close(out[m], R.sparse_gemv_ref(x[m], wt, t, bounds), dtype, seed, f"row {m} of {M}")
        _close(outg[m], R.sparse_gated_gemv_ref(x[m], wg, tg), dtype, seed, f"gated row {m} of {M}")
    assert (out[-1] == 0).all() and (outg[-1] == 0).all(), f"all-dropped row not zero seed={seed}"
    assert int(launch.counters(DEV, 1).abs().sum()) == 0
    assert torch.equal(out, launch.launch_gemv(x, wt, None, t, list(sizes), False, "dense", lc)), \
        f"non-deterministic seed={seed}"


def test_rows_public_api_and_dispatch():
    """The public GEMVs take (M, K) and (B, T, K) inputs; a policy resolves a dot launch for
    several rows whatever its one-row kernel; int4 and out-of-range rows are refused."""
    seed = _seed()
    K, N = 50, 24
    x = torch.randn(2, 3, K).to(torch.bfloat16).to(DEV)
    wt = _w(K, N, torch.bfloat16)
    t = torch.tensor(0.7, device=DEV)
    y = tk.sparse_gemv(x, wt, t, policy=KernelPolicy(interpreter=not _CUDA, config=_MASK))
    assert y.shape == (2, 3, N)
    ref = torch.stack([R.sparse_gemv_ref(r, wt, t) for r in x.reshape(6, K)])
    _close(y.reshape(6, N), ref, torch.bfloat16, seed, "(B, T, K) rows")
    lists = KernelPolicy(config=_LIST)  # a kept-row-list policy: rows still run on dot
    assert lists.launch("seg", 4096, (4096, 1024, 1024), torch.bfloat16, "dense", 0.8,
                        "cpu").algo_name == "list"
    assert lists.launch("seg", 4096, (4096, 1024, 1024), torch.bfloat16, "dense", 0.8, "cpu",
                        rows=4).algo_name == "dot"
    assert lists.launch("seg", K, (N,), torch.bfloat16, "dense", 0.5, "cpu", rows=2).algo_name == "dot"
    big = KernelPolicy()
    assert big.launch("gated", 4096, (14336, 14336), torch.bfloat16, "int8", 0.5, "cpu",
                      rows=3).algo_name == "dot"
    for bad, word in ((dict(rows=17), "1 to 16 rows"), (dict(rows=0), "1 to 16 rows")):
        with pytest.raises(ValueError, match=word):
            big.launch("seg", K, (N,), torch.bfloat16, "dense", 0.5, "cpu", **bad)
    with pytest.raises(ValueError, match="one row per call"):
        big.launch("seg", K, (N,), torch.bfloat16, "int4-g32", 0.5, "cpu", rows=2)
    with pytest.raises(ValueError, match="max_rows"):
        KernelPolicy(max_rows=17)
    assert not KernelPolicy(max_rows=1).takes_rows("dense")
    assert KernelPolicy().takes_rows("int8") and not KernelPolicy().takes_rows("int4-g128")


def test_import_without_triton_is_lazy():
    """teal.kernels must import without pulling in Triton (checked in a subprocess)."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'triton' or name.startswith('triton.'):\n"
        "        raise ImportError('no triton')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "import torch, teal.kernels as tk\n"
        "assert not tk.kernels_available('cpu')\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_small_workspace_and_odd_ksplit():
    """A caller's split-K workspace that is too small is a ValueError (never an overrun); a
    list ksplit that is not a power of two is rounded up."""
    seed = _seed()
    K, sizes = 77, (19, 40)
    x, wt = _x(K, torch.float16), _w(K, 59, torch.float16)
    t = _thresholds(x, "q50", 2)
    with pytest.raises(ValueError, match="workspace"):
        _launch(x, wt, t, sizes, GemvConfig(block_n=16, block_k=16, split=5),
                workspace=torch.empty(1, 59, device=DEV))
    with pytest.raises(ValueError, match="workspace"):
        _launch(x, _w(K, 42, torch.float16), t, (21, 21), GemvConfig(block_n=16, block_k=16, split=3),
                gated=True, workspace=torch.empty(2, 42, device=DEV))
    out = _launch(x, wt, t, sizes, GemvConfig(algo="list", ksplit=48, block_n=16, block_k=16))
    _close(out, R.sparse_gemv_ref(x, wt, t, (19, 59)), torch.float16, seed, "ksplit 48")


def test_policy_chooses_by_calibrated_sparsity(monkeypatch):
    """Through the public ops: a table row for this device's key at a small shape is taken
    in its sparsity range (kept-row lists from 80%), the generic rule elsewhere, and a
    forced config wins over the table; results equal the float64 reference either way."""
    seed = _seed()
    K, sizes = 77, (19, 40)
    key = D.device_key(DEV)
    lst = GemvConfig(algo="list", inline=True, block_n=16, block_k=16, ksplit=32)
    table = D.DEFAULT_TABLE.with_rows([
        TableRow(key, "seg", K, sum(sizes), lst, sparsity=(0.8, 1.0), source="test"),
        TableRow(key, "gated", K, 21, replace(lst, inline=False), sparsity=(0.8, 1.0), source="test")])
    policy = replace(POLICY, table=table)
    calls = []
    real = launch.launch_gemv

    def spy(*a, **k):
        calls.append(a[7].algo_name + ("-inline" if a[7].inline else ""))
        return real(*a, **k)
    import teal.kernels.ops as ops
    monkeypatch.setattr(ops, "launch_gemv", spy)
    x, wt = _x(K, torch.bfloat16), _w(K, 59, torch.bfloat16)
    t = _thresholds(x, "q50", 2)
    y = tk.sparse_gemv(x, wt, t, (19, 59), sparsity=0.85, policy=policy)
    _close(y, R.sparse_gemv_ref(x, wt, t, (19, 59)), torch.bfloat16, seed, "list via table")
    wg = _w(K, 42, torch.bfloat16)
    yg = tk.sparse_gated_gemv(x, wg, t, sparsity=0.9, policy=policy)
    _close(yg, R.sparse_gated_gemv_ref(x, wg, t), torch.bfloat16, seed, "gated list via table")
    tk.sparse_gemv(x, wt, t, (19, 59), sparsity=0.5, policy=policy)
    tk.sparse_gemv(x, wt, t, (19, 59), sparsity=0.5, policy=replace(policy, config=_DOT))
    assert calls == ["list-inline", "list", "dot", "dot"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("M", [1, 3])
def test_torch_algorithm(mode, M):
    """Algorithm "torch" (the masked cuBLAS GEMM a table row picks where no kernel beats
    cuBLAS): each segment / gate and up masked on its own rows, equal to the float64
    reference for every row, scalar and per-channel thresholds, 0 and +inf; no Triton launch;
    the low-level launch refuses it; quantized weights fit it back to a kernel; a module on it
    counts every weight row as read."""
    seed = _seed()
    policy = replace(POLICY, config=GemvConfig(algo="torch"))
    K, sizes = 61, (5, 1, 7, 3)
    x = torch.randn(M, K, dtype=torch.bfloat16, device=DEV)
    t = _thresholds(x[0], mode, len(sizes))
    wt = _w(K, sum(sizes), torch.bfloat16)
    y = tk.sparse_gemv(x, wt, t, _bounds(sizes), sparsity=0.5, policy=policy)
    for m in range(M):
        _close(y[m], R.sparse_gemv_ref(x[m], wt, t, _bounds(sizes)), torch.bfloat16, seed, f"torch row {m}")
    wg, tg = _w(K, 2 * 21, torch.bfloat16), _thresholds(x[0], mode, 2)
    yg = tk.sparse_gated_gemv(x, wg, tg, sparsity=0.5, policy=policy)
    for m in range(M):
        _close(yg[m], R.sparse_gated_gemv_ref(x[m], wg, tg), torch.bfloat16, seed, f"torch gated row {m}")
    lc = policy.launch("seg", K, sizes, torch.bfloat16, "dense", 0.5, DEV)
    assert lc.algo_name == "torch" and policy.launch("seg", K, sizes, torch.bfloat16, "dense", 0.5,
                                                     DEV, rows=3).algo_name == "torch"
    with pytest.raises(ValueError, match="no Triton kernel"):
        launch.launch_gemv(x[0].contiguous(), wt, None, t, list(sizes), False, "dense", lc)
    assert D.fit_format(GemvConfig(algo="torch"), "seg", K, 16, "int8").algo != "torch"
    from teal.generation import skips_weight_rows
    from teal.sparse_linear import SparseLinear
    mod = SparseLinear(K, [5, 11], names=["q_proj", "k_proj"]).to(DEV, torch.bfloat16)
    mod.set_thresholds([torch.tensor(0.5), torch.tensor(0.5)], sparsities=[0.5, 0.5])
    mod.sparse = True
    mod.set_kernel_policy(policy)
    assert mod._launch is not None and not skips_weight_rows(mod)
    mod.set_kernel_policy(POLICY)
    assert skips_weight_rows(mod)


# ---------------------------------------------------------------- algorithm "ballot" (CUDA C++)
_BALLOT = GemvConfig(algo="ballot", num_warps=4, num_stages=8, waves=4, rchunk=0)
_BALLOT_CASES = [  # (kind, K, sizes): odd K, partial column tiles, several segments
    ("seg", 1000, (40,)), ("seg", 97, (264, 8, 520)), ("seg", 333, (16, 24, 8, 256)),
    ("gated", 161, (72, 72)), ("seg", 4096, (4096, 1024, 1024)), ("gated", 4096, (14336, 14336)),
    ("seg", 14336, (4096,))]


def _ballot_or_skip():
    if not _CUDA:
        pytest.skip("the ballot kernel runs on CUDA only (CPU: the fallback tests below)")
    from teal.kernels import ballot
    if not ballot.available(DEV):
        pytest.skip("the ballot kernel cannot be built here (no nvcc)")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _BALLOT_CASES, ids=lambda c: f"{c[0]}{c[1]}x{'-'.join(map(str, c[2]))}")
@pytest.mark.parametrize("cfg", [_BALLOT, replace(_BALLOT, num_stages=8, num_warps=8, split=1),
                                 replace(_BALLOT, num_stages=4, num_warps=1, split=3),
                                 replace(_BALLOT, num_stages=8, num_warps=8, split=16)],
                         ids=["u8w4v4", "u8w8s1", "u4w1s3", "u8w8s16"])
def test_ballot_against_float64(cfg, case, mode, dtype):
    """The ballot kernel equals the float64 masked product: segments with their own
    thresholds, gate/up with SwiGLU, scalar and per-channel thresholds, 0 and +inf, split-K off,
    in a cluster (split <= 16 on compute capability 9.0+) and through the global tail (larger
    splits, or older GPUs); outputs and workspace poisoned with NaN first; bitwise repeatable,
    and the same bits with the cluster forced off; the arrival counters are left at zero."""
    _ballot_or_skip()
    seed = _seed()
    kind, K, sizes = case
    gated = kind == "gated"
    x = _x(K, dtype)
    N = 2 * sizes[0] if gated else sum(sizes)
    wt = _w(K, N, dtype)
    t = _thresholds(x, mode, 2 if gated else len(sizes))
    lc = D.resolve(cfg, kind, K, sizes, D.num_sms(DEV))
    assert lc.algo_name == "ballot" and lc.k_per_split % 32 == 0
    out = torch.full((sizes[0] if gated else N,), float("nan"), dtype=dtype, device=DEV)
    ws = torch.full((lc.split * N,), float("nan"), dtype=torch.float32, device=DEV)
    y = launch.launch_gemv(x, wt, None, t, list(sizes), gated, "dense", lc, out=out, workspace=ws)
    ref = (R.sparse_gated_gemv_ref(x, wt, t) if gated else R.sparse_gemv_ref(x, wt, t, _bounds(sizes)))
    _close(y, ref, dtype, seed, f"ballot {kind} K={K} {sizes} {mode}")
    y2 = launch.launch_gemv(x, wt, None, t, list(sizes), gated, "dense", lc)
    assert torch.equal(y, y2), f"not bitwise repeatable seed={seed}"
    from teal.kernels import ballot
    if lc.split > 1:
        y3 = torch.full_like(out, float("nan"))
        ballot.launch(x, wt, t, sizes, gated, lc.k_per_split, lc.num_warps, lc.num_stages, y3,
                      ws, launch.counters(DEV, 4096), cluster=False)
        assert torch.equal(y, y3), f"cluster and global split-K sums differ seed={seed}"
    torch.cuda.synchronize()
    assert int(launch.counters(DEV, 1).abs().sum()) == 0


def test_ballot_public_api_and_compiled_graph():
    """Through the public API and the registered op, in a CUDA graph (torch.compile
    reduce-overhead), the ballot kernel gives the eager result."""
    _ballot_or_skip()
    seed = _seed()
    policy = replace(POLICY, config=_BALLOT)
    K, sizes = 4096, (4096, 1024, 1024)
    x = torch.randn(1, K, dtype=torch.bfloat16, device=DEV)
    wt = _w(K, sum(sizes), torch.bfloat16)
    t = _thresholds(x[0], "q50", 3)
    y = tk.sparse_gemv(x, wt, t, _bounds(sizes), sparsity=0.5, policy=policy)
    _close(y[0], R.sparse_gemv_ref(x[0], wt, t, _bounds(sizes)), torch.bfloat16, seed, "ballot api")
    lc = policy.launch("seg", K, sizes, torch.bfloat16, "dense", 0.5, DEV)  # (as SparseLinear does)
    assert lc.algo_name == "ballot"
    ends = _bounds(sizes)  # (outside the compiled function: it reads a tensor)
    f = torch.compile(lambda a: tk.sparse_gemv(a, wt, t, ends, launch=lc),
                      mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        yc = f(x)
    assert torch.equal(yc, y), f"compiled graph differs seed={seed}"


def test_ballot_fallback_and_refusals():
    """Where the ballot kernel cannot run (CPU, the interpreter, segments not multiples of 8
    columns, quantized weights, several rows) dispatch takes a Triton config; the low-level
    launch refuses what it cannot take with a one-line error."""
    policy = replace(POLICY, config=_BALLOT)
    for sizes in [(4096,), (30, 17, 33)]:
        lc = policy.launch("seg", 96, sizes, torch.bfloat16, "dense", 0.5, "cpu")
        assert lc.algo_name != "ballot"
    lc = policy.launch("seg", 4096, (4096,), torch.bfloat16, "int8", 0.5, DEV)
    assert lc.algo_name != "ballot"
    assert D.fit_format(_BALLOT, "seg", 4096, 4096, "int4-g128").algo != "ballot"
    lc = policy.launch("seg", 4096, (4096,), torch.bfloat16, "dense", 0.5, DEV, rows=3)
    assert lc.algo_name == "dot"
    if _CUDA:
        lc = policy.launch("seg", 96, (30, 17, 33), torch.bfloat16, "dense", 0.5, DEV)
        assert lc.algo_name != "ballot"
    lc = D.resolve(_BALLOT, "seg", 64, (64,), 4)
    assert lc.algo_name == "ballot" and lc.block_n == 256 and lc.k_per_split % 32 == 0
    x = torch.randn(64, dtype=torch.bfloat16)
    wt = torch.randn(64, 64, dtype=torch.bfloat16)
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="one row of dense weights on a CUDA device"):
        launch.launch_gemv(x, wt, None, t, [64], False, "dense", lc)
    # a table's ballot row that cannot run here hands the call to the next matching row
    table = D.DispatchTable((
        D.TableRow("cpu", "seg", 96, 64, _BALLOT, sparsity=(0.0, 0.6)),
        D.TableRow("cpu", "seg", 96, 64, GemvConfig(algo="dot", block_n=32, block_k=16), sparsity=(0.0, 1.0))))
    lc = replace(POLICY, table=table).launch("seg", 96, (64,), torch.bfloat16, "dense", 0.5, "cpu")
    assert lc.algo_name == "dot" and lc.block_n == 32
    from teal.kernels import ballot
    assert ballot.fits((4096, 1024), torch.bfloat16, "dense")
    assert not ballot.fits((4096, 1020), torch.bfloat16, "dense")
    assert not ballot.fits((64,), torch.float32, "dense")
    assert not ballot.available("cpu")
