"""SparseLinear and the model's dispatch against float64 masked-dense references."""
import pytest
import torch

import teal
from model import ModelArgs, Transformer
from teal.sparse_linear import SparseLinear, fuse_shared_inputs, gated_mlp, project


def _ref(x, w, t):
    x64 = x.double()
    return (x64 * (x64.abs() > t.double())) @ w.double().t()


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k,n", [(96, 80), (1000, 3), (7, 1)])
def test_decode_matches_masked_dense(k, n):
    lin = SparseLinear(k, n)
    x = torch.randn(1, 1, k)
    t = x.abs().median()
    lin.set_threshold(t)
    lin.sparse = True
    y = lin(x)
    assert _rel(y, _ref(x, lin.weight, t)) < 1e-5
    # the mask matters: a dense product differs
    assert _rel(y, x.double() @ lin.weight.double().t()) > 1e-3


def test_prefill_dense_unless_sparsify_prefill():
    lin = SparseLinear(64, 32)
    x = torch.randn(1, 5, 64)
    lin.set_threshold(1.0)
    lin.sparse = True
    dense = x.double() @ lin.weight.double().t()
    assert _rel(lin(x), dense) < 1e-5
    lin.sparsify_prefill = True
    assert _rel(lin(x), _ref(x, lin.weight, torch.tensor(1.0))) < 1e-5


def test_per_channel_threshold_and_extremes():
    lin = SparseLinear(48, 16)
    lin.sparse = True
    x = torch.randn(1, 1, 48)
    t = torch.rand(48)
    lin.set_threshold(t)
    assert _rel(lin(x), _ref(x, lin.weight, t)) < 1e-5
    lin.set_threshold(float("inf"))
    assert torch.equal(lin(x), torch.zeros(1, 1, 16))
    lin.set_threshold(0.0)
    assert _rel(lin(x), x.double() @ lin.weight.double().t()) < 1e-5


def test_bad_thresholds():
    lin = SparseLinear(8, 4)
    with pytest.raises(ValueError, match="shape"):
        lin.set_threshold(torch.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        lin.set_threshold(-1.0)


def test_weight_layout_is_input_channel_major():
    lin = SparseLinear(24, 40)
    assert lin.weight.shape == (40, 24) and lin.weight.t().is_contiguous()


def test_tracking_counts_zeroed_fraction():
    lin = SparseLinear(1000, 4)
    lin.sparse = True
    lin.track = True
    x = torch.randn(1, 1, 1000)
    t = x.abs().quantile(0.3)
    lin.set_threshold(t)
    lin(x)
    assert lin.effective_sparsity() == pytest.approx((x.abs() <= t).float().mean().item())


def test_fused_groups_match_unfused():
    cfg = ModelArgs(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                    vocab_size=97, block_size=32)
    m = Transformer(cfg)
    teal.configure(m, sparse=True)
    for _, _, lin in m.sparse_linears():
        lin.set_threshold(torch.rand(()).item() * 0.5)
    x = torch.randint(0, 97, (1, 12))
    teal.configure(m, sparsify_prefill=True)
    ref = m(x)
    fuse_shared_inputs(m)
    att = m.layers[0].attention
    assert att.q_proj._group is att.v_proj._group is not None
    assert torch.allclose(m(x), ref, atol=1e-5)
    # thresholds set after fusing reach the fused buffer
    att.k_proj.set_threshold(0.3)
    assert att.k_proj._group.thresholds[1].item() == pytest.approx(0.3)
    assert m.state_dict()["layers.0.attention.k_proj.weight"].shape == (32, 64)


def test_project_and_gated_mlp_torch_path():
    a, b = SparseLinear(32, 16), SparseLinear(32, 16)
    x = torch.randn(1, 1, 32)
    for lin, t in ((a, 0.2), (b, 0.9)):
        lin.sparse = True
        lin.set_threshold(t)
    ya, yb = project(x, a, b)
    assert _rel(ya, _ref(x, a.weight, torch.tensor(0.2))) < 1e-5
    assert _rel(yb, _ref(x, b.weight, torch.tensor(0.9))) < 1e-5
    h = gated_mlp(x, a, b)
    assert torch.allclose(h, torch.nn.functional.silu(ya) * yb)


def test_fused_dense_path_matches_unfused():
    """Sparsity off: q/k/v and gate/up run as one GEMM over the fused buffer, same logits."""
    cfg = ModelArgs(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                    vocab_size=97, block_size=32)
    m = Transformer(cfg)
    x = torch.randint(0, 97, (1, 12))
    ref = m(x)
    fuse_shared_inputs(m)
    assert torch.allclose(m(x), ref, atol=1e-5)
    m.setup_caches(1, 16)
    step = m(x[:, :1], torch.tensor([0]))
    assert torch.allclose(step[0, 0], ref[0, 0], atol=1e-5)


def test_fused_group_not_used_after_weight_replacement_or_with_hooks():
    cfg = ModelArgs(n_layer=1, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                    vocab_size=97, block_size=32)
    m, ref_model = Transformer(cfg), Transformer(cfg)
    fuse_shared_inputs(m)
    x = torch.randint(0, 97, (1, 8))
    # a replaced Parameter (load_state_dict(assign=True)) must win over the stale fused buffer
    m.load_state_dict(ref_model.state_dict(), assign=True)
    assert torch.allclose(m(x), ref_model(x), atol=1e-5)
    # hooks on a fused member see its own call
    m2 = Transformer(cfg)
    fuse_shared_inputs(m2)
    seen = []
    m2.layers[0].attention.k_proj.register_forward_pre_hook(lambda mod, inp: seen.append("k"))
    m2.layers[0].feed_forward.up_proj.register_forward_hook(lambda mod, inp, out: seen.append("up"))
    m2(x)
    assert seen == ["k", "up"]


def test_target_sparsity_set_by_calibration_and_passed_as_hint(monkeypatch):
    """apply_sparsities records each projection's calibrated level; the fused q/k/v kernel gets
    the lowest of its members' as its algorithm hint (the kernels themselves are mocked)."""
    import teal.kernels as K
    import teal.sparse_linear as sl
    from teal.thresholds import apply_sparsities
    from tiny_models import noise_calibration

    args = ModelArgs(n_layer=1, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                     vocab_size=50, block_size=16)
    m = Transformer(args)
    calib = noise_calibration(args)
    levels = {"q_proj": 0.9, "k_proj": 0.85, "v_proj": 0.95, "o_proj": 0.5, "gate_proj": 0.8,
              "up_proj": 0.9, "down_proj": 0.0}
    apply_sparsities(m, calib, levels)
    for _, proj, lin in m.sparse_linears():
        assert lin.target_sparsity == levels[proj]
    fuse_shared_inputs(m)
    seen = []
    monkeypatch.setattr(sl, "_kernel_ok", lambda x, lin: True)
    monkeypatch.setattr(K, "sparse_gemv_segments", lambda x, wt, t, seg, s: seen.append(("qkv", s)) or
                        torch.zeros(*x.shape[:-1], wt.shape[1]))
    monkeypatch.setattr(K, "sparse_gated_gemv", lambda x, wt, t, s: seen.append(("gate_up", s)) or
                        torch.zeros(*x.shape[:-1], wt.shape[1] // 2))
    a, f = m.layers[0].attention, m.layers[0].feed_forward
    x = torch.randn(1, 1, 64)
    project(x, a.q_proj, a.k_proj, a.v_proj)
    gated_mlp(x, f.gate_proj, f.up_proj)
    assert seen == [("qkv", 0.85), ("gate_up", 0.8)]
