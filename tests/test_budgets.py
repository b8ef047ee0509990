"""Per-block budget tuning (teal.budgets): the move solver against brute force, the objective
(with cached block states) against an independent float64 computation through the plain
model forward, the search's accept/reject rule on a scripted objective, the tuned file
through apply_config and the calibrate.py / perplexity.py command lines."""
import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F

import teal
from teal.allocation import apply_config, configured_sparsity
from teal.budgets import BudgetProblem, best_moves, mixed_split, search_target, tune_budgets
from teal.calibration import collect_histograms
from teal.greedy import AllocationError, GreedyAllocation, greedy_search, param_counts
from teal.projections import PROJECTIONS
from teal.sparse_linear import configured, sparse_linears

from tiny_models import random_tokens, tiny_model

SEQ = 32


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(n_layer=3)
    calib = collect_histograms(model, random_tokens(512, seed=11), SEQ, progress=False)
    greedy = greedy_search(model, calib, random_tokens(256, seed=12), n_tokens=128, seq_len=SEQ,
                           positions=8, step=0.01, scorings=("magnitude",), progress=False)
    return model, calib, greedy


@pytest.mark.parametrize("seed", range(6))
def test_best_moves_matches_exhaustive_search(seed):
    rng = random.Random(seed)
    costs = []
    for _ in range(4):
        ks = [k for k in (-2, -1, 1, 2) if rng.random() < 0.8]
        costs.append({k: rng.uniform(-1.0, 1.0) for k in ks})
    moves = best_moves(costs)
    assert sum(moves) == 0
    best = 0.0  # staying put
    for combo in itertools.product(*[[0] + list(c) for c in costs]):
        if sum(combo) == 0:
            best = min(best, sum(c.get(k, 0.0) for c, k in zip(costs, combo)))
    got = sum(c.get(k, 0.0) for c, k in zip(costs, moves))
    assert got == pytest.approx(best, abs=1e-12)
    assert best_moves([{1: 0.5}, {-1: 0.1}]) == [0, 0]  # no zero-sum move that pays


def _reference_objective(model, windows, kind):
    """float64 NLL / KL from the model's own forward (no cached states), sparsified."""
    with torch.no_grad():
        with configured(model, sparsify_prefill=True):
            lp = F.log_softmax(model(windows).double(), dim=-1)[:, :-1]
        with configured(model, sparse=False):
            ref = F.log_softmax(model(windows).double(), dim=-1)[:, :-1]
    if kind == "nll":
        return -lp.gather(2, windows[:, 1:, None]).mean().item()
    return (ref.exp() * (ref - lp)).sum(-1).mean().item()


@pytest.mark.parametrize("kind", ["nll", "kl"])
def test_objective_and_cached_suffix_match_reference(setup, kind):
    model, calib, _ = setup
    windows = random_tokens(3 * SEQ, seed=21).view(3, SEQ)
    prob = BudgetProblem(model, calib, windows, objective=kind)
    gen = torch.Generator().manual_seed(3)
    for layer in range(3):
        prob.set_block(layer, (torch.rand(len(PROJECTIONS), generator=gen) * 0.8).tolist())
    full = prob.objective(keep_states=True)
    ref = _reference_objective(model, windows, kind)
    assert full == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert full > (0.0 if kind == "kl" else 1.0)  # sparsity changed something
    for layer in (1, 2):  # only block `layer` changes: the cached prefix is still valid
        prob.set_block(layer, [0.6] * len(PROJECTIONS))
        ref = _reference_objective(model, windows, kind)
        assert prob.objective(from_layer=layer) == pytest.approx(ref, rel=1e-4, abs=1e-6)
        prob.objective(keep_states=True)
    teal.configure(model, sparse=False)
    with pytest.raises(ValueError, match="unknown tuning objective"):
        BudgetProblem(model, calib, windows, objective="ppl")


