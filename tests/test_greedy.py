"""Greedy allocation: steps against an independent block-error computation, the allocation
file (validation, interpolation, application), weight-informed thresholds vs |x|·||W||."""
import json

import pytest
import torch
import torch.nn.functional as F

import teal
from teal.allocation import apply_config, configured_sparsity
from teal.calibration import collect_histograms, rope_and_mask
from teal.projections import block_projections
from teal.greedy import (AllocationError, BlockProblem, GreedyAllocation, greedy_block,
                         greedy_search, param_counts, threshold_fn)
from teal.sparse_linear import SparseLinear
from teal.thresholds import DEFAULT_BINS, PROJECTIONS, Calibration, histogram_quantile

from tiny_models import random_tokens, tiny_model

SEQ = 32


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    calib = collect_histograms(model, random_tokens(512, seed=11), SEQ, progress=False)
    return model, calib


def _block_error_reference(model, calib, layer, x, idx, sparsities, scoring):
    """Block-output squared error at positions idx with the real modules sparsified."""
    block = model.layers[layer]
    pos, freqs, mask = rope_and_mask(model, x.shape[1], x.device)
    get = threshold_fn(model, calib, layer, scoring)
    teal.configure(block, sparse=False, sparsify_prefill=True)
    with torch.no_grad():
        dense = block(x, pos, freqs, mask)[:, idx]
        teal.set_thresholds({p: (get(proj, sparsities[proj]) if sparsities[proj] > 0 else 0.0,
                                 sparsities[proj]) for proj, p in block_projections(block).items()})
        out = block(x, pos, freqs, mask)[:, idx]
    teal.configure(block, sparse=False, sparsify_prefill=False)
    return (out - dense).double().pow(2).sum().item()


@pytest.mark.parametrize("scoring", ["magnitude", "weight"])
def test_greedy_steps_match_independent_block_errors(setup, scoring):
    model, calib = setup
    layer = 1
    torch.manual_seed(0)
    x = torch.randn(3, SEQ, model.config.dim)
    idx = torch.tensor([0, 3, 10, 20, 31])
    _, freqs, _ = rope_and_mask(model, SEQ, "cpu")
    with torch.no_grad():
        prob = BlockProblem(model.layers[layer], x, idx, freqs,
                            threshold_fn(model, calib, layer, scoring))
    params = param_counts(model.layers[layer])
    total = sum(params.values())
    step = 0.05
    seen = []

    def on_step(best, errors):
        seen.append((best, dict(errors), dict(prob.s)))

    # state before each step: replay it to check each step's candidate errors independently
    greedy_block(prob, params, step, targets=(0.05, 0.1, 0.15, 0.2), on_step=on_step)
    assert len(seen) == 4
    state = {p: 0.0 for p in PROJECTIONS}
    for best, errors, after in seen[:3]:
        ref = {}
        for p in PROJECTIONS:
            cand = dict(state)
            cand[p] = min(state[p] + step * total / params[p], 0.99)
            ref[p] = _block_error_reference(model, calib, layer, x, idx, cand, scoring)
        for p in PROJECTIONS:
            assert errors[p] == pytest.approx(ref[p], rel=1e-3, abs=1e-9), (p, errors, ref)
        assert best == min(ref, key=ref.get)
        state = after


def test_greedy_search_file_roundtrip_and_apply(setup, tmp_path):
    model, calib = setup
    targets = (0.1, 0.2, 0.3, 0.5)
    res = greedy_search(model, calib, random_tokens(256, seed=12), n_tokens=128, seq_len=SEQ,
                        positions=8, step=0.02, targets=targets, progress=False,
                        source=dict(thresholds="x"))
    path = tmp_path / "greedy.json"
    res.save(path)
    g = GreedyAllocation.load(path)
    assert g.meta["tokens"] == 128 and g.meta["step"] == 0.02
    assert g.targets("magnitude") == list(targets)
    params = [param_counts(model.layers[0])[p] for p in PROJECTIONS]
    for sc in ("magnitude", "weight"):
        prev = None
        for t in targets:
            rows = g.sparsities(sc, t)
            for r in rows:  # each block reaches the target exactly (parameter-weighted)
                assert sum(s * n for s, n in zip(r, params)) / sum(params) == pytest.approx(t, abs=1e-4)
                assert len(set(r)) > 1  # non-uniform
            if prev is not None:  # greedy only ever raises sparsities
                assert all(a >= b for ra, rb in zip(rows, prev) for a, b in zip(ra, rb))
            prev = rows
        # interpolation between grid points and applying the config
        applied = apply_config(model, calib, 0.4, allocation="greedy", scoring=sc, greedy=g)
        assert configured_sparsity(model, applied) == pytest.approx(0.4, abs=1e-4)
    with pytest.raises(AllocationError, match="beyond the greedy grid"):
        g.sparsities("magnitude", 0.6)
    teal.configure(model, sparse=False)


