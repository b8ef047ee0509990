"""Tests for the fused sparse GEMV kernels (teal/kernels).

CPU (CI): kernels run through Triton's interpreter on small odd shapes; this module sets
TRITON_INTERPRET=1 before anything imports our Triton kernels (Triton reads the variable
when a kernel is *decorated*, i.e. when teal.kernels.triton_gemv is first imported, which
teal.kernels does lazily).  CUDA: the same tests plus real Llama shapes.

Error bounds (||y - ref|| <= rtol ||ref|| + atol sqrt(n), ref in float64): the kernel
accumulates in fp32 (relative error ~ K * 2^-24, negligible) and rounds once to the output
dtype, unit roundoff 2^-9 ~ 2e-3 for bf16 and 2^-12 ~ 2.4e-4 for fp16.  rtol = 1e-2 (bf16)
and 2e-3 (fp16) leave ~5-8x headroom; atol = 1e-6 covers fp16 subnormal outputs.
Every test draws a fresh seed (printed in the failure message).
"""

from __future__ import annotations

import os
import random
import sys

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

from teal.kernels import launch  # noqa: E402
from dataclasses import replace  # noqa: E402

from teal.kernels.configs import GemvConfig  # noqa: E402

RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "fp16"]

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


MODES = ["zero", "inf", "q50", "channel"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,N", SMALL + REAL)
def test_sparse_gemv(K, N, mode, dtype):
    seed = _seed()
    x, wt = _x(K, dtype), _w(K, N, dtype)
    t = _thresholds(x, mode, None)
    y = tk.sparse_gemv(x, wt, t)
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
    bounds = tuple(int(b) for b in torch.tensor(sizes).cumsum(0))
    y = tk.sparse_gemv_segments(x, wt, t, bounds)
    assert y.shape == (N,)
    if mode == "inf":
        assert (y == 0).all(), f"seed={seed}"
        return
    ref = R.sparse_gemv_segments_ref(x, wt, t, bounds)
    _close(y, ref, dtype, seed, f"segments K={K} sizes={sizes} {mode}")
    # each segment on its own equals the single-projection op on the column-slice copy
    a = 0
    for s, n in enumerate(sizes):
        ys = tk.sparse_gemv(x, wt[:, a : a + n].contiguous(), t[s])
        _close(ys, ref[a : a + n], dtype, seed, f"segment {s}")
        a += n


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,F", GATED_SMALL + GATED_REAL)
def test_sparse_gated_gemv(K, F, mode, dtype):
    seed = _seed()
    x, wt = _x(K, dtype), _w(K, 2 * F, dtype)
    t = _thresholds(x, mode, 2)
    y = tk.sparse_gated_gemv(x, wt, t)
    assert y.shape == (F,)
    if mode == "inf":
        assert (y == 0).all(), f"seed={seed}"
        return
    ref = R.sparse_gated_gemv_ref(x, wt, t)
    _close(y, ref, dtype, seed, f"gated K={K} F={F} {mode}")


def test_batch_dims_and_masks():
    seed = _seed()
    K, N = 50, 24
    x, wt = _x(K, torch.bfloat16), _w(K, N, torch.bfloat16)
    t = _thresholds(x, "q50", None)
    y = tk.sparse_gemv(x.view(1, 1, K), wt, t)
    assert y.shape == (1, 1, N)
    _close(y.reshape(N), R.sparse_gemv_ref(x, wt, t), torch.bfloat16, seed, "batch dims")
    yg = tk.sparse_gated_gemv(x.view(1, K), _w(K, 8, torch.bfloat16), _thresholds(x, "q50", 2))
    assert yg.shape == (1, 4)
    # inf in masked-out channels must not leak (0 * inf)
    x2 = x.clone()
    x2[3] = float("inf")
    y2 = tk.sparse_gemv(x2, wt, torch.tensor(float("inf"), device=DEV))
    assert (y2 == 0).all(), f"seed={seed}"


# launch-level: every block config / pipelining / split-K path, NaN-poisoned buffers
_VARIANTS = [
    GemvConfig(block_n=16, block_k=16, split=1, pipe=0, acc2d=False),
    GemvConfig(block_n=32, block_k=16, split=3, pipe=1, acc2d=True),
    GemvConfig(block_n=64, block_k=32, split=2, pipe=2, acc2d=True),
    GemvConfig(block_n=16, block_k=16, split=0, pipe=2, acc2d=False, waves=64),
    # compact (kept-row lists): K = 77 = 32 + 32 + 13 (odd tail range), all-at-once tail
    GemvConfig(algo="compact", block_n=16, block_k=16, ksplit=32, rchunk=0),
    # 5 ranges of 16, 1-D accumulator, tail summed 2 partial rows per step
    GemvConfig(algo="compact", block_n=32, block_k=8, ksplit=16, acc2d=False, rchunk=2),
    # one range (no split-K), a chunk wider than the range
    GemvConfig(algo="compact", block_n=64, block_k=16, ksplit=128, rchunk=0),
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
    # ilist (each program builds its range's list): ranges of 32 (odd tail), one range
    GemvConfig(algo="ilist", block_n=16, block_k=16, ksplit=32, num_stages=3, rchunk=0),
    GemvConfig(algo="ilist", block_n=32, block_k=32, ksplit=128, num_stages=2),
]


def _cfg_id(c):
    if c.algo in ("list", "ilist"):
        return f"{c.algo}-bn{c.block_n}bk{c.block_k}ks{c.ksplit}st{c.num_stages}r{c.rchunk}"
    if c.algo == "dot":
        return f"dot-bn{c.block_n}bk{c.block_k}s{c.split}st{c.num_stages}r{c.rchunk}w{c.warm}"
    if c.algo == "compact":
        return f"cmp-bn{c.block_n}bk{c.block_k}ks{c.ksplit}a{int(c.acc2d)}r{c.rchunk}"
    return f"bn{c.block_n}bk{c.block_k}s{c.split}p{c.pipe}a{int(c.acc2d)}"


def _poisoned_scratch():
    """Kept-list scratch full of NaN bit patterns (huge indices): must never be read unwritten."""
    return torch.full((4096,), 0x7FC00000, dtype=torch.int32, device=DEV)


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
    launch.launch_segments(x, wt, t, sizes, config=cfg, out=out, workspace=ws, scratch=_poisoned_scratch())
    _close(out, R.sparse_gemv_segments_ref(x, wt, t, (19, 59, 65)), dtype, seed, f"segments {cfg}")
    F = 21
    wg = _w(K, 2 * F, dtype)
    tg = _thresholds(x, "q50", 2)
    outg = torch.full((F,), float("nan"), dtype=dtype, device=DEV)
    wsg = torch.full((64, 2 * F), float("nan"), dtype=torch.float32, device=DEV)
    launch.launch_gated(x, wg, tg, config=cfg, out=outg, workspace=wsg, scratch=_poisoned_scratch())
    _close(outg, R.sparse_gated_gemv_ref(x, wg, tg), dtype, seed, f"gated {cfg}")
    # arrival counters are left all-zero for the next launch
    assert int(launch.counters(DEV, 1).abs().sum()) == 0
    # deterministic: same inputs, bitwise same output
    out2 = launch.launch_segments(x, wt, t, sizes, config=cfg)
    assert torch.equal(out, out2), f"non-deterministic seed={seed}"


_CMP = GemvConfig(algo="compact", block_n=16, block_k=8, ksplit=32, rchunk=0)
# dot with K ranges of 32 (the same per-range cases: range 0 all dropped -> early exit),
# prologue read 16 channels at a time (2 trips per range)
_DOT = GemvConfig(algo="dot", block_n=16, block_k=16, split=4, num_stages=3, rchunk=0, warm=16)
_LIST = GemvConfig(algo="list", block_n=16, block_k=16, ksplit=32, num_stages=3, rchunk=0)
_ILIST = replace(_LIST, algo="ilist")


def _edge_x(K, dtype):
    """x with |x| in (0.5, 1.5): a threshold of 0 keeps everything, 2 keeps nothing."""
    sgn = torch.where(torch.rand(K) < 0.5, -1.0, 1.0)
    return (sgn * (0.5 + torch.rand(K))).to(dtype).to(DEV)


@pytest.mark.parametrize("cfg", [_CMP, _DOT, _LIST, _ILIST], ids=["compact", "dot", "list", "ilist"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_compact_edge_cases(dtype, cfg):
    """Per K range of the compact kernels: empty list, identity (all kept: no list written),
    exact zeros at t = 0 (list of all but the zeros), exactly 2 full chunks, ragged last range;
    ranges of one launch mixing these; gate and up with different cases."""
    seed = _seed()
    K, sizes = 100, (24, 17)  # ranges of 32: [0,32) [32,64) [64,96) [96,100)
    N = sum(sizes)
    x = _edge_x(K, dtype)
    x[70:75] = 0.0                                    # exact zeros: dropped even at t = 0
    wt = _w(K, N, dtype)
    tz = torch.zeros(2, K, device=DEV)
    t = tz.clone()
    t[:, 0:32] = 2.0                                   # range 0: no row kept
    t[0, 32:64] = 0.0                                  # range 1, seg 0: all kept (identity)
    t[1, 32:64] = torch.where(torch.arange(32, device=DEV) % 2 == 0, 0.0, 2.0)  # 16 = 2 chunks of 8
    t[:, 96:100] = torch.tensor([0.0, 2.0, 0.0, 2.0], device=DEV)  # ragged last range
    cases = {"mixed": t, "all": tz, "none": torch.full((2, K), 2.0, device=DEV), "scalar0": torch.zeros(2, device=DEV)}
    bounds = (24, 41)
    for name, tt in cases.items():
        out = torch.full((N,), float("nan"), dtype=dtype, device=DEV)
        launch.launch_segments(x, wt, tt, sizes, config=cfg, out=out, scratch=_poisoned_scratch())
        if name == "none":
            assert (out == 0).all(), f"seed={seed}"
        else:
            _close(out, R.sparse_gemv_segments_ref(x, wt, tt, bounds), dtype, seed, f"compact seg {name}")
        wg = _w(K, 2 * 21, dtype)
        tg = tt if tt.dim() == 1 else tt.flip(0).contiguous()  # gate/up swap the per-range cases
        outg = torch.full((21,), float("nan"), dtype=dtype, device=DEV)
        launch.launch_gated(x, wg, tg, config=cfg, out=outg, scratch=_poisoned_scratch())
        if name == "none":
            assert (outg == 0).all(), f"seed={seed}"
        else:
            _close(outg, R.sparse_gated_gemv_ref(x, wg, tg), dtype, seed, f"compact gated {name}")
    assert int(launch.counters(DEV, 1).abs().sum()) == 0


def test_compact_and_round1_deterministic():
    """Both algorithms agree with the reference and are bitwise reproducible (their fp32
    summation orders differ, so they need not be bitwise equal to each other)."""
    seed = _seed()
    K, N = 64, 48
    x, wt = _x(K, torch.float16), _w(K, N, torch.float16)
    t = _thresholds(x, "q50", None).reshape(1)
    ref = R.sparse_gemv_ref(x, wt, t[0])
    for cfg in (_CMP, GemvConfig(block_n=16, block_k=8, split=2)):
        y1 = launch.launch_segments(x, wt, t, [N], config=cfg)
        y2 = launch.launch_segments(x, wt, t, [N], config=cfg)
        assert torch.equal(y1, y2), f"seed={seed}"
        _close(y1, ref, torch.float16, seed, f"{cfg.algo}")


def test_compact_split_rules():
    from teal.kernels import configs as C

    cmp = GemvConfig(algo="compact", block_n=128, block_k=16)
    # explicit ksplit: ranges of 512, last one ragged
    assert C._split_for(14336, 16, replace(cmp, ksplit=512), 132) == (28, 512)
    assert C._split_for(1000, 4, replace(cmp, ksplit=512), 132) == (2, 512)
    # derived from waves: 4 * 132 / 112 tiles ~ 5 ranges -> 4096 / 5 -> 1024 (power of 2)
    assert C._split_for(4096, 112, replace(cmp, waves=4), 132) == (4, 1024)
    # never wider than the problem (next power of 2 of K), never narrower than a chunk
    assert C._split_for(77, 1, replace(cmp, ksplit=4096), 4) == (1, 128)
    assert C._split_for(77, 1000, replace(cmp, block_k=64, ksplit=16), 4) == (2, 64)
    assert C.rchunk_for(replace(cmp, rchunk=0), 28) == 32
    assert C.rchunk_for(replace(cmp, rchunk=0, block_n=512), 28) == 16
    assert C.rchunk_for(replace(cmp, rchunk=8), 28) == 8
    assert C.next_pow2(1) == 1 and C.next_pow2(5) == 8 and C.next_pow2(8) == 8


def test_table_json_roundtrip_and_env_hook(tmp_path):
    import json
    import subprocess

    from teal.kernels import configs as C

    tab = {("seg", 4096, 4096): GemvConfig(algo="compact", block_n=256, block_k=16, ksplit=256, rchunk=0)}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(C.table_to_json(tab)))
    assert C.load_table(str(path)) == tab
    code = (
        "import teal.kernels.configs as C\n"
        "c = C._TABLE[('seg', 4096, 4096)]\n"
        "assert c.algo == 'compact' and c.ksplit == 256, c\n"
        "assert C.round1_config('seg', 4096, 4096).algo == 'mask'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TEAL_GEMV_TABLE=str(path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_errors():
    K, N = 16, 8
    x = _x(K, torch.bfloat16)
    wt = _w(K, N, torch.bfloat16)
    t = torch.tensor(0.1, device=DEV)
    cases = [
        (lambda: tk.sparse_gemv(x.float(), wt, t), "dtype"),
        (lambda: tk.sparse_gemv(x, wt.half(), t), "dtype"),
        (lambda: tk.sparse_gemv(x.view(1, K).expand(2, K), wt, t), "batch"),
        (lambda: tk.sparse_gemv(x, _w(N, K, torch.bfloat16).t(), t), "contiguous"),
        (lambda: tk.sparse_gemv(x, _w(K + 1, N, torch.bfloat16), t), "K mismatch"),
        (lambda: tk.sparse_gemv(x, wt, t.double()), "float32"),
        (lambda: tk.sparse_gemv(x, wt, torch.zeros(K + 1, device=DEV)), "shape"),
        (lambda: tk.sparse_gemv(x, wt.reshape(-1), t), "2-D"),
        (lambda: launch.launch_segments(_x(2 * K, torch.bfloat16)[::2], wt, t.view(1), [N]), "contiguous"),
        (lambda: launch.launch_gated(_x(2 * K, torch.bfloat16)[::2], wt, torch.zeros(2, device=DEV)), "contiguous"),
        (lambda: tk.sparse_gemv_segments(x, wt, torch.zeros(3, device=DEV), (4, 4, 8)), "increasing"),
        (lambda: tk.sparse_gemv_segments(x, wt, torch.zeros(2, device=DEV), (4, 4)), "increasing"),
        (lambda: tk.sparse_gemv_segments(x, wt, torch.zeros(2, device=DEV), (3, 5)), "looks like sizes"),
        (lambda: tk.sparse_gemv_segments(x, wt, torch.zeros(2, device=DEV), (4, 7)), "last end offset"),
        (lambda: tk.sparse_gemv_segments(x, wt, torch.zeros(3, device=DEV), (4, 8)), "shape"),
        (lambda: tk.sparse_gemv_segments(x, wt, torch.zeros(5, device=DEV), (1, 2, 4, 6, 8)), "1 to 4"),
        (lambda: tk.sparse_gated_gemv(x, _w(K, 7, torch.bfloat16), torch.zeros(2, device=DEV)), "odd"),
        (lambda: tk.sparse_gated_gemv(x, wt, torch.zeros(3, device=DEV)), "shape"),
    ]
    if _CUDA:
        cases.append((lambda: tk.sparse_gemv(x, wt.cpu(), t), "device"))
        cases.append((lambda: tk.sparse_gemv(x, wt, t.cpu()), "x is on"))
    for fn, word in cases:
        with pytest.raises(ValueError, match=word):
            fn()


def test_import_without_triton_is_lazy():
    """teal.kernels must import without pulling in Triton (checked in a subprocess)."""
    import subprocess

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
        launch.launch_segments(x, wt, t, sizes, config=GemvConfig(block_n=16, block_k=16, split=5),
                               workspace=torch.empty(1, 59, device=DEV))
    with pytest.raises(ValueError, match="workspace"):
        launch.launch_gated(x, _w(K, 42, torch.float16), t, config=GemvConfig(block_n=16, block_k=16, split=3),
                            workspace=torch.empty(2, 42, device=DEV))
    out = launch.launch_segments(x, wt, t, sizes, config=GemvConfig(algo="list", ksplit=48, block_n=16, block_k=16))
    _close(out, R.sparse_gemv_segments_ref(x, wt, t, (19, 59)), torch.float16, seed, "ksplit 48")


def test_high_sparsity_dispatch(monkeypatch):
    """A projection calibrated for >= LIST_FROM takes its shape's kept-row-list config (if
    the high-sparsity table has one); below, or for other shapes, the usual table; results
    equal the float64 reference either way."""
    from teal.kernels import configs as C

    cfg, _, _ = C.pick_config("seg", 14336, 4096, lambda bn: 4096 // bn, 132, None, 0.9)
    assert cfg.algo == "list"
    cfg, _, _ = C.pick_config("seg", 14336, 4096, lambda bn: 4096 // bn, 132, None, 0.5)
    assert cfg.algo == "dot"
    cfg, _, _ = C.pick_config("gated", 4096, 14336, lambda bn: 14336 // bn, 132, None, C.LIST_FROM)
    assert cfg.algo == "list"
    cfg, _, _ = C.pick_config("seg", 4096, 6144, lambda bn: 6144 // bn, 132, None, 0.95)
    assert cfg.algo == "ilist"
    cfg, _, _ = C.pick_config("seg", 576, 960, lambda bn: 960 // bn, 132, None, 0.95)  # no entry
    assert cfg.algo == "mask"
    # through the public op at a small shape given a high-sparsity entry
    seed = _seed()
    K, sizes = 77, (19, 40)
    monkeypatch.setitem(C._TABLE_HIGH, ("seg", K, sum(sizes)),
                        GemvConfig(algo="ilist", block_n=16, block_k=16, ksplit=32))
    monkeypatch.setitem(C._TABLE_HIGH, ("gated", K, 21), GemvConfig(algo="list", block_n=16, block_k=16, ksplit=32))
    calls = []
    real = C.pick_config

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out[0].algo)
        return out
    monkeypatch.setattr(launch, "pick_config", spy)
    x, wt = _x(K, torch.bfloat16), _w(K, 59, torch.bfloat16)
    t = _thresholds(x, "q50", 2)
    y = tk.sparse_gemv_segments(x, wt, t, (19, 59), expected_sparsity=0.85)
    _close(y, R.sparse_gemv_segments_ref(x, wt, t, (19, 59)), torch.bfloat16, seed, "ilist via hint")
    wg = _w(K, 42, torch.bfloat16)
    yg = tk.sparse_gated_gemv(x, wg, t, expected_sparsity=0.9)
    _close(yg, R.sparse_gated_gemv_ref(x, wg, t), torch.bfloat16, seed, "list via hint")
    tk.sparse_gemv_segments(x, wt, t, (19, 59), expected_sparsity=0.5)
    assert calls == ["ilist", "list", "mask"]
    with pytest.raises(ValueError, match="expected_sparsity"):
        tk.sparse_gemv(x, wt, t[0], expected_sparsity=1.5)
