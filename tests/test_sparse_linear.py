"""SparseLinear (fused projections), its handles and the model's dispatch, against float64
masked-dense references."""
import pytest
import torch
import torch.nn.functional as F

import teal
from model import ModelArgs, Transformer
from teal.sparse_linear import SparseLinear, configured, set_thresholds


def _ref(x, w, t):
    x64 = x.double()
    return (x64 * (x64.abs() > t.double())) @ w.double().t()


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _single(k, n, t=None):
    lin = SparseLinear(k, n)
    if t is not None:
        lin.projection(0).set_threshold(t)
    lin.sparse = True
    return lin


@pytest.mark.parametrize("k,n", [(96, 80), (1000, 3), (7, 1)])
def test_decode_matches_masked_dense(k, n):
    x = torch.randn(1, 1, k)
    t = x.abs().median()
    lin = _single(k, n, t)
    y = lin(x)
    assert _rel(y, _ref(x, lin.weight, t)) < 1e-5
    # the mask matters: a dense product differs
    assert _rel(y, x.double() @ lin.weight.double().t()) > 1e-3


def test_prefill_dense_unless_sparsify_prefill():
    lin = _single(64, 32, 1.0)
    x = torch.randn(1, 5, 64)
    dense = x.double() @ lin.weight.double().t()
    assert _rel(lin(x), dense) < 1e-5
    lin.sparsify_prefill = True
    assert _rel(lin(x), _ref(x, lin.weight, torch.tensor(1.0))) < 1e-5


def test_per_channel_threshold_and_extremes():
    lin = _single(48, 16)
    x = torch.randn(1, 1, 48)
    t = torch.rand(48)
    lin.projection(0).set_threshold(t)
    assert lin.threshold.shape == (1, 48)
    assert _rel(lin(x), _ref(x, lin.weight, t)) < 1e-5
    lin.projection(0).set_threshold(float("inf"))
    assert torch.equal(lin(x), torch.zeros(1, 1, 16))
    lin.set_thresholds([0.0])
    assert lin.threshold.shape == (1,)  # all scalar again: the canonical (S,) buffer
    assert _rel(lin(x), x.double() @ lin.weight.double().t()) < 1e-5


