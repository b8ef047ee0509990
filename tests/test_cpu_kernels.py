"""The CPU decode kernels (teal/kernels/cpu.py): the C++ kernel and the torch gather path.

Against the float64 masked reference (teal.kernels.reference) on fresh random inputs, odd
shapes, several rows with their own masks, every threshold form (0, +inf, per projection,
per channel).  Bound: ||y - ref|| <= rtol ||ref|| + 1e-6 sqrt(n), as in test_kernels.py (fp32
accumulation, one rounding; gated outputs round g, u and silu(g) as torch's eager ops do).
"""

from __future__ import annotations

import random

import pytest
import torch

import teal
import teal.kernels.cpu as C
import teal.sparse_linear as SL
from teal.kernels import reference as R
from teal.kernels.dispatch import KernelPolicy

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(RTOL)
MODES = ["zero", "inf", "q50", "channel"]


def _seed() -> int:
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _thresholds(x: torch.Tensor, mode: str, S: int) -> torch.Tensor:
    ax = x.float().abs().flatten()
    if mode == "zero":
        return torch.zeros(S)
    if mode == "inf":
        return torch.full((S,), float("inf"))
    if mode == "q50":  # 30-70% sparsity, a different threshold per projection
        return torch.quantile(ax, torch.rand(S) * 0.4 + 0.3).float()
    return torch.rand(S, x.shape[-1]) * 2 * torch.quantile(ax, 0.5)  # per channel


def _close(y, ref, dtype, seed, what):
    assert y.dtype == dtype and y.shape == ref.shape, what
    assert not torch.isnan(y).any(), f"{what}: NaN seed={seed}"
    err = (y.double() - ref).norm().item()
    bound = RTOL[dtype] * ref.norm().item() + 1e-6 * ref.numel() ** 0.5
    assert err <= bound, f"{what}: ||y-ref||={err:.3g} > {bound:.3g} seed={seed}"


def _inputs(M, K, N, dtype):
    x = torch.randn(M, K).to(dtype)
    x[:, ::7] = 0  # exact zeros are dropped at threshold 0
    wt = (torch.randn(K, N) / K**0.5).to(dtype)
    return x, wt


def _ref_rows(x, wt, t, ends, gated):
    """Each row masked on its own (the reference takes one row per call here)."""
    if gated:
        return torch.cat([R.sparse_gated_gemv_ref(r, wt, t) for r in x]).view(x.shape[0], -1)
    return torch.stack([R.sparse_gemv_ref(r, wt, t, ends) for r in x])


IMPLS = [("compiled", 1), ("compiled", 3), ("compiled", 11), ("gather", 1)]


