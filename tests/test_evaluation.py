"""Perplexity against an independent computation, sparse scoring vs sparse decoding,
effective sparsity bookkeeping, and the perplexity.py CLI."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import perplexity as perplexity_cli
import teal
from teal.allocation import apply_config
from teal.calibration import collect_histograms
from teal.evaluation import effective_sparsity, parameter_weighted_sparsity, perplexity

from fixtures_smollm2 import smollm2  # noqa: F401  (pytest fixture)
from tiny_models import random_tokens, tiny_model, write_checkpoint, write_text

SEQ = 32


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    calib = collect_histograms(model, random_tokens(512, seed=5), SEQ, progress=False)
    return model, calib


def _reference_ppl(model, ids, seq_len):
    """Each token t >= 1 scored once, from a window of at most `seq_len` tokens that ends at t
    and starts where the windows tile the text overlapping by one (positions k*(seq_len-1));
    every window's logits concatenated, then one F.cross_entropy."""
    logits, targets = [], []
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, seq_len - 1):
            w = ids[start:start + seq_len]
            logits.append(model(w[None])[0, :-1])
            targets.append(w[1:])
    assert torch.equal(torch.cat(targets), ids[1:])  # every token after the first, once
    return math.exp(F.cross_entropy(torch.cat(logits).double(), torch.cat(targets)).item())


def test_perplexity_matches_independent_computation(setup):
    model, _ = setup
    teal.configure(model, sparse=False, sparsify_prefill=False)
    ids = random_tokens(3 * SEQ + 7, seed=2)  # a final partial window is scored too
    ppl = perplexity(model, ids, SEQ, progress=False)
    assert ppl == pytest.approx(_reference_ppl(model, ids, SEQ), rel=1e-5)
    # max_tokens truncates before windowing
    assert perplexity(model, ids, SEQ, max_tokens=2 * SEQ, progress=False) == pytest.approx(
        _reference_ppl(model, ids[:2 * SEQ], SEQ), rel=1e-5)


def test_every_token_after_the_first_is_scored_exactly_once(setup):
    """Issue 14 item 8: non-overlapping windows never predicted the first token of each
    window (N / seq_len tokens lost). Windows now overlap by one token."""
    from teal.evaluation import scoring_windows, window_ends
    model, _ = setup
    teal.configure(model, sparse=False, sparsify_prefill=False)
    for n in (2, SEQ, SEQ + 1, 3 * SEQ + 7, 4 * (SEQ - 1) + 1):
        ids = random_tokens(n, seed=9)
        seen = []
        perplexity(model, ids, SEQ, progress=False,
                   on_window=lambda done, nll, count: seen.append((done, count)))
        assert seen[-1] == (n, n - 1), (n, seen)  # all n tokens consumed, n - 1 predicted
        assert [d for d, _ in seen] == window_ends(n, SEQ)
        targets = torch.cat([w[1:] for w in scoring_windows(torch.arange(n), SEQ)])
        assert torch.equal(targets, torch.arange(1, n))
        assert all(w.numel() <= SEQ for w in scoring_windows(torch.arange(n), SEQ))


def test_split_runs_add_up_to_the_full_run(setup):
    """A run from a later token carries the token before as context: two consecutive runs
    predict exactly the tokens (and give exactly the NLL) of one run over both."""
    model, _ = setup
    teal.configure(model, sparse=False, sparsify_prefill=False)
    ids = random_tokens(5 * SEQ, seed=10)
    m = 1 + 2 * (SEQ - 1)  # a window end of the full run
    runs = []
    for part, ctx in ((ids, None), (ids[:m], None), (ids[m:], ids[m - 1:m])):
        last = []
        perplexity(model, part, SEQ, progress=False, context=ctx,
                   on_window=lambda done, nll, count, last=last: last.append((nll, count)))
        runs.append(last[-1])
    (full_nll, full_n), (a_nll, a_n), (b_nll, b_n) = runs
    assert a_n + b_n == full_n == ids.numel() - 1
    assert a_nll + b_nll == pytest.approx(full_nll, rel=1e-6)


def test_sparsity_zero_equals_dense(setup):
    model, calib = setup
    ids = random_tokens(2 * SEQ, seed=3)
    teal.configure(model, sparse=False, sparsify_prefill=False)
    dense = perplexity(model, ids, SEQ, progress=False)
    for scoring in ("magnitude", "weight"):
        applied = apply_config(model, calib, 0.0, scoring=scoring)
        teal.configure(model, sparsify_prefill=True, track=True)
        assert set(applied.values()) == {0.0}
        assert perplexity(model, ids, SEQ, progress=False) == dense
        assert parameter_weighted_sparsity(model) == 0.0
    apply_config(model, calib, 0.5)
    teal.configure(model, sparsify_prefill=True)
    assert perplexity(model, ids, SEQ, progress=False) != dense
    teal.configure(model, sparse=False, sparsify_prefill=False, track=False)


