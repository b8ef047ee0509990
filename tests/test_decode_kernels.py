"""The model's decode step through the fused kernels equals the exact torch path.

On CPU the kernels run through Triton's interpreter (tiny model); on a GPU at a larger shape
and also compiled with CUDA graphs (`torch.compile(mode="reduce-overhead")`).
"""
import pytest
import torch

import teal
import teal.sparse_linear as sl
from model import ModelArgs, Transformer
from teal.kernels import kernels_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels_available(torch.device(DEVICE)),
                                reason="Triton kernels unavailable (no triton / interpreter off)")


def _model(dtype):
    cfg = (dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                vocab_size=101, block_size=64) if DEVICE == "cpu" else
           dict(n_layer=4, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
                vocab_size=1024, block_size=256))
    torch.manual_seed(torch.seed() % 2**31)
    with torch.device(DEVICE):
        m = Transformer(ModelArgs(**cfg)).to(dtype).eval()
    teal.to_kernel_layout(m)
    teal.configure(m, sparse=True)
    for _, proj, lin in m.sparse_linears():  # per-projection thresholds, one per-channel
        t = torch.rand(lin.in_features, device=DEVICE) if proj == "up_proj" else \
            torch.rand(()).item() * 0.8
        lin.set_threshold(t)
    teal.fuse_shared_inputs(m)
    return m


@pytest.fixture
def kernels_on_cpu():
    old = sl.KERNELS_ON_CPU
    sl.KERNELS_ON_CPU = DEVICE == "cpu"
    yield
    sl.KERNELS_ON_CPU = old


def _decode_logits(m, ids, step):
    m.setup_caches(1, 32)
    m(ids[:, :-1], torch.arange(ids.shape[1] - 1, device=DEVICE))  # dense prefill
    pos = torch.tensor([ids.shape[1] - 1], device=DEVICE)
    return step(ids[:, -1:], pos).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_decode_matches_torch_path(dtype, kernels_on_cpu):
    m = _model(dtype)
    ids = torch.randint(0, m.config.vocab_size, (1, 9), device=DEVICE)
    got = _decode_logits(m, ids, m)
    sl_flag, sl.KERNELS_ON_CPU = sl.KERNELS_ON_CPU, False
    try:  # reference: the exact torch path (track=True disables the kernels everywhere)
        teal.configure(m, track=True)
        ref = _decode_logits(m, ids, m)
    finally:
        teal.configure(m, track=False)
        sl.KERNELS_ON_CPU = sl_flag
    assert torch.isfinite(got).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, rel


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_compiled_decode_matches_torch_path():
    m = _model(torch.bfloat16)
    ids = torch.randint(0, m.config.vocab_size, (1, 9), device=DEVICE)
    step = torch.compile(lambda x, p: m(x, p), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, capture, replay
        got = _decode_logits(m, ids, step)
    teal.configure(m, track=True)
    ref = _decode_logits(m, ids, m)
    teal.configure(m, track=False)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, rel
