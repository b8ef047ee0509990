"""The model's decode step through the fused kernels equals the exact torch path.

A sparse decode step is a discontinuous function of its inputs (a rounding difference can
flip a channel that sits on its threshold, and the flip propagates), so the model-level
checks are split in two:
1. every kernel call made inside a sparse decode step, on the inputs it actually received,
   equals the float64 masked-dense product of the *modules'* weights and thresholds (which
   checks the fused buffers, the threshold rows and the output split);
2. with all thresholds at 0 (no flips possible) the logits equal the torch path's.
On CPU the kernels run through Triton's interpreter on a tiny model; on a GPU at Llama-3-8B
widths, and the compiled CUDA-graph step is compared with the eager kernel path.
"""
import pytest
import torch
import torch.nn.functional as F

import teal
import teal.kernels as K
from model import ModelArgs, Transformer
from teal.kernels import KernelPolicy, kernels_available
from teal.sparse_linear import configured

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels_available(torch.device(DEVICE)),
                                reason="Triton kernels unavailable (no triton / interpreter off)")
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3}  # ~2-4 ulp of accumulated rounding


def _model(dtype, zero_thresholds=False):
    cfg = (dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                vocab_size=101, block_size=64) if DEVICE == "cpu" else
           dict(n_layer=2, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
                vocab_size=1024, block_size=256))
    with torch.device(DEVICE):
        m = Transformer(ModelArgs(**cfg)).to(dtype).eval().requires_grad_(False)
    teal.set_kernel_policy(m, KernelPolicy(interpreter=DEVICE == "cpu"))
    teal.configure(m, sparse=True)
    for _, proj, p in m.projections():  # distinct thresholds, one projection per-channel
        if zero_thresholds:
            t = 0.0
        elif proj == "up_proj":
            t = torch.rand(p.in_features, device=DEVICE) * 0.6
        else:
            t = torch.rand(()).item() * 0.8
        p.set_threshold(t)
    return m


@torch.no_grad()
def _decode_logits(m, ids, step):
    m.setup_caches(1, 32)
    m(ids[:, :-1], torch.arange(ids.shape[1] - 1, device=DEVICE))  # dense prefill
    pos = torch.tensor([ids.shape[1] - 1], device=DEVICE)
    # clone: a CUDA-graph replay overwrites the previous replay's output buffer
    return step(ids[:, -1:], pos).float().clone()


def _ref(x, lin):
    """(rows, N) float64: each row of x masked by its own |x| > t, times the weight."""
    x2 = x.reshape(-1, x.shape[-1])
    keep = x2.float().abs() > lin.threshold
    return (x2.double() * keep) @ lin.weight.double().t()


def _rel(a, b):
    return ((a.double().reshape(-1) - b.reshape(-1)).norm() / b.norm()).item()


def _record_calls(monkeypatch) -> list:
    calls = []
    for name in ("sparse_gemv", "sparse_gated_gemv"):
        fn = getattr(K, name)

        def rec(*args, _fn=fn, _name=name, **kw):
            y = _fn(*args, **kw)
            calls.append((_name, args[0].clone(), y.clone()))
            return y
        monkeypatch.setattr(K, name, rec)
    return calls