def test_sparse_scoring_equals_sparse_decoding(setup):
    """Teacher-forced forward with every position sparsified == token-by-token sparse decode
    with a KV cache (what generate.py does when every token is decoded sparsely)."""
    model, calib = setup
    ids = random_tokens(20, seed=4)
    apply_config(model, calib, 0.5)
    teal.configure(model, sparsify_prefill=True, track=False)
    with torch.no_grad():
        full = model(ids[None])[0]
        model.setup_caches(1, 20, dtype=torch.float32)
        steps = [model(ids[None, i:i + 1], torch.tensor([i]))[0, 0] for i in range(20)]
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-4)
    teal.configure(model, sparse=False, sparsify_prefill=False)


def test_effective_sparsity_bookkeeping():
    model = tiny_model()
    teal.configure(model, sparse=False, sparsify_prefill=True, track=True)
    for layer, proj, p in model.projections():
        if proj == "down_proj":
            p.set_threshold(float("inf"))  # zero everything
            p.module.sparse = True
    with torch.no_grad():
        model(random_tokens(16)[None])
    eff = effective_sparsity(model)
    assert eff["down_proj"] == 1.0
    assert all(v == 0.0 for p, v in eff.items() if p != "down_proj")
    c = model.config
    per_block = (c.dim * c.n_head * c.head_dim * 2 + c.dim * c.n_local_heads * c.head_dim * 2
                 + 3 * c.dim * c.intermediate_size)
    expected = c.dim * c.intermediate_size / per_block
    assert parameter_weighted_sparsity(model) == pytest.approx(expected)
    assert effective_sparsity(model, per_layer=True)[(1, "down_proj")] == 1.0


def test_perplexity_cli(tmp_path, capsys):
    model = tiny_model()
    ckpt = write_checkpoint(tmp_path / "ckpt", model)
    calib = collect_histograms(model, random_tokens(256, seed=6), SEQ, progress=False)
    calib.save(ckpt.parent / "thresholds.safetensors")
    text = write_text(tmp_path / "test.txt", 100, seed=7)
    out = tmp_path / "res.json"
    rc = perplexity_cli.main(["--checkpoint_path", str(ckpt), "--text", str(text), "--sparsity",
                              "0", "0.5", "--scoring", "magnitude", "weight", "--seq_len",
                              str(SEQ), "--device", "cpu", "--quiet", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert [(r["allocation"], r["scoring"], r["sparsity"]) for r in res] == [
        ("dense", "-", 0.0), ("uniform", "magnitude", 0.5), ("uniform", "weight", 0.5)]
    ids = torch.tensor([int(w[1:]) for w in text.read_text().split()])
    assert res[0]["perplexity"] == pytest.approx(_reference_ppl(model, ids, SEQ), rel=1e-5)
    for r in res[1:]:
        assert 0.4 < r["model_sparsity"] < 0.6
        assert set(r["effective"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"}
    stdout = capsys.readouterr().out
    assert "measured model-level" in stdout and "per type" in stdout


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "1.5"])
def test_perplexity_cli_rejects_bad_sparsity(bad, capsys):
    with pytest.raises(SystemExit) as e:
        perplexity_cli.parse_args(["--sparsity", bad])
    assert e.value.code == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_perplexity_cli_missing_thresholds(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model())
    text = write_text(tmp_path / "t.txt", 50)
    rc = perplexity_cli.main(["--checkpoint_path", str(ckpt), "--text", str(text),
                              "--sparsity", "0.5", "--quiet"])
    assert rc == 1
    assert "calibrate.py" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--seq_len", "0"), ("--max_tokens", "1"),
                                        ("--start_token", "-3")])
def test_perplexity_cli_rejects_bad_counts(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        perplexity_cli.parse_args([flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_perplexity_cli_output_is_a_directory(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_model())
    text = write_text(tmp_path / "t.txt", 50)
    out = tmp_path / "resdir"
    out.mkdir()
    rc = perplexity_cli.main(["--checkpoint_path", str(ckpt), "--text", str(text), "--seq_len",
                              str(SEQ), "--quiet", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "is a directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "resdir", "t.txt"]


def test_smollm2_dense_and_sparse_perplexity(smollm2):
    """The real default model on a short slice of WikiText-2 raw test (calibrated on the
    validation text): sane dense perplexity, moderate increase at 50%, sparsity on target."""
    from pathlib import Path

    from teal.calibration import load_token_ids
    from model import load_model

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    model, meta = load_model(smollm2.checkpoint)
    test_ids = load_token_ids(data / "wikitext-2-raw-test.txt", smollm2.checkpoint, meta)
    valid_ids = load_token_ids(data / "wikitext-2-valid-tokenized.txt", smollm2.checkpoint, meta)
    assert test_ids.numel() > 250_000  # the whole file, tokenized once
    ids = test_ids[:384]
    dense = perplexity(model, ids, 384, progress=False)
    assert 8 < dense < 60
    calib = collect_histograms(model, valid_ids, 512, max_tokens=512, weighted=False,
                               progress=False)
    apply_config(model, calib, 0.5)
    teal.configure(model, sparsify_prefill=True, track=True)
    sparse = perplexity(model, ids, 384, progress=False)
    eff = effective_sparsity(model)
    teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
    assert dense < sparse < 1.6 * dense
    assert all(abs(v - 0.5) < 0.06 for v in eff.values()), eff
