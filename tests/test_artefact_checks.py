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