class ScriptedProblem:
    """A BudgetProblem stand-in whose objective is a known function of the block
    sparsities: additive in the blocks plus a penalty that makes the first proposal lose."""

    def __init__(self, n_layer, f):
        self.n_layer, self.f, self.s = n_layer, f, [0.0] * n_layer

    def set_block(self, layer, sparsities):
        self.s[layer] = sparsities[0]

    def objective(self, from_layer=0, keep_states=False):
        return self.f(self.s)


def test_search_keeps_only_measured_improvements_and_target():
    weights = [3.0, 1.0, 1.0, 3.0]  # blocks 1 and 2 are cheap: sparsity should move there

    def f(s):
        base = sum(w * x * x for w, x in zip(weights, s))
        # interaction: a big simultaneous move of every block costs extra (additivity fails)
        spread = sum(abs(x - 0.5) for x in s)
        return base + (1.0 if spread > 0.55 else 0.0)

    prob = ScriptedProblem(4, f)
    s, final, history = search_target(prob, lambda layer, x: [x] * 7, 0.5, step=0.1,
                                      radius_steps=2, rounds=4, min_step=0.01)
    assert sum(s) == pytest.approx(4 * 0.5)  # the model-level target is kept exactly
    assert final == pytest.approx(f(s)) and final < f([0.5] * 4)
    assert s[1] > 0.5 and s[2] > 0.5 and s[0] < 0.5 and s[3] < 0.5
    assert history[0]["kept"] is False and history[1]["step"] == pytest.approx(0.05)
    assert all(h["measured"] < h["before"] for h in history if h["kept"])