def test_bad_thresholds_and_sparsities():
    lin = SparseLinear(8, (4, 2), names=("a", "b"))
    for bad in ("nope", 2, -1):
        with pytest.raises(ValueError, match="holds a, b"):
            lin.projection(bad)
    for bad in ("abc", None):
        with pytest.raises(ValueError, match="number or a tensor"):
            lin.projection(0).set_threshold(bad)
    with pytest.raises(ValueError, match="sparsities"):  # a failed call changes nothing
        lin.projection(0).set_threshold(0.1, sparsity=1.0)
    assert lin.threshold.tolist() == [0.0, 0.0] and lin.sparsity == [0.0, 0.0]
    with pytest.raises(ValueError, match="threshold, sparsity"):
        set_thresholds({lin.projection(0): 0.1})
    with pytest.raises(ValueError, match="shape"):
        lin.projection("a").set_threshold(torch.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        lin.projection(1).set_threshold(-1.0)
    with pytest.raises(ValueError, match="2 thresholds"):
        lin.set_thresholds([0.1])
    with pytest.raises(ValueError, match="sparsities"):
        lin.set_thresholds([0.1, 0.2], [0.5, 1.0])
    with pytest.raises(ValueError):
        SparseLinear(8, (4, 3), names=("gate", "up"), gated=True)


def test_weight_layout_is_input_channel_major():
    lin = SparseLinear(24, (40, 8))
    assert lin.weight.shape == (48, 24) and lin.weight.t().is_contiguous()
    lin.to(torch.bfloat16)  # moves keep the layout and the fp32 thresholds
    assert lin.weight.t().is_contiguous() and lin.threshold.dtype == torch.float32
    w = torch.randn(48, 24)  # a row-major nn.Linear-shaped tensor, assigned by a load
    lin.load_state_dict({"weight": w}, assign=True)
    assert lin.weight.t().is_contiguous() and torch.equal(lin.weight, w)


def test_tracking_counts_zeroed_fraction():
    lin = SparseLinear(1000, (4, 3), names=("a", "b"))
    lin.sparse = lin.track = True
    x = torch.randn(1, 1, 1000)
    ta, tb = x.abs().quantile(0.3), x.abs().quantile(0.6)
    lin.set_thresholds([ta, tb])
    lin(x)
    a, b = lin.projections()
    assert a.effective_sparsity() == pytest.approx((x.abs() <= ta).float().mean().item())
    assert b.effective_sparsity() == pytest.approx((x.abs() <= tb).float().mean().item())


@pytest.mark.parametrize("shared", [True, False])
def test_fused_module_equals_its_projections(shared):
    """Each projection of a fused module computes its own masked product with its own
    threshold (one mask when they agree), dense and sparse; the handles are views."""
    sizes = (20, 7, 7)
    lin = SparseLinear(32, sizes, names=("q", "k", "v"))
    x = torch.randn(1, 1, 32)
    ts = [0.4, 0.4, 0.4] if shared else [0.2, 0.9, 0.5]
    lin.set_thresholds(ts, [0.3, 0.3, 0.3])
    assert lin._shared == shared
    projs = lin.projections()
    assert [p.name for p in projs] == ["q", "k", "v"] and [p.out_features for p in projs] == list(sizes)
    dense = torch.cat([F.linear(x, p.weight) for p in projs], dim=-1)
    assert _rel(lin(x), dense.double()) < 1e-5  # sparse flag off: dense
    lin.sparse = True
    ref = torch.cat([_ref(x, p.weight, torch.tensor(t)) for p, t in zip(projs, ts)], dim=-1)
    assert _rel(lin(x), ref) < 1e-5
    projs[1].set_threshold(0.0)  # a handle writes the module's buffer in place
    assert lin.threshold[1].item() == 0.0 and projs[1].threshold.item() == 0.0
    assert projs[0].weight.data_ptr() == lin.weight.data_ptr()


def test_gated_module_is_swiglu():
    lin = SparseLinear(32, (16, 16), names=("gate_proj", "up_proj"), gated=True)
    x = torch.randn(1, 1, 32)
    lin.set_thresholds([0.2, 0.9], [0.2, 0.6])
    lin.sparse = True
    g, u = lin.projections()
    ya, yb = _ref(x, g.weight, torch.tensor(0.2)), _ref(x, u.weight, torch.tensor(0.9))
    assert lin(x).shape == (1, 1, 16) and lin.out_features == 16
    assert _rel(lin(x), F.silu(ya) * yb) < 1e-5


def _tiny():
    return ModelArgs(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                     vocab_size=97, block_size=32)


def test_state_dict_is_per_projection_and_round_trips():
    """The fused modules save one nn.Linear-shaped weight per projection and load them back
    (strict, and assigned from row-major tensors); replaced weights are the ones used."""
    m, other = Transformer(_tiny()), Transformer(_tiny())
    sd = m.state_dict()
    assert "layers.0.attention.q_proj.weight" in sd and "layers.0.attention.qkv.weight" not in sd
    assert sd["layers.1.feed_forward.up_proj.weight"].shape == (96, 64)
    x = torch.randint(0, 97, (1, 12))
    other.load_state_dict(sd)
    assert torch.equal(other(x), m(x))
    fresh = Transformer(_tiny())
    fresh.load_state_dict({k: v.contiguous() for k, v in other.state_dict().items()}, assign=True)
    assert torch.allclose(fresh(x), m(x), atol=1e-6)
    assert all(mod.weight.t().is_contiguous() for mod in teal.sparse_linears(fresh))
    assert list(Transformer(_tiny()).state_dict()) == list(sd)


def test_state_dict_errors_name_the_projections():
    """A missing or mis-shaped projection is reported under its own key (not the fused
    buffer's); a block's own state dict is per projection too; a sharded copy saves its
    shards."""
    import copy

    import teal.tp
    m = Transformer(_tiny())
    sd = m.state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.0.attention.k_proj.weight"}
    r = Transformer(_tiny()).load_state_dict(missing, strict=False)
    assert r.missing_keys == ["layers.0.attention.k_proj.weight"] and r.unexpected_keys == []
    with pytest.raises(RuntimeError, match="layers.0.attention.k_proj.weight"):
        Transformer(_tiny()).load_state_dict(missing)
    wrong = dict(sd, **{"layers.1.feed_forward.up_proj.weight": torch.zeros(5, 64)})
    with pytest.raises(RuntimeError, match=r"size mismatch for layers.1.feed_forward.up_proj.weight"):
        Transformer(_tiny()).load_state_dict(wrong)
    block = m.layers[0].state_dict()
    assert "attention.q_proj.weight" in block and "attention.qkv.weight" not in block
    assert Transformer(_tiny()).layers[0].load_state_dict(block) is not None
    shard = teal.tp.apply_tp(copy.deepcopy(m), rank=1, world_size=2).state_dict()
    assert shard["layers.0.attention.k_proj.weight"].shape == (16, 64)
    assert torch.equal(shard["layers.0.attention.k_proj.weight"], sd["layers.0.attention.k_proj.weight"][16:])


def test_hooks_see_each_fused_call():
    m = Transformer(_tiny())
    seen = []
    m.layers[0].attention.qkv.register_forward_pre_hook(lambda mod, inp: seen.append("qkv"))
    m.layers[0].feed_forward.gate_up.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[-1]))
    m(torch.randint(0, 97, (1, 8)))
    assert seen == ["qkv", 96]


