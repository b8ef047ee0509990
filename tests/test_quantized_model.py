"""A quantized tiny Transformer (teal.sparse_linear.quantize_model) against the same dense
model whose projection weights are replaced by their dequantized weights, computed by the
independent reference quantizer of tests/quant_ref.py: logits, sparse torch path, state dict
and checkpoint round trip, dtype moves, tensor-parallel shards, decode-step bytes, and one
decode step through the kernels (Triton interpreter on CPU).

Every test draws a fresh seed (printed in the failure message)."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

import teal
import teal.kernels as K
from model import ModelArgs, Transformer, load_model
from quant_ref import ref_dequantize, ref_quantize
from teal import quant
from teal.checkpoint import CheckpointError, save_checkpoint
from teal.generation import bytes_per_decode_step
from teal.kernels import KernelPolicy
from teal.quant import QuantSpec
from teal.sparse_linear import (QuantizedSparseLinear, SparseLinear, configured, quantize_model,
                                sparse_linears)
from teal.thresholds import apply_uniform_sparsity
from tiny_models import noise_calibration

# dim 64 (q/k/v, o, gate/up: K = 64), intermediate 80 (down: K = 80, a short last int4 group
# of 16 under g32 and g64), even widths everywhere, an even vocabulary (head int4)
ARGS = dict(block_size=64, vocab_size=96, n_layer=2, n_head=4, n_local_heads=2, dim=64,
            intermediate_size=80)
SPECS = [QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int8", head=True),
         QuantSpec("int4", 64, head=True)]
SPEC_IDS = ["int8", "int4-g32", "int8-head", "int4-g64-head"]


def _seed() -> int:
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _args(**kw):
    return ModelArgs(**dict(ARGS, **kw))


def _dense(**kw) -> Transformer:
    m = Transformer(_args(**kw)).eval().requires_grad_(False)
    with torch.no_grad():  # give the norms some non-trivial weights
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return m


def _quantized(dense, spec):
    q = copy.deepcopy(dense)
    report = quantize_model(q, spec)
    return q, report


@torch.no_grad()
def _dequantized_dense(dense, spec):
    """The dense model with every quantized weight replaced by the reference dequantization,
    on the exact torch path (mask, then matmul), as the quantized modules run on the CPU."""
    ref = copy.deepcopy(dense)
    teal.set_kernel_policy(ref, teal.KernelPolicy(cpu=None))
    fmt = spec.wformat
    for _, _, p in ref.projections():
        p.weight.copy_(ref_dequantize(fmt, p.weight).t())
    if spec.head:
        ref.output.weight.copy_(ref_dequantize(fmt, ref.output.weight).t())
    return ref


def _ids(n=12, vocab=ARGS["vocab_size"]):
    return torch.randint(0, vocab, (1, n))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_quantized_logits_equal_dequantized_dense(spec):
    seed = _seed()
    dense = _dense()
    qm, report = _quantized(dense, spec)
    n_mod, n_proj = 4 * ARGS["n_layer"], 7 * ARGS["n_layer"]
    padded = ARGS["n_layer"] if spec.mode == "int4" else 0  # down_proj (K = 80)
    assert report == {"quantized": n_mod + spec.head, "projections": n_proj + spec.head,
                      "padded": padded, "head": spec.head}
    mods = sparse_linears(qm)
    assert len(mods) == n_mod + spec.head
    assert all(type(m) is QuantizedSparseLinear and m.wformat == spec.wformat for m in mods)
    assert isinstance(qm.output, QuantizedSparseLinear) == spec.head
    ref = _dequantized_dense(dense, spec)
    # every module's codes and scales are the reference quantization of its fused weight
    ref_mods, dense_mods = dict(ref.named_modules()), dict(dense.named_modules())
    for name, m in qm.named_modules():
        if isinstance(m, QuantizedSparseLinear):
            codes, scales = ref_quantize(dense_mods[name].weight, spec.wformat)
            assert torch.equal(m.qweight, codes) and torch.equal(m.scales, scales), f"{name} seed={seed}"
            assert m.weight.dtype == torch.float32 and m.weight.t().is_contiguous()
            assert torch.equal(m.weight, ref_mods[name].weight), f"{name} seed={seed}"
    ids = _ids()
    with torch.no_grad():
        got, want, orig = qm(ids), ref(ids), dense(ids)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max()} seed={seed}"
    rel = ((got - orig).norm() / orig.norm()).item()
    assert 1e-5 < rel < (0.05 if spec.mode == "int8" else 0.4), f"quantization error {rel} seed={seed}"
    # in bf16 the same holds (the dequantized weight is rounded to bf16 once, like the copy)
    qb, rb = qm.to(torch.bfloat16), ref.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(qb(ids), rb(ids)), f"bf16 seed={seed}"


@pytest.mark.parametrize("spec", SPECS[:2], ids=SPEC_IDS[:2])
def test_sparse_torch_path_equals_masked_dequantized(spec):
    """Thresholds set before quantization are carried over; the quantized model's sparse
    torch path (prefill sparsified, and a KV-cache decode step) equals the dense model with
    dequantized weights and the same thresholds, and each module equals the float64 masked
    product of the reference dequantized weights."""
    seed = _seed()
    args = _args()
    dense = _dense()
    apply_uniform_sparsity(dense, noise_calibration(args), 0.5)
    dense.layers[1].feed_forward.down_proj.projection(0).set_threshold(torch.rand(80) * 1.5)
    qm, _ = _quantized(dense, spec)
    ref = _dequantized_dense(dense, spec)
    for (_, name, pq), (_, _, pd) in zip(qm.projections(), dense.projections()):
        assert torch.equal(pq.threshold, pd.threshold) and pq.sparsity == pd.sparsity, name
        assert pq.sparse and pq.threshold.dtype == torch.float32
    ids = _ids()
    teal.configure(qm, sparsify_prefill=True)
    teal.configure(ref, sparsify_prefill=True)
    with torch.no_grad():
        got, want = qm(ids), ref(ids)
        assert torch.equal(got, want), f"seed={seed}"
        with configured(qm, sparse=False):
            assert (qm(ids) - got).norm() > 1e-3 * got.norm(), "thresholds had no effect"
        # decode: dense prefill, one sparse step through the KV cache
        for m in (qm, ref):
            teal.configure(m, sparsify_prefill=False)
            m.setup_caches(1, 16)
        steps = []
        for m in (qm, ref):
            m(ids[:, :-1], torch.arange(ids.shape[1] - 1))
            steps.append(m(ids[:, -1:], torch.tensor([ids.shape[1] - 1])))
        assert torch.equal(steps[0], steps[1]), f"decode seed={seed}"
    # module level, float64: y = (x * [|x| > t_s]) W_s^T for each projection (SwiGLU for gate/up)
    for name, m in qm.named_modules():
        if not isinstance(m, QuantizedSparseLinear):
            continue
        x = torch.randn(1, 1, m.in_features)
        y = m(x)
        w_ref = ref_dequantize(spec.wformat, dict(dense.named_modules())[name].weight).double()
        outs, a = [], 0
        for s, n in enumerate(m.sizes):
            keep = x.float().abs() > m.threshold[s]
            outs.append((x.double() * keep) @ w_ref[:, a:a + n])
            a += n
        want = F.silu(outs[0]) * outs[1] if m.gated else torch.cat(outs, dim=-1)
        assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-6), f"{name} seed={seed}"


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_checkpoint_round_trip(spec, tmp_path):
    seed = _seed()
    qm, _ = _quantized(_dense(), spec)
    sd = qm.state_dict()
    # one entry per projection, nn.Linear-free: codes and scales only
    assert "layers.0.attention.k_proj.qweight" in sd and "layers.0.attention.k_proj.scales" in sd
    assert not any(k.endswith("proj.weight") or ".qkv." in k or ".gate_up." in k for k in sd)
    fmt = quant.parse_format(spec.wformat)
    kq = sd["layers.0.attention.k_proj.qweight"]
    assert kq.shape == (64, 32 if fmt[0] == "int8" else 16)
    down_sc = sd["layers.1.feed_forward.down_proj.scales"]
    assert down_sc.shape == ((64,) if fmt[0] == "int8" else (-(-80 // fmt[1]), 4, 32))
    assert ("output.qweight" in sd) == spec.head and ("output.weight" in sd) != spec.head
    path = tmp_path / "model.pth"
    save_checkpoint(path, qm.config.to_dict(), sd, meta=dict(name="tiny"), quantization=spec.to_dict())
    m2, meta = load_model(path)
    assert meta["quantization"] == spec.to_dict()
    for (n1, a), (n2, b) in zip(qm.named_modules(), m2.named_modules()):
        assert n1 == n2 and type(a) is type(b), n1
        if isinstance(a, QuantizedSparseLinear):
            assert a.wformat == b.wformat and a.sizes == b.sizes and a.names == b.names
            for buf in ("qweight", "scales"):
                x, y = getattr(a, buf), getattr(b, buf)
                assert x.dtype == y.dtype and torch.equal(x, y) and y.is_contiguous(), (n1, buf)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(qm(ids), m2(ids)), f"seed={seed}"
    # loading in bf16: the activations follow, codes and scales keep their dtypes
    m3, _ = load_model(path, dtype=torch.bfloat16)
    for m in sparse_linears(m3):
        assert m.act_dtype == torch.bfloat16 and m.weight.dtype == torch.bfloat16
        assert m.scales.dtype == (torch.float32 if spec.mode == "int8" else torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m3(ids), copy.deepcopy(qm).to(torch.bfloat16)(ids)), f"seed={seed}"
    # a quantized model built on the CPU loads the state dict by copy (strict) too
    other, _ = _quantized(_dense(), spec)
    other.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(other(ids), qm(ids)), f"seed={seed}"


def test_missing_or_misshaped_entries_are_named(tmp_path):
    spec = QuantSpec("int4", 32)
    qm, _ = _quantized(_dense(), spec)
    sd = qm.state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.0.attention.k_proj.scales"}
    with torch.device("meta"):
        shell = Transformer(_args())
        quantize_model(shell, spec)
    r = shell.load_state_dict(missing, strict=False, assign=True)
    assert r.missing_keys == ["layers.0.attention.k_proj.scales"] and r.unexpected_keys == []
    fresh, _ = _quantized(_dense(), spec)
    with pytest.raises(RuntimeError, match=r"layers\.0\.attention\.k_proj\.scales"):
        fresh.load_state_dict(missing)
    path = tmp_path / "model.pth"
    save_checkpoint(path, qm.config.to_dict(), missing, quantization=spec.to_dict())
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.k_proj\.scales"):
        load_model(path)
    wrong = dict(sd, **{"layers.1.feed_forward.up_proj.scales": torch.ones(2, 2, 40, dtype=torch.bfloat16)})
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.1\.feed_forward\.up_proj\.scales"):
        _quantized(_dense(), spec)[0].load_state_dict(wrong)
    # a dense checkpoint's weights are not silently taken as a quantized one
    dense_sd = _dense().state_dict()
    r = _quantized(_dense(), spec)[0].load_state_dict(dense_sd, strict=False)
    assert "layers.0.attention.o_proj.qweight" in r.missing_keys
    assert "layers.0.attention.o_proj.scales" in r.missing_keys
    assert "layers.0.attention.q_proj.weight" in r.unexpected_keys
    save_checkpoint(path, qm.config.to_dict(), dense_sd, quantization=spec.to_dict())
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(path)
    save_checkpoint(path, qm.config.to_dict(), sd, quantization={"mode": "int4", "group_size": 48})
    with pytest.raises(CheckpointError, match="quantization"):
        load_model(path)


@pytest.mark.parametrize("spec", SPECS[:2], ids=SPEC_IDS[:2])
def test_dtype_moves_keep_scales_and_thresholds(spec):
    seed = _seed()
    qm, _ = _quantized(_dense(), spec)
    qkv = qm.layers[0].attention.qkv
    qkv.set_thresholds([0.1, 0.3, 0.7])               # not representable in fp16 / bf16
    t_ch = torch.rand(80) * 0.3 + 1e-3
    qm.layers[1].feed_forward.down_proj.projection(0).set_threshold(t_ch)
    before = {n: (m.qweight.clone(), m.scales.clone(), m.threshold.clone(), m.weight.clone())
              for n, m in qm.named_modules() if isinstance(m, QuantizedSparseLinear)}
    sdt = torch.float32 if spec.mode == "int8" else torch.bfloat16
    ids = _ids()
    for move in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to(torch.bfloat16),
                 lambda m: m.to(torch.float32), lambda m: m.float()):
        move(qm)
        for n, m in qm.named_modules():
            if not isinstance(m, QuantizedSparseLinear):
                continue
            qw, sc, th, w = before[n]
            assert m.scales.dtype == sdt and torch.equal(m.scales, sc), n
            assert m.qweight.dtype == qw.dtype and torch.equal(m.qweight, qw), n
            assert m.threshold.dtype == torch.float32 and torch.equal(m.threshold, th), n
            assert m.act_dtype == m.weight.dtype == qm.norm.weight.dtype, n
            assert m.weight.t().is_contiguous()
        with torch.no_grad():
            assert torch.isfinite(qm(ids)).all()
    assert qkv.threshold.tolist() == [torch.tensor(v).item() for v in (0.1, 0.3, 0.7)]
    for n, m in qm.named_modules():  # back in fp32: the very same dequantized weights
        if isinstance(m, QuantizedSparseLinear):
            assert torch.equal(m.weight, before[n][3]), f"{n} seed={seed}"


def _module(spec, K, sizes, names, gated=False):
    lin = SparseLinear(K, sizes, names=names, gated=gated)
    return QuantizedSparseLinear.from_module(lin, spec)


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 64)],
                         ids=["int8", "int4-g32", "int4-g64"])
def test_tp_shards_equal_the_full_module(spec):
    """Column shards (q/k/v and gated gate/up) concatenated per projection, and row shards'
    partial sums, equal the unsharded module; each shard's dequantized weight is the slice of
    the full one."""
    seed = _seed()
    world = 2
    qkv = _module(spec, 128, (32, 16, 16), ("q_proj", "k_proj", "v_proj"))
    qkv.set_thresholds([0.2, 0.5, torch.rand(128)])
    gu = _module(spec, 128, (40, 40), ("gate_proj", "up_proj"), gated=True)
    gu.set_thresholds([0.3, 0.1])
    down = _module(spec, 256, 48, ("down_proj",))
    down.set_thresholds([torch.rand(256) * 0.8])
    for m in (qkv, gu, down):
        m.sparse = True
    x = torch.randn(1, 1, 128)
    xd = torch.randn(1, 1, 256)
    with torch.no_grad():
        # column: the projections of every shard, rank by rank
        for full, sizes in ((qkv, (32, 16, 16)), (gu, (40,))):
            y = full(x)
            shards = []
            for r in range(world):
                s = copy.deepcopy(full)
                s.tp_shard("column", r, world)
                assert s.sizes == tuple(n // world for n in full.sizes) and s.tp_style == "column"
                rows = torch.cat([torch.arange(a, b).chunk(world)[r] for a, b in full._offsets()])
                assert torch.equal(s.weight, full.weight[rows]), f"{full.names} rank {r}"
                shards.append(s(x).split([n // world for n in sizes], dim=-1))
            parts = y.split(list(sizes), dim=-1)
            for i, part in enumerate(parts):
                got = torch.cat([sh[i] for sh in shards], dim=-1)
                assert torch.allclose(got, part, rtol=1e-5, atol=1e-6), f"{full.names}[{i}] seed={seed}"
        # row: input channels split, partial outputs summed
        y = down(xd)
        k = 256 // world
        total = torch.zeros_like(y)
        for r in range(world):
            s = copy.deepcopy(down)
            s.tp_shard("row", r, world)
            assert s.in_features == k and s.threshold.shape == (1, k)
            assert torch.equal(s.weight, down.weight[:, r * k:(r + 1) * k]), f"rank {r}"
            assert torch.equal(s.threshold, down.threshold[:, r * k:(r + 1) * k])
            total += s(xd[..., r * k:(r + 1) * k])
        assert torch.allclose(total, y, rtol=1e-5, atol=1e-5), f"row seed={seed}"


def test_tp_shard_errors():
    spec4 = QuantSpec("int4", 32)
    with pytest.raises(ValueError, match="group size 32"):
        _module(spec4, 80, 16, ("down_proj",)).tp_shard("row", 0, 2)   # 40 channels per shard
    with pytest.raises(ValueError, match="even"):
        _module(spec4, 64, (32, 16, 16), ("q", "k", "v")).tp_shard("column", 0, 16)  # widths 2, 1, 1
    _module(QuantSpec("int8"), 64, (32, 16, 16), ("q", "k", "v")).tp_shard("column", 0, 16)  # int8: fine
    with pytest.raises(ValueError, match="do not divide"):
        _module(QuantSpec("int8"), 64, (32, 16, 16), ("q", "k", "v")).tp_shard("column", 0, 3)
    with pytest.raises(ValueError, match="do not divide"):
        _module(QuantSpec("int8"), 63, 16, ("o",)).tp_shard("row", 0, 2)
    with pytest.raises(ValueError, match="style"):
        _module(QuantSpec("int8"), 64, 16, ("o",)).tp_shard("diagonal", 0, 2)
    with pytest.raises(ValueError, match="even"):
        quantize_model(Transformer(_args(intermediate_size=81)), spec4)


def test_apply_tp_on_a_quantized_model():
    import teal.tp
    spec = QuantSpec("int4", 32)
    qm, _ = _quantized(_dense(intermediate_size=128), spec)  # down_proj shards: 64 = 2 groups
    full = qm.state_dict()
    sd = teal.tp.apply_tp(copy.deepcopy(qm), rank=1, world_size=2).state_dict()
    # column-parallel k_proj (16 columns, 8 bytes): rank 1 holds the second half of the
    # byte columns of the codes and of the scales
    kq, ks = full["layers.0.attention.k_proj.qweight"], full["layers.0.attention.k_proj.scales"]
    assert torch.equal(sd["layers.0.attention.k_proj.qweight"], kq[:, kq.shape[-1] // 2:])
    assert torch.equal(sd["layers.0.attention.k_proj.scales"], ks[..., ks.shape[-1] // 2:])
    assert torch.equal(sd["layers.0.attention.o_proj.qweight"], full["layers.0.attention.o_proj.qweight"][32:])
    assert torch.equal(sd["layers.0.attention.o_proj.scales"], full["layers.0.attention.o_proj.scales"][1:])


def test_bytes_per_decode_step():
    """Stored bytes: int8 codes 1 byte + an fp32 scale per column, int4 half a byte + a bf16
    (scale, bias) per group and column; int8 about 2x and int4 about 3-4x below bf16 on the
    projections; a sparse projection's codes scale with its kept fraction on the row-skipping
    kernels (its scales do not), and not at all on the torch path, which reads every row."""
    dense = _dense().to(torch.bfloat16)
    shapes = [(p.in_features, p.out_features) for _, _, p in dense.projections()]
    dense_proj = sum(k * n * 2 for k, n in shapes)
    base = bytes_per_decode_step(dense)
    proj = {}
    for spec in (QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 128)):
        qm, _ = _quantized(dense, spec)
        if spec.mode == "int8":
            codes, scales = sum(k * n for k, n in shapes), sum(n * 4 for _, n in shapes)
        else:
            codes = sum(k * n // 2 for k, n in shapes)
            scales = sum(-(-k // spec.group_size) * 2 * n * 2 for k, n in shapes)
        got = bytes_per_decode_step(qm)
        assert got - base == codes + scales - dense_proj, spec
        proj[spec.wformat] = codes + scales
        teal.configure(qm, sparse=True)
        eff = {name: 0.5 for _, name, _ in qm.projections()}
        teal.set_kernel_policy(qm, teal.KernelPolicy(gemv=False))
        assert bytes_per_decode_step(qm, eff) == got, spec  # torch path: every row
        if K.kernels_available(torch.device("cpu")):
            teal.set_kernel_policy(qm, teal.KernelPolicy(interpreter=True))
            assert bytes_per_decode_step(qm, eff) == got - codes // 2, spec
    assert 1.8 < dense_proj / proj["int8"] <= 2.0
    assert 3.0 < dense_proj / proj["int4-g32"] < dense_proj / proj["int4-g128"] < 4.0
    # a quantized head counts as stored codes too
    qh, _ = _quantized(dense, QuantSpec("int8", head=True))
    qn, _ = _quantized(dense, QuantSpec("int8"))
    V, D = ARGS["vocab_size"], ARGS["dim"]
    assert bytes_per_decode_step(qn) - bytes_per_decode_step(qh) == V * D * 2 - (V * D + V * 4)


# ------------------------------------------------------------------- kernels (interpreter)
_KDEV = "cuda" if torch.cuda.is_available() else "cpu"
_kernels = pytest.mark.skipif(not K.kernels_available(torch.device(_KDEV)),
                              reason="Triton kernels unavailable (no triton / interpreter off)")


def _kernel_model(spec, dtype):
    with torch.device(_KDEV):
        m = _dense()
    qm, _ = _quantized(m.to(dtype), spec)
    teal.set_kernel_policy(qm, KernelPolicy(interpreter=_KDEV == "cpu", attention=False))
    return qm


def _record(monkeypatch):
    calls = []
    for name in ("sparse_gemv", "sparse_gated_gemv"):
        fn = getattr(K, name)

        def rec(*args, _fn=fn, _name=name, **kw):
            y = _fn(*args, **kw)
            calls.append((_name, args[0].clone(), y.clone(), kw.get("wformat")))
            return y
        monkeypatch.setattr(K, name, rec)
    return calls


@torch.no_grad()
def _decode(m, ids):
    m.setup_caches(1, 16)
    m(ids[:, :-1], torch.arange(ids.shape[1] - 1, device=_KDEV))
    return m(ids[:, -1:], torch.tensor([ids.shape[1] - 1], device=_KDEV)).float()


@_kernels
@pytest.mark.parametrize("spec", [QuantSpec("int8", head=True), QuantSpec("int4", 32)],
                         ids=["int8-head", "int4-g32"])
def test_decode_step_through_kernels(spec, monkeypatch):
    """Dense (no thresholds): a quantized model's decode step runs every projection on the
    kernels and its logits equal the torch path's.  Sparse: every kernel call equals the
    float64 masked product of its module's (dequantized) weight and thresholds."""
    seed = _seed()
    dtype = torch.bfloat16
    qm = _kernel_model(spec, dtype)
    ids = torch.randint(0, ARGS["vocab_size"], (1, 6), device=_KDEV)
    calls = _record(monkeypatch)
    got = _decode(qm, ids)
    n_calls = 4 * ARGS["n_layer"] + spec.head
    assert len(calls) == n_calls and all(c[3] == spec.wformat for c in calls), [c[0] for c in calls]
    teal.set_kernel_policy(qm, KernelPolicy(gemv=False, attention=False))
    ref = _decode(qm, ids)
    assert len(calls) == n_calls  # the torch path calls no kernel
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, f"kernels vs torch path {rel} seed={seed}"
    # sparse: per call against the module it ran for
    teal.set_kernel_policy(qm, KernelPolicy(interpreter=_KDEV == "cpu", attention=False))
    teal.configure(qm, sparse=True)
    for _, proj, p in qm.projections():
        p.set_threshold(torch.rand(p.in_features, device=_KDEV) * 0.6 if proj == "up_proj"
                        else torch.rand(()).item() * 0.8)
    calls.clear()
    _decode(qm, ids)
    mods = []
    for b in qm.layers:
        mods += [b.attention.qkv, b.attention.o_proj, b.feed_forward.gate_up, b.feed_forward.down_proj]
    assert len(calls) == len(mods) + spec.head
    for (name, x, y, _), m in zip(calls, mods):
        x64 = x.reshape(-1).double()
        w = m.weight.double()
        outs, a = [], 0
        for s, n in enumerate(m.sizes):
            keep = x.reshape(-1).float().abs() > m.threshold[s]
            outs.append((x64 * keep) @ w[a:a + n].t())
            a += n
        want = F.silu(outs[0]) * outs[1] if m.gated else torch.cat(outs)
        rel = ((y.reshape(-1).double() - want).norm() / want.norm()).item()
        assert torch.isfinite(y).all() and rel < 1.6e-2, (m.names, rel, f"seed={seed}")
