"""Default calibration / greedy files of quantized checkpoints (teal.checkpoint)."""
from __future__ import annotations

import torch

from teal.checkpoint import default_thresholds, greedy_beside, save_checkpoint
from teal.quant import QuantSpec


def _ckpt(path, spec=None):
    save_checkpoint(path, {"vocab_size": 8}, {"w": torch.zeros(1)}, {},
                    quantization=None if spec is None else spec.to_dict())
    return path


def test_default_thresholds_prefers_the_quantized_calibration(tmp_path):
    dense = _ckpt(tmp_path / "model.pth")
    q = _ckpt(tmp_path / "model_int4-g64.pth", QuantSpec("int4", 64))
    plain = tmp_path / "thresholds.safetensors"
    tagged = tmp_path / "thresholds.int4-g64.safetensors"
    assert default_thresholds(dense) == plain
    assert default_thresholds(dense, for_writing=True) == plain
    assert default_thresholds(q) == plain                    # falls back: no own file yet
    assert default_thresholds(q, for_writing=True) == tagged  # calibrate.py writes its own
    tagged.write_bytes(b"x")
    assert default_thresholds(q) == tagged
    assert default_thresholds(tmp_path / "missing.pth") == plain  # the loader reports it


def test_greedy_beside(tmp_path):
    assert greedy_beside(tmp_path / "thresholds.safetensors") == tmp_path / "greedy.json"
    assert greedy_beside(tmp_path / "mine.safetensors") == tmp_path / "greedy.json"
    t = tmp_path / "thresholds.int8.safetensors"
    assert greedy_beside(t) == tmp_path / "greedy.json"
    assert greedy_beside(t, for_writing=True) == tmp_path / "greedy.int8.json"
    (tmp_path / "greedy.int8.json").write_text("{}")
    assert greedy_beside(t) == tmp_path / "greedy.int8.json"