def test_greedy_file_validation(setup, tmp_path):
    model, calib = setup
    res = greedy_search(model, calib, random_tokens(128, seed=13), n_tokens=64, seq_len=SEQ,
                        positions=4, step=0.05, targets=(0.25,), scorings=("magnitude",),
                        progress=False)
    path = tmp_path / "greedy.json"
    res.save(path)
    other = tiny_model(n_layer=3)
    with pytest.raises(AllocationError, match="another model"):
        apply_config(other, Calibration(calib.hist.new_zeros(3, 4, calib.hist.shape[2]) + 1,
                                        dict(calib.meta, model=other.config.to_dict())),
                     0.25, allocation="greedy", greedy=path)
    with pytest.raises(AllocationError, match="no 'weight' scoring"):
        apply_config(model, calib, 0.25, allocation="greedy", scoring="weight", greedy=path)
    with pytest.raises(AllocationError, match="not found"):
        apply_config(model, calib, 0.25, allocation="greedy", greedy=tmp_path / "nope.json")
    d = json.loads(path.read_text())
    d["allocations"]["magnitude"]["0.2500"] = d["allocations"]["magnitude"]["0.2500"][:1]
    path.write_text(json.dumps(d))
    with pytest.raises(AllocationError, match="malformed"):
        GreedyAllocation.load(path)
    path.write_text("{not json")
    with pytest.raises(AllocationError, match="not a greedy allocation file"):
        GreedyAllocation.load(path)


def test_weight_informed_threshold_matches_explicit_score():
    """keep iff |x_i| * ||W[:, i]||_2 > t_w, t_w the s-quantile of the score."""
    torch.manual_seed(3)
    model = tiny_model(n_layer=1, dim=64, n_head=4, n_local_heads=2)
    lin = model.layers[0].feed_forward.down_proj  # any projection; input width 48
    with torch.no_grad():  # columns of very different norms
        lin.weight.mul_(torch.logspace(-1, 1, lin.in_features)[None, :])
    calib = Calibration.empty(model.config.to_dict(), 1)
    x = torch.randn(500, lin.in_features) * torch.rand(lin.in_features)
    norms = lin.weight.detach().norm(dim=0)
    score = x.abs() * norms
    hw = torch.ones(1, 7, DEFAULT_BINS["n"], dtype=torch.float64)  # other projections: unused
    hw[0, PROJECTIONS.index("down_proj")] = 0
    teal.thresholds.update_histogram(hw[0, PROJECTIONS.index("down_proj")], score,
                                     DEFAULT_BINS["lo"], DEFAULT_BINS["hi"])
    calib.extra_tensors["hist_weighted"] = hw
    calib.hist += 1  # magnitude histograms unused here; non-empty for apply_config
    s = 0.6
    apply_config(model, calib, s, scoring="weight")
    t_w = histogram_quantile(hw[0, PROJECTIONS.index("down_proj")], s, DEFAULT_BINS["lo"],
                             DEFAULT_BINS["hi"])
    assert abs(t_w / torch.quantile(score.double(), s).item() - 1) < 0.01
    keep = score > t_w
    assert abs((~keep).float().mean().item() - s) < 0.01
    lin.sparsify_prefill = True
    ref = F.linear(x * keep, lin.weight)
    torch.testing.assert_close(lin(x), ref)
    assert not torch.allclose(lin(x), F.linear(x * (x.abs() > x.abs().quantile(s)), lin.weight))
    assert isinstance(lin, SparseLinear) and lin.projection(0).threshold.shape == (lin.in_features,)


def test_calibrate_greedy_cli_and_perplexity_greedy(tmp_path):
    """calibrate.py --greedy writes thresholds + greedy.json; --greedy-only redoes the second
    step; perplexity.py evaluates greedy x weight with sequential calibration."""
    import calibrate
    import perplexity as perplexity_cli
    from tiny_models import write_checkpoint, write_text

    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model())
    text = write_text(tmp_path / "calib.txt", 300)
    common = ["--checkpoint_path", str(ckpt), "--text", str(text), "--seq_len", str(SEQ),
              "--max_tokens", "256", "--device", "cpu", "--quiet", "--greedy-tokens", "64",
              "--greedy-seq-len", str(SEQ), "--greedy-positions", "4", "--greedy-step", "0.05"]
    assert calibrate.main(common + ["--greedy"]) == 0
    g = GreedyAllocation.load(ckpt.parent / "greedy.json")
    assert g.meta["tokens"] == 64 and set(g.allocations) == {"magnitude", "weight"}
    (ckpt.parent / "greedy.json").unlink()
    assert calibrate.main(common + ["--greedy-only", "--greedy-scoring", "weight"]) == 0
    assert set(GreedyAllocation.load(ckpt.parent / "greedy.json").allocations) == {"weight"}
    out = tmp_path / "res.json"
    rc = perplexity_cli.main(["--checkpoint_path", str(ckpt), "--text", str(write_text(
        tmp_path / "test.txt", 80, seed=9)), "--sparsity", "0.5", "--allocation", "greedy",
        "--scoring", "weight", "--calibration", "sequential", "--calib_text", str(text),
        "--calib_tokens", "64", "--seq_len", str(SEQ), "--quiet", "--output", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["calibration"] == "sequential" and abs(row["model_sparsity"] - 0.5) < 0.1