def test_mixed_split_keeps_block_sparsity(setup):
    model, _, greedy = setup
    params = [param_counts(model.layers[0])[p] for p in PROJECTIONS]

    def block(row):
        return sum(x * n for x, n in zip(row, params)) / sum(params)

    for w in (0.0, 0.3, 1.0):
        split = mixed_split(greedy, "magnitude", w)
        for layer in range(3):
            for s in (0.1, 0.37, 0.5):
                row = split(layer, s)
                # greedy's own row sits at the block sparsity (up to its step's overshoot)
                g = block(greedy.sparsities("magnitude", s)[layer])
                assert g == pytest.approx(s, abs=0.01)
                assert block(row) == pytest.approx(w * s + (1 - w) * g, abs=1e-9)
                assert (len(set(row)) == 1) == (w == 1.0)
    with pytest.raises(ValueError, match="needs a greedy allocation"):
        mixed_split(None, "magnitude", 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mixed_split(greedy, "magnitude", 1.5)


def test_tune_budgets_file_roundtrip_and_apply(setup, tmp_path):
    model, calib, greedy = setup
    ids = random_tokens(1024, seed=31)
    res = tune_budgets(model, calib, ids, [0.3, 0.5], offset=256, n_tokens=4 * SEQ,
                       seq_len=SEQ, greedy=greedy, rounds=2, progress=False)
    assert all(not m.sparse for m in sparse_linears(model))  # left dense
    path = tmp_path / "tuned.json"
    res.save(path)
    tuned = GreedyAllocation.load(path, kind="tuned")
    assert tuned.targets("magnitude") == [0.3, 0.5]
    for key, rec in tuned.meta["tuning"].items():
        assert rec["objective"] <= rec["uniform_objective"] + 1e-12
        assert rec["objective"] <= min(rec["mixes"].values()) + 1e-12
        assert sum(rec["block_sparsities"]) / 3 == pytest.approx(float(key), abs=1e-6)
    for t in (0.3, 0.4, 0.5):  # at and between the tuned targets
        applied = apply_config(model, calib, t, allocation="tuned", tuned=path)
        assert configured_sparsity(model, applied) == pytest.approx(t, abs=1e-5)
    with pytest.raises(AllocationError, match="beyond the tuned grid"):
        apply_config(model, calib, 0.6, allocation="tuned", tuned=tuned)
    with pytest.raises(AllocationError, match="--tune-only"):
        apply_config(model, calib, 0.3, allocation="tuned", tuned=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="validation tokens after the first 1000"):
        tune_budgets(model, calib, ids, [0.3], offset=1000, n_tokens=4 * SEQ, seq_len=SEQ,
                     progress=False)
    teal.configure(model, sparse=False)


def test_calibrate_tune_cli_and_perplexity_tuned(tmp_path, capsys):
    import calibrate
    import perplexity as perplexity_cli
    from tiny_models import write_checkpoint, write_text

    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model(n_layer=2))
    text = write_text(tmp_path / "valid.txt", 600)
    common = ["--checkpoint_path", str(ckpt), "--text", str(text), "--seq_len", str(SEQ),
              "--max_tokens", "256", "--device", "cpu", "--quiet"]
    tune = ["--tune-tokens", "128", "--tune-rounds", "1", "--tune-targets", "0.25", "0.5"]
    assert calibrate.main(common + ["--tune"] + tune) == 0
    tuned = GreedyAllocation.load(ckpt.parent / "tuned.json", kind="tuned")
    assert tuned.meta["offset"] == 256 and tuned.meta["objective"] == "nll"
    assert tuned.meta["mixes"] == [1.0]  # no greedy.json: uniform split only
    assert "tuned vs uniform TEAL" in capsys.readouterr().out
    out = tmp_path / "res.json"
    rc = perplexity_cli.main(["--checkpoint_path", str(ckpt), "--text", str(write_text(
        tmp_path / "test.txt", 80, seed=9)), "--sparsity", "0.4", "--allocation", "tuned",
        "--seq_len", str(SEQ), "--quiet", "--output", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["allocation"] == "tuned" and abs(row["model_sparsity"] - 0.4) < 0.1
    capsys.readouterr()
    for bad, msg in ((["--tune-targets", "1.5"], "--tune-targets must be in (0, 1)"),
                     (["--tune-rounds", "0"], "--tune-rounds must be >= 1"),
                     (["--greedy-only"], "exclude each other")):
        with pytest.raises(SystemExit):
            calibrate.main(common + ["--tune-only"] + bad)
        assert msg in capsys.readouterr().err
    # too little validation text after the calibration tokens: one line naming the fix
    short = write_text(tmp_path / "short.txt", 280)
    assert calibrate.main(["--checkpoint_path", str(ckpt), "--text", str(short), "--seq_len",
                           str(SEQ), "--device", "cpu", "--quiet", "--tune-only"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tune-tokens" in err[0]


def _table(n_layer, targets, kind):
    meta = dict(format="teal-greedy/1", model={}, n_layer=n_layer)
    if kind == "tuned":
        meta["tuning"] = {}
    rows = {f"{t:.4f}": [[t] * len(PROJECTIONS)] * n_layer for t in targets}
    return GreedyAllocation(meta, {"magnitude": rows}, {})


def test_choose_allocation_prefers_measured_best_available():
    from teal.allocation import AUTO_GREEDY_FROM, choose_allocation
    greedy = _table(2, (0.25, 0.5, 0.9), "greedy")
    tuned = _table(2, (0.25, 0.4, 0.5), "tuned")
    assert choose_allocation(0.0, greedy=greedy, tuned=tuned)[0] == "uniform"
    assert choose_allocation(0.25, greedy=greedy, tuned=tuned)[0] == "tuned"
    assert choose_allocation(0.5, greedy=greedy, tuned=tuned)[0] == "tuned"
    alloc, why = choose_allocation(0.6, greedy=greedy, tuned=tuned)
    assert alloc == "greedy" and "60%" in why
    assert choose_allocation(0.6, greedy=None, tuned=tuned)[0] == "uniform"
    assert choose_allocation(AUTO_GREEDY_FROM, greedy=greedy)[0] == "greedy"
    alloc, why = choose_allocation(0.25, greedy=greedy)
    assert alloc == "uniform" and "no tuned.json" in why
    assert choose_allocation(0.5, scoring="weight", greedy=greedy, tuned=tuned)[0] == "uniform"


def test_generate_auto_allocation_reports_and_applies(tmp_path, capsys):
    """generate.py's default --allocation auto: uniform without tables, tuned with a tuned.json
    beside the thresholds (the run says which); a tuned.json of another model is an error."""
    import shutil

    import generate
    from tiny_models import write_checkpoint

    model = tiny_model(n_layer=2)
    ckpt = write_checkpoint(tmp_path / "ckpt", model)
    collect_histograms(model, random_tokens(512, seed=11), SEQ,
                       progress=False).save(ckpt.parent / "thresholds.safetensors")
    argv = ["--checkpoint_path", str(ckpt), "--device", "cpu", "--dtype", "float32",
            "--sparsity", "0.5", "--no-chat", "--max_new_tokens", "4", "--temperature", "0",
            "--prompt", "w1 w2 w3"]
    generate.main(argv)
    err = capsys.readouterr().err
    assert "(uniform [auto: no tuned.json" in err
    table = _table(2, (0.5,), "tuned")
    table.meta["model"] = model.config.to_dict()
    table.allocations["magnitude"]["0.5000"] = [[0.9] * 7, [0.1] * 7]
    table.save(ckpt.parent / "tuned.json")
    generate.main(argv)
    assert "(tuned [auto: tuned.json covers this target]" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(ckpt.parent, other)
    table.meta["model"] = dict(model.config.to_dict(), n_layer=3)
    table.save(other / "tuned.json")
    with pytest.raises(SystemExit, match="made for another model"):
        generate.main(["--checkpoint_path", str(other / "model.pth")] + argv[2:])


def test_prepare_installs_shipped_tuned_only_for_its_calibration(setup, tmp_path, capsys):
    """scripts/prepare.py step 5: the shipped tuned.json is valid for the default model and
    is copied beside thresholds calibrated on its text and token count, not beside others."""
    from model import ModelArgs
    from scripts import prepare

    shipped = GreedyAllocation.load(prepare.SHIPPED_TUNED, kind="tuned")
    assert shipped.meta["model"]["n_layer"] == 30 and shipped.targets("magnitude") == [0.25, 0.4, 0.5]
    for t in (0.25, 0.4, 0.5):  # the tables hold the model-level target exactly
        rows = shipped.sparsities("magnitude", t)
        args = ModelArgs(**shipped.meta["model"])
        kv = args.n_local_heads * args.head_dim
        sizes = [args.dim * args.dim, args.dim * kv, args.dim * kv, args.dim * args.dim,
                 args.dim * args.intermediate_size, args.dim * args.intermediate_size,
                 args.intermediate_size * args.dim]
        total = sum(sum(x * n for x, n in zip(r, sizes)) for r in rows) / (sum(sizes) * len(rows))
        assert total == pytest.approx(t, abs=1e-6)
    import copy
    calib = copy.deepcopy(setup[1])
    text = shipped.meta["source"]["text"]
    for name, meta_text, installed in (("default", dict(text), True),
                                       ("other", dict(text, sha256="0" * 64), False)):
        folder = tmp_path / name
        folder.mkdir()
        calib.meta["text"] = meta_text
        calib.save(folder / "thresholds.safetensors")
        got = prepare.ensure_tuned(folder / "thresholds.safetensors")
        assert (got is not None) == installed == (folder / "tuned.json").exists()
        if installed:
            assert (folder / "tuned.json").read_bytes() == prepare.SHIPPED_TUNED.read_bytes()
            assert prepare.ensure_tuned(folder / "thresholds.safetensors") == got  # idempotent
    assert "calibrate.py --tune-only" in capsys.readouterr().out