def _check_calls(m, calls, dtype, rows: int) -> None:
    """The calls are one step's (q/k/v, o, gate/up, down per layer), each on `rows` rows and
    equal, row by row, to the masked float64 product of the modules' weights."""
    expect = []
    for b in m.layers:
        a, f = b.attention, b.feed_forward
        expect += [("sparse_gemv", tuple(a.qkv.projections())), ("sparse_gemv", tuple(a.o_proj.projections())),
                   ("sparse_gated_gemv", tuple(f.gate_up.projections())),
                   ("sparse_gemv", tuple(f.down_proj.projections()))]
    assert [c[0] for c in calls] == [e[0] for e in expect]
    for (name, x, y), (_, mods) in zip(calls, expect):
        assert x.numel() // x.shape[-1] == rows, (name, tuple(x.shape))
        if name == "sparse_gated_gemv":
            ref = F.silu(_ref(x, mods[0])) * _ref(x, mods[1])
        else:
            ref = torch.cat([_ref(x, lin) for lin in mods], dim=-1)
        assert torch.isfinite(y).all()
        y2 = y.reshape(rows, -1)
        for r in range(rows):
            assert _rel(y2[r], ref[r]) < TOL[dtype], (name, r, _rel(y2[r], ref[r]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_kernel_call_in_a_decode_step(dtype, monkeypatch):
    m = _model(dtype)
    calls = _record_calls(monkeypatch)
    ids = torch.randint(0, m.config.vocab_size, (1, 9), device=DEVICE)
    _decode_logits(m, ids, m)
    _check_calls(m, calls, dtype, 1)


@pytest.mark.parametrize("step", ["batch", "verify"])
def test_several_rows_per_kernel_call(step, monkeypatch):
    """A batch-3 decode step (one token per sequence) and a 4-token speculative verify step
    (sparsify_prefill) send every projection to the several-row kernel, each row with its
    own mask (max_rows=16); the default policy's max_rows (2) sends them to the torch path."""
    dtype = torch.bfloat16
    m = _model(dtype)
    assert KernelPolicy().max_rows == 2
    teal.set_kernel_policy(m, KernelPolicy(interpreter=DEVICE == "cpu", max_rows=16))
    B, T = (3, 1) if step == "batch" else (1, 4)
    ids = torch.randint(0, m.config.vocab_size, (B, 8 + T), device=DEVICE)
    m.setup_caches(B, 32)
    with torch.no_grad():
        m(ids[:, :8], torch.arange(8, device=DEVICE))  # dense prefill
        calls = _record_calls(monkeypatch)
        if step == "batch":
            pos = torch.tensor([[8], [8], [8]], device=DEVICE)
            m(ids[:, 8:], pos)
        else:
            with configured(m, sparsify_prefill=True):
                m(ids[:, 8:], torch.arange(8, 8 + T, device=DEVICE))
    _check_calls(m, calls, dtype, B * T)
    teal.set_kernel_policy(m, KernelPolicy(interpreter=DEVICE == "cpu"))
    calls.clear()
    with torch.no_grad():
        if step == "batch":
            m(ids[:, 8:], pos)
        else:
            with configured(m, sparsify_prefill=True):
                m(ids[:, 8:], torch.arange(8, 8 + T, device=DEVICE))
    assert not calls, "more rows than max_rows must take the torch path"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_thresholds_logits_match_torch_path(dtype):
    m = _model(dtype, zero_thresholds=True)
    ids = torch.randint(0, m.config.vocab_size, (1, 9), device=DEVICE)
    got = _decode_logits(m, ids, m)
    teal.configure(m, track=True)  # counters on: the exact torch path everywhere
    ref = _decode_logits(m, ids, m)
    assert _rel(got, ref.double()) < 2 * TOL[dtype]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_compiled_decode_in_cuda_graphs():
    # zero thresholds: the compiled (fused, re-ordered) step cannot flip a mask, so it must
    # match the torch path; sparse thresholds: graph replays must be bitwise repeatable
    m = _model(torch.bfloat16, zero_thresholds=True)
    ids = torch.randint(0, m.config.vocab_size, (1, 9), device=DEVICE)
    step = torch.compile(lambda x, p: m(x, p), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, capture, replay
        got = _decode_logits(m, ids, step)
    teal.configure(m, track=True)
    ref = _decode_logits(m, ids, m)
    teal.configure(m, track=False)
    assert _rel(got, ref.double()) < 2 * TOL[torch.bfloat16]
    for _, _, p in m.projections():
        p.set_threshold(torch.rand(()).item() * 0.8)  # in place: same graph, new thresholds
    outs = [_decode_logits(m, ids, step) for _ in range(3)]
    assert torch.isfinite(outs[0]).all() and not torch.equal(outs[0], got)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
