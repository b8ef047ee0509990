"""Fused decode attention kernel (teal.kernels.decode_attention) vs a float64 reference.

On CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest) at small shapes;
on a GPU the same checks run, plus Llama-3-8B / Llama-2-7B head shapes.  Fresh random
inputs each run (seed printed on failure); stale cache entries beyond the mask hold huge
values, so reading one would show.
"""
import os
import random

import pytest
import torch

import teal.kernels as tk
from teal.kernels import decode_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not tk.kernels_available(torch.device(DEV)),
                                reason="Triton kernels unavailable (no triton / interpreter off)")
# output rounding (1 ulp of bf16/fp16) plus P cast to the input dtype before P @ V
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def _seed():
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    return s


def _case(H, G, S, D, dtype, mask):
    q = torch.randn(1, H, 1, D, device=DEV).to(dtype)
    k = torch.randn(1, G, S, D, device=DEV).to(dtype)
    v = torch.randn(1, G, S, D, device=DEV).to(dtype)
    k[..., ~mask, :] = 3e4  # stale entries: must never be read
    v[..., ~mask, :] = 3e4
    return q, k, v


def _check(q, k, v, mask, dtype, seed, what):
    y = tk.decode_attention(q, k, v, mask.view(1, 1, 1, -1))
    ref = decode_attention_ref(q, k, v, mask)
    assert y.shape == q.shape and y.dtype == dtype
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(y).all() and err < TOL[dtype], f"{what}: rel err {err:.3g} seed={seed}"
    return y


SHAPES = [  # (H, G, S, D): GQA groups of 4, 3 (SmolLM2), 1 (MHA), 9 and 20 (> 16 rows)
    (8, 2, 40, 32), (9, 3, 75, 64), (4, 4, 33, 16), (9, 1, 64, 16), (20, 1, 50, 32),
]
if DEV == "cuda":
    SHAPES += [(32, 8, 2048, 128), (32, 32, 4096, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}G{}S{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prefix_and_holes(shape, dtype):
    seed = _seed()
    H, G, S, D = shape
    filled = random.randint(1, S)
    prefix = torch.zeros(S, dtype=torch.bool, device=DEV)
    prefix[:filled] = True  # decode: the filled part of the cache
    q, k, v = _case(H, G, S, D, dtype, prefix)
    _check(q, k, v, prefix, dtype, seed, f"prefix {filled}/{S}")
    holes = torch.rand(S, device=DEV) < 0.6
    holes[0] = True
    q, k, v = _case(H, G, S, D, dtype, holes)
    _check(q, k, v, holes, dtype, seed, "random holes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_split_over_positions(dtype):
    """Caches long enough to be split over several programs (online-softmax merge), with
    slices that attend nothing, one position only, or everything; deterministic."""
    from teal.kernels import launch

    seed = _seed()
    H, G, D = 6, 2, 32
    S = 1100 if DEV == "cpu" else 9000
    for name, m in {
        "first slice only": torch.arange(S, device=DEV) < 70,
        "one late position": (torch.arange(S, device=DEV) == S - 3) | (torch.arange(S, device=DEV) == 0),
        "all": torch.ones(S, dtype=torch.bool, device=DEV),
        "every 7th": torch.arange(S, device=DEV) % 7 == 0,
    }.items():
        q, k, v = _case(H, G, S, D, dtype, m)
        y = _check(q, k, v, m, dtype, seed, name)
        assert torch.equal(y, tk.decode_attention(q, k, v, m)), f"non-deterministic seed={seed}"
        assert int(launch.counters(torch.device(DEV), 1).abs().sum()) == 0


def test_large_scores_are_stable():
    """Scores of +-1e3 (softmax needs the running max) give the float64 answer."""
    seed = _seed()
    H, G, S, D = 4, 2, 300, 16
    m = torch.ones(S, dtype=torch.bool, device=DEV)
    q, k, v = _case(H, G, S, D, torch.float16, m)
    q = (q.float() * 40).to(torch.float16)
    _check(q, k, v, m, torch.float16, seed, "large scores")


def test_bad_inputs_raise_one_line_errors():
    q = torch.randn(1, 8, 1, 24, device=DEV, dtype=torch.bfloat16)  # D = 24: not a power of 2
    k = torch.randn(1, 2, 16, 24, device=DEV, dtype=torch.bfloat16)
    m = torch.ones(16, dtype=torch.bool, device=DEV)
    assert not tk.decode_attention_supported(q, k, k)
    with pytest.raises(ValueError, match="power of two"):
        tk.decode_attention(q, k, k, m)
    q = torch.randn(1, 8, 1, 16, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 16, 16, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="S = 16"):
        tk.decode_attention(q, k, k, torch.ones(15, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="mask must be bool"):
        tk.decode_attention(q, k, k, torch.ones(16, dtype=torch.bool, device="meta"))
    empty = torch.randn(1, 2, 0, 16, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="S >= 1"):
        tk.decode_attention(q, empty, empty, torch.ones(0, dtype=torch.bool, device=DEV))
    assert not tk.decode_attention_supported(q, k[:, :0], k[:, :0])  # no KV heads: False, no raise
    assert not tk.decode_attention_supported(q, k.float(), k.float())
    assert not tk.decode_attention_supported(q.expand(2, 8, 1, 16), k.expand(2, 2, 16, 16), k)


def test_model_dispatches_decode_attention_to_the_kernel(monkeypatch):
    """model.decode_attention uses the kernel where its policy allows it (the interpreter on
    CPU) and gives the torch path's answer; a policy with attention off takes the torch path."""
    import model
    from teal.kernels import KernelPolicy

    calls = []
    real = tk.decode_attention

    def rec(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(tk, "decode_attention", rec)
    seed = _seed()
    m = torch.zeros(1, 1, 1, 24, dtype=torch.bool, device=DEV)
    m[..., :13] = True
    q, k, v = _case(8, 2, 24, 32, torch.bfloat16, m.view(-1))
    y = model.decode_attention(q, k, v, m, KernelPolicy(interpreter=DEV == "cpu"))
    assert calls == [1]
    y_torch = model.decode_attention(q, k, v, m, KernelPolicy(attention=False, interpreter=True))
    assert calls == [1]
    if DEV == "cpu":  # the default policy never runs kernels on CPU tensors
        model.decode_attention(q, k, v, m)
        assert calls == [1]
    err = ((y.double() - y_torch.double()).norm() / y_torch.double().norm()).item()
    assert err < 2 * TOL[torch.bfloat16], f"seed={seed}"