def test_configured_restores_flags():
    m = Transformer(_tiny())
    teal.configure(m, sparse=True)
    with configured(m, sparse=False, track=True):
        assert not any(mod.sparse for mod in teal.sparse_linears(m))
        assert all(mod.track for mod in teal.sparse_linears(m))
    assert all(mod.sparse and not mod.track for mod in teal.sparse_linears(m))


def test_set_thresholds_groups_by_module():
    """set_thresholds: whole modules get their canonical buffer ((S,) when all scalar) and
    sparse = any projection above 0; a module not fully given is set projection by
    projection and stays per-channel once one is."""
    m = Transformer(_tiny())
    qkv = m.layers[0].attention.qkv
    q, k, v = qkv.projections()
    set_thresholds({q: (0.1, 0.5), k: (0.2, 0.0), v: (0.3, 0.4)})
    assert qkv.threshold.tolist() == pytest.approx([0.1, 0.2, 0.3]) and qkv.sparse
    assert qkv.sparsity == [0.5, 0.0, 0.4]
    buf = qkv.threshold
    set_thresholds({q: (0.0, 0.0), k: (0.0, 0.0), v: (0.0, 0.0)})
    assert qkv.threshold is buf and not qkv.sparse  # same shape: updated in place
    set_thresholds({k: (torch.rand(64), 0.5)})
    assert qkv.threshold.shape == (3, 64) and qkv.sparse and qkv.sparsity[1] == 0.5


def test_calibrated_sparsity_chooses_the_kernel(monkeypatch):
    """apply_sparsities records each projection's calibrated sparsity; a fused module asks
    its policy for the launch of the lowest of its projections' and hands it to the kernel
    (the kernels themselves are replaced by a recorder here)."""
    import teal.kernels as K
    from teal.kernels import KernelPolicy
    from teal.thresholds import apply_sparsities
    from tiny_models import noise_calibration

    args = ModelArgs(n_layer=1, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
                     vocab_size=50, block_size=16)
    m = Transformer(args)
    levels = {"q_proj": 0.9, "k_proj": 0.85, "v_proj": 0.95, "o_proj": 0.5, "gate_proj": 0.8,
              "up_proj": 0.9, "down_proj": 0.0}
    apply_sparsities(m, noise_calibration(args), levels)
    for _, proj, p in m.projections():
        assert p.sparsity == levels[proj]
    assert not m.layers[0].feed_forward.down_proj.sparse
    monkeypatch.setattr(K, "kernels_available", lambda device: True)
    monkeypatch.setattr(K, "prepare", lambda device: None)
    teal.set_kernel_policy(m, KernelPolicy(interpreter=True))
    seen = []
    monkeypatch.setattr(K, "sparse_gemv", lambda x, wt, t, seg, sparsity, launch, **kw: seen.append(
        ("seg", sparsity, launch)) or torch.zeros(*x.shape[:-1], wt.shape[1]))
    monkeypatch.setattr(K, "sparse_gated_gemv", lambda x, wt, t, sparsity, launch, **kw: seen.append(
        ("gated", sparsity, launch)) or torch.zeros(*x.shape[:-1], wt.shape[1] // 2))
    a, f = m.layers[0].attention, m.layers[0].feed_forward
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    a.qkv.to(torch.bfloat16)
    f.gate_up.to(torch.bfloat16)
    y = a.qkv(x)  # autograd on and a trainable weight: the torch path (the kernels are inference only)
    assert seen == [] and y.requires_grad
    y.sum().backward()
    assert a.qkv.weight.grad is not None
    with torch.no_grad():
        a.qkv(x)
        f.gate_up(x)
    policy = a.qkv.kernel_policy
    assert [s[:2] for s in seen] == [("seg", 0.85), ("gated", 0.8)]
    assert seen[0][2] == policy.launch("seg", 64, a.qkv.sizes, torch.bfloat16, "dense", 0.85, "cpu")
    assert seen[1][2] == policy.launch("gated", 64, f.gate_up.sizes, torch.bfloat16, "dense", 0.8, "cpu")
    teal.set_kernel_policy(m, KernelPolicy(gemv=False))
    assert a.qkv._launch is None