@pytest.mark.parametrize("impl,M", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,sizes", [(61, (5, 1, 7, 3)), (96, (30, 17, 33)), (200, (517,))])
def test_segments(K, sizes, mode, dtype, impl, M):
    seed = _seed()
    ends = torch.tensor(sizes).cumsum(0).tolist()
    x, wt = _inputs(M, K, ends[-1], dtype)
    t = _thresholds(x, mode, len(sizes))
    y = C.cpu_sparse_gemm(x, wt, t, ends, impl=impl)
    _close(y, _ref_rows(x, wt, t, ends, False), dtype, seed, f"{impl} M={M} {K} {sizes} {mode}")


@pytest.mark.parametrize("impl,M", [("compiled", 1), ("compiled", 9), ("gather", 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,F", [(96, 37), (33, 1), (200, 600)])
def test_gated(K, F, mode, dtype, impl, M):
    seed = _seed()
    x, wt = _inputs(M, K, 2 * F, dtype)
    t = _thresholds(x, mode, 2)
    y = C.cpu_sparse_gemm(x, wt, t, [F, 2 * F], gated=True, impl=impl)
    _close(y, _ref_rows(x, wt, t, None, True), dtype, seed, f"{impl} M={M} gated {K} {F} {mode}")


@pytest.mark.parametrize("impl", ["compiled", "gather"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_keeps_every_channel(dtype, impl):
    seed = _seed()
    x, wt = _inputs(1, 77, 45, dtype)
    t = torch.full((2,), float("inf"))  # ignored when dense
    y = C.cpu_sparse_gemm(x, wt, t, [20, 45], dense=True, impl=impl)
    _close(y, x.double() @ wt.double(), dtype, seed, f"{impl} dense")


def test_rows_keep_their_own_masks():
    """Rows of one call share a pass over the weight, never a mask."""
    seed = _seed()
    x, wt = _inputs(10, 64, 40, torch.float32)
    t = _thresholds(x, "q50", 1)
    y = C.cpu_sparse_gemm(x, wt, t, [40])
    for m in range(10):
        _close(y[m:m + 1], R.sparse_gemv_ref(x[m:m + 1], wt, t, [40]), torch.float32, seed, f"row {m}")


def test_thread_count_does_not_change_results():
    _seed()
    x, wt = _inputs(3, 300, 1100, torch.bfloat16)
    t = _thresholds(x, "q50", 2)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.cpu_sparse_gemm(x, wt, t, [550, 1100], gated=True)
        torch.set_num_threads(max(2, n))
        many = C.cpu_sparse_gemm(x, wt, t, [550, 1100], gated=True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


def test_errors():
    x, wt = _inputs(1, 8, 6, torch.float32)
    t = torch.zeros(1)
    bad = [
        dict(x=x.double(), wt=wt.double(), match="dtype"),
        dict(x=x, wt=wt.bfloat16(), match="dtype"),
        dict(x=x[0], match=r"\(M, K\)"),
        dict(wt=wt[:5], match=r"\(M, K\)"),
        dict(ends=[7], match="ends"),
        dict(ends=[4, 4, 6], t=torch.zeros(3), match="ends"),
        dict(t=torch.zeros(1, dtype=torch.float64), match="thresholds"),
        dict(t=torch.zeros(2), match="thresholds"),
        dict(gated=True, match="gated"),
        dict(impl="avx", match="impl"),
        dict(x=torch.randn(2, 8), impl="gather", match="one row"),
    ]
    for b in bad:
        with pytest.raises(ValueError, match=b["match"]):
            C.cpu_sparse_gemm(b.get("x", x), b.get("wt", wt), b.get("t", t), b.get("ends", [6]),
                              gated=b.get("gated", False), impl=b.get("impl", "compiled"))
    with pytest.raises(ValueError, match="cpu must be"):
        KernelPolicy(cpu="fast")


# ----------------------------------------------------------------------- SparseLinear dispatch
def _module(dtype, gated=False):
    torch.manual_seed(0)
    m = SL.SparseLinear(70, (33, 33) if gated else (40, 9, 21), gated=gated, dtype=dtype)
    x = torch.randn(1, 1, 70).to(dtype)
    q = x.float().abs().quantile(0.5).item()
    m.set_thresholds([q * 0.8, q] if gated else [q * 0.8, q, q * 1.2], [0.4, 0.5] if gated else [0.4, 0.5, 0.6])
    m.sparse = True
    return m.eval(), x


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = SL.cpu_sparse_gemm

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)
        monkeypatch.setattr(SL, "cpu_sparse_gemm", spy)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_uses_the_cpu_kernel(monkeypatch, dtype, gated):
    spy = _Spy(monkeypatch)
    m, x = _module(dtype, gated)
    with torch.no_grad():
        y = m(x)
        assert spy.calls == 1
        m.set_kernel_policy(KernelPolicy(cpu=None))
        ref = m(x)  # the exact torch path
        assert spy.calls == 1
    _close(y.float(), ref.double(), torch.float32, 0, "module vs torch path") if dtype == torch.float32 \
        else _close(y, ref.double(), dtype, 0, "module vs torch path")


def test_module_routing(monkeypatch):
    spy = _Spy(monkeypatch)
    m, x = _module(torch.bfloat16)
    with torch.no_grad():
        m.track = True
        m(x)
        assert spy.calls == 0, "tracking counts on the torch path"
        m.track = False
        m.set_kernel_policy(KernelPolicy(gemv=False))
        m(x)
        assert spy.calls == 0, "gemv=False is the torch path"
        m.set_kernel_policy(KernelPolicy())
        m.sparse = False
        m(torch.randn(1, 5, 70).bfloat16())  # bf16 prefill: the kernel (torch's GEMM is slow)
        assert spy.calls == 1
    m32, x32 = _module(torch.float32)
    with torch.no_grad():
        m32.sparse = False
        m32(x32)
        m32(torch.randn(1, 5, 70))  # fp32 dense: torch's GEMM
        assert spy.calls == 1
    x.requires_grad_(True)
    m(x)  # autograd on: the torch path
    assert spy.calls == 1


def test_module_falls_back_to_gather(monkeypatch):
    """No compiler: one token runs the torch gather path, several the masked torch product."""
    monkeypatch.setattr(C, "compiled_kernel", lambda verbose=False: None)
    m, x = _module(torch.bfloat16)
    xs = torch.randn(1, 4, 70).bfloat16()
    with torch.no_grad():
        y, ys = m(x), m(xs)
        m.set_kernel_policy(KernelPolicy(cpu=None))
        _close(y, m(x).double(), torch.bfloat16, 0, "gather vs torch path")
        m.sparse = False
        _close(ys, m(xs).double(), torch.bfloat16, 0, "dense prefill vs torch path")


def test_compiled_decode_step(monkeypatch):
    """torch.compile(fullgraph) of a CPU module keeps the kernel as one op."""
    m, x = _module(torch.bfloat16, gated=True)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, want)


def test_model_greedy_tokens_match_the_torch_path():
    """fp32 tiny model at 50%: the same greedy tokens, and close decode logits, on both paths."""
    from tests.tiny_models import noise_calibration, random_tokens, tiny_args, tiny_model
    from teal.generation import decode_one_token, generate
    from teal.thresholds import apply_uniform_sparsity
    model = tiny_model(seed=3)
    apply_uniform_sparsity(model, noise_calibration(tiny_args()), 0.5)
    prompt = random_tokens(9, seed=4).to(torch.int)
    outs = []
    for policy in (KernelPolicy(), KernelPolicy(cpu=None)):
        teal.set_kernel_policy(model, policy)
        with torch.no_grad():
            seq, _ = generate(model, prompt, 24, decode_one_token, 0.0, None)
            logits = model(seq[None, -1:].long(), torch.tensor([seq.numel() - 1]))
        outs.append((seq, logits))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
