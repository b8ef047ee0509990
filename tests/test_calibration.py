"""Calibration: histogram quantiles vs exact quantiles, thresholds vs measured sparsity, the
calibrate.py CLI (file written, validated, errors, interruption)."""
import math

import pytest
import torch

import calibrate
import teal
from teal.allocation import apply_config
from teal.calibration import HistogramCollector, collect_histograms, token_windows
from teal.evaluation import effective_sparsity
from teal.projections import INPUTS, PROJECTIONS, input_module, model_projection
from teal.thresholds import Calibration, ThresholdsError

from tiny_models import random_tokens, tiny_args, tiny_model, write_checkpoint, write_text

SEQ = 64


def _raw_inputs(model, ids):
    """|x| of each (layer, input) of a dense forward, captured independently of the collector."""
    raw, handles = {}, []
    for i, b in enumerate(model.layers):
        for name in INPUTS:
            def hook(mod, args, key=(i, name)):
                raw.setdefault(key, []).append(args[0].detach().abs().reshape(-1))
            handles.append(input_module(b, name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for w in token_windows(ids, SEQ):
            model(w[None])
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in raw.items()}


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model()
    ids = random_tokens(512)
    calib = collect_histograms(model, ids, SEQ, progress=False)
    return model, ids, calib


def test_histogram_quantile_matches_exact_quantile(calibrated):
    model, ids, calib = calibrated
    raw = _raw_inputs(model, ids)
    bins = calib.bins
    bin_width = (math.log(bins["hi"]) - math.log(bins["lo"])) / bins["n"]
    assert calib.meta["tokens"] == 512
    for (layer, name), a in raw.items():
        assert calib.hist[layer, INPUTS.index(name)].sum().item() == a.numel()
        for s in (0.1, 0.25, 0.5, 0.75, 0.9):
            t = calib.threshold(layer, name, s)
            ref = torch.quantile(a.double(), s).item()
            # within one log-spaced bin of the exact quantile (plus the gap between samples)
            lo_s, hi_s = torch.quantile(a.double(), torch.tensor([s - 2e-3, s + 2e-3],
                                                                 dtype=torch.float64)).tolist()
            tol = bin_width + max(math.log(hi_s / lo_s), 0.0)
            assert abs(math.log(t / ref)) <= tol, (layer, name, s, t, ref)


@pytest.mark.parametrize("scoring", ["magnitude", "weight"])
def test_thresholds_give_target_sparsity_on_calibration_data(calibrated, scoring):
    """The thresholds zero the target fraction of the (dense) calibration activations: the
    fraction of |x| <= t (per channel for weight scoring) seen by each projection's hook."""
    model, ids, calib = calibrated
    for s in (0.25, 0.5, 0.7):
        apply_config(model, calib, s, scoring=scoring)
        teal.configure(model, sparse=False)
        zeroed = {p: [0, 0] for p in PROJECTIONS}
        handles = []
        for _, proj, p in model.projections():
            def hook(mod, args, proj=proj, p=p):
                keep = args[0].abs() > p.threshold
                zeroed[proj][0] += (~keep).sum().item()
                zeroed[proj][1] += keep.numel()
            handles.append(p.module.register_forward_pre_hook(hook))
        with torch.no_grad():
            for w in token_windows(ids, SEQ):
                model(w[None])
        for h in handles:
            h.remove()
        for proj, (z, n) in zeroed.items():
            assert abs(z / n - s) <= 0.01, (scoring, s, proj, z / n)


def test_sparse_model_first_block_hits_target(calibrated):
    """Run sparsified (every token): block 0's q/k/v see exactly the calibration inputs."""
    model, ids, calib = calibrated
    apply_config(model, calib, 0.5)
    teal.configure(model, sparsify_prefill=True, track=True)
    with torch.no_grad():
        for w in token_windows(ids, SEQ):
            model(w[None])
    eff = effective_sparsity(model, per_layer=True)
    teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert abs(eff[(0, proj)] - 0.5) <= 0.01
    assert all(abs(v - 0.5) <= 0.1 for v in eff.values())  # deeper inputs drift a little


def test_weighted_histograms_score_definition(calibrated):
    """hist_weighted[layer, p] counts |x_i| * ||W[:, i]||_2 of projection p's input."""
    model, ids, _ = calibrated
    calib = Calibration.empty(model.config.to_dict(), model.config.n_layer)
    x_seen = {}

    def grab(mod, args):
        x_seen["x"] = args[0].detach().clone()
    lin = model_projection(model, 1, "up_proj")
    h = lin.module.register_forward_pre_hook(grab)
    with HistogramCollector(model, calib, weighted=True), torch.no_grad():
        model(ids[:SEQ][None])
    h.remove()
    score = x_seen["x"].abs() * lin.weight.detach().norm(dim=0)
    ref = torch.zeros(calib.bins["n"], dtype=torch.float64)
    teal.thresholds.update_histogram(ref, score, calib.bins["lo"], calib.bins["hi"])
    got = calib.extra_tensors["hist_weighted"][1, PROJECTIONS.index("up_proj")]
    assert torch.equal(got, ref)


def _calibrate_cli(tmp_path, n_tokens, *extra):
    model = tiny_model()
    ckpt = write_checkpoint(tmp_path / "ckpt", model)
    text = write_text(tmp_path / "calib.txt", n_tokens)
    argv = ["--checkpoint_path", str(ckpt), "--text", str(text), "--seq_len", str(SEQ),
            "--max_tokens", "256", "--device", "cpu", "--quiet", *extra]
    return model, ckpt, text, calibrate.main(argv)


def test_calibrate_cli_writes_validated_file(tmp_path):
    model, ckpt, text, rc = _calibrate_cli(tmp_path, 300)
    assert rc == 0
    out = ckpt.parent / "thresholds.safetensors"
    calib = Calibration.load(out, model.config.to_dict())
    assert calib.meta["tokens"] == 256
    assert calib.meta["n_layer"] == 2
    assert calib.meta["text"]["path"] == str(text)
    assert calib.meta["text"]["sha256"] == teal.calibration.sha256_file(text)
    assert calib.hist.shape[:2] == (2, 4)
    assert calib.extra_tensors["hist_weighted"].shape[:2] == (2, 7)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [
        "model.pth", "thresholds.safetensors", "tokenizer.json"]
    for other in (tiny_args(n_layer=3), tiny_args(dim=64, n_head=4)):
        with pytest.raises(ThresholdsError, match="another model"):
            Calibration.load(out, other.to_dict())
    with pytest.raises(ThresholdsError, match="another model"):
        apply_config(tiny_model(n_layer=3), calib, 0.5)


def test_calibrate_cli_text_too_short(tmp_path, capsys):
    _, ckpt, _, rc = _calibrate_cli(tmp_path, SEQ - 10)
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs at least" in err, err
    assert not (ckpt.parent / "thresholds.safetensors").exists()


def test_calibrate_cli_interrupt_leaves_nothing(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = teal.calibration.block_inputs

    def interrupted(model, idx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(model, idx)
    monkeypatch.setattr(teal.calibration, "block_inputs", interrupted)
    _, ckpt, _, rc = _calibrate_cli(tmp_path, 300)
    assert rc == 130 and calls["n"] == 2
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["model.pth", "tokenizer.json"]


@pytest.mark.parametrize("flag,value", [("--max_tokens", "0"), ("--max_tokens", "-5"),
                                        ("--seq_len", "0")])
def test_calibrate_cli_rejects_nonpositive_counts(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        _calibrate_cli(tmp_path, 300, flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} must be >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt" / "thresholds.safetensors").exists()


def test_calibrate_cli_bad_paths(tmp_path, capsys, monkeypatch):
    import model
    loads = []
    monkeypatch.setattr(model, "load_model",
                        lambda *a, **kw: loads.append(1) or (_ for _ in ()).throw(AssertionError))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for out, needle in ((tmp_path / "missing" / "t.safetensors", "does not exist"),
                        (tmp_path / "afile" / "t.safetensors", "is a file"),
                        (tmp_path / "adir", "is a directory")):
        _, _, _, rc = _calibrate_cli(tmp_path, 300, "--output", str(out))
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and needle in err, err
    assert loads == []  # failed before loading the model
    monkeypatch.undo()
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc" * 10)
    for text, needle in ((tmp_path / "adir", "is a directory"), (tmp_path / "bin.txt", "UTF-8")):
        _, _, _, rc = _calibrate_cli(tmp_path, 300, "--text", str(text))
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and needle in err, err


def test_calibrate_help_and_greedy_hint():
    import subprocess
    import sys
    from pathlib import Path
    from teal.greedy import AllocationError, GreedyAllocation
    root = Path(calibrate.__file__).parent
    out = subprocess.run([sys.executable, str(root / "calibrate.py"), "--help"],
                         capture_output=True, text=True, cwd=root).stdout
    assert "(default: True)" not in out and "(default: False)" not in out
    with pytest.raises(AllocationError, match=r"--checkpoint_path <model\.pth> --greedy-only"):
        GreedyAllocation.load(root / "no-such-greedy.json")


def test_thresholds_file_validated_and_mode(tmp_path, calibrated):
    import os
    _, _, calib = calibrated
    good = tmp_path / "t.safetensors"
    calib.save(good)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (good.stat().st_mode & 0o777) == 0o666 & ~umask
    bad_cases = {
        "empty": Calibration(torch.zeros_like(calib.hist), dict(calib.meta)),
        "negative": Calibration(-calib.hist, dict(calib.meta)),
        "shape": Calibration(calib.hist[:, :, :100].clone(), dict(calib.meta)),
        "nobins": Calibration(calib.hist, {k: v for k, v in calib.meta.items() if k != "bins"}),
    }
    for name, c in bad_cases.items():
        path = tmp_path / f"{name}.safetensors"
        c.save(path)
        with pytest.raises(ThresholdsError, match=r"re-run calibrate\.py") as e:
            Calibration.load(path)
        assert str(path) in str(e.value), name
    with pytest.raises(ValueError, match="empty histogram.*calibrate.py"):
        teal.thresholds.histogram_quantile(torch.zeros(10), 0.5, 1e-7, 1e5)


@pytest.mark.parametrize("scoring", ["magnitude", "weight"])
def test_sequential_calibration_hits_target_in_sparse_model(calibrated, scoring):
    """After calibrate_sequentially, the sparsified model zeroes the target fraction of every
    projection's input on the calibration windows (dense calibration drifts downstream)."""
    from teal.allocation import calibrate_sequentially
    model, ids, calib = calibrated
    s = 0.6
    applied = apply_config(model, calib, s, scoring=scoring)
    ths = calibrate_sequentially(model, calib, ids, applied, scoring, seq_len=SEQ, n_tokens=256)
    assert len(ths) == 2 * 7
    teal.configure(model, sparsify_prefill=True, track=True)
    with torch.no_grad():
        model(ids[:256].view(-1, SEQ))
    eff = effective_sparsity(model, per_layer=True)
    teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
    for key, v in eff.items():
        assert abs(v - s) <= 0.01, (key, v)


def test_greedy_search_size_defaults_follow_the_device():
    import calibrate

    cpu = calibrate.parse_args(["--device", "cpu"])
    assert (cpu.greedy_tokens, cpu.greedy_seq_len, cpu.greedy_positions) == calibrate.GREEDY_CPU
    gpu = calibrate.parse_args(["--device", "cuda"])
    assert (gpu.greedy_tokens, gpu.greedy_seq_len, gpu.greedy_positions) == calibrate.GREEDY_CUDA
    mine = calibrate.parse_args(["--device", "cuda", "--greedy-tokens", "1024"])
    assert mine.greedy_tokens == 1024 and mine.greedy_positions == calibrate.GREEDY_CUDA[2]


def test_greedy_tokens_below_window_is_a_one_line_error(capsys):
    import calibrate

    with pytest.raises(SystemExit):
        calibrate.parse_args(["--greedy-tokens", "256", "--greedy-seq-len", "512"])
    assert "--greedy-tokens (256) must be at least --greedy-seq-len" in capsys.readouterr().err
    short = calibrate.parse_args(["--device", "cuda", "--greedy-tokens", "1024"])
    assert short.greedy_seq_len == 1024  # the default window shrinks to the tokens given


def test_calibrate_cli_window_beyond_context_and_missing_gpu(tmp_path, capsys, monkeypatch):
    _, ckpt, _, rc = _calibrate_cli(tmp_path, 300, "--seq_len", "1000")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "--seq_len 1000 exceeds the model's context length 128" in err, err
    assert not (ckpt.parent / "thresholds.safetensors").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, _, _, rc = _calibrate_cli(tmp_path / "b", 300, "--device", "cuda")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "no CUDA GPU is visible" in err and len(err.splitlines()) == 1, err
