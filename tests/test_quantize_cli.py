"""quantize.py and the loading of quantized checkpoints from a user's side: bad inputs give
one line naming the fix, interrupted runs leave no file, the printed report is true.
Tiny models only."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calibrate
import perplexity
import quantize
import teal.io
from model import load_model
from teal.checkpoint import CheckpointError, save_checkpoint
from tiny_models import tiny_model, write_checkpoint, write_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny dense checkpoint (dim 32, MLP 48: down_proj K = 48 is a short int4 group of 32;
    vocab 97: an odd head) with its tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_model())


def _quantize(src: Path, *argv) -> int:
    return quantize.main(["--checkpoint_path", str(src), "--quiet", "--device", "cpu", *map(str, argv)])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _tampered(path: Path, out: Path, edit) -> Path:
    ck = torch.load(path, weights_only=True)
    edit(ck)
    torch.save(ck, out)
    return out


def test_help_renders(capsys):
    # a "%" in the head note was read as a %-format by argparse: --help crashed
    with pytest.raises(SystemExit) as e:
        quantize.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "+0.15%" in " ".join(out.split()) and "(default: None)" not in out


@pytest.mark.parametrize("device", ["tpu", "cuda:abc", "xla"])
def test_bad_device_is_one_line(src, tmp_path, capsys, device):
    assert _quantize(src, "--device", device, "--output", tmp_path / "q.pth") == 1
    assert "--device" in _one_line(capsys) and not (tmp_path / "q.pth").exists()
    text = write_text(tmp_path / "t.txt", 64)
    assert perplexity.main(["--checkpoint_path", str(src), "--text", str(text), "--device", device]) == 1
    assert "--device" in _one_line(capsys)
    assert calibrate.main(["--checkpoint_path", str(src), "--text", str(text), "--device", device,
                           "--output", str(tmp_path / "th.safetensors")]) == 1
    assert "--device" in _one_line(capsys)


def test_missing_projection_tensor_is_named(src, tmp_path):
    # parts were zipped with the wrong keys once one was absent: "size mismatch for q_proj"
    # (against k_proj's shape) instead of "missing q_proj"
    _quantize(src, "--output", tmp_path / "q8.pth")
    q = _tampered(tmp_path / "q8.pth", tmp_path / "q.pth",
                  lambda ck: ck["state_dict"].pop("layers.0.attention.q_proj.scales"))
    with pytest.raises(CheckpointError, match=r"missing \['layers.0.attention.q_proj.scales'\].*quantize.py"):
        load_model(q)
    d = _tampered(src, tmp_path / "d.pth", lambda ck: ck["state_dict"].pop("layers.0.attention.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing \['layers.0.attention.q_proj.weight'\]"):
        load_model(d)


@pytest.mark.parametrize("mode,key,dtype", [("int8", "qweight", torch.float32),
                                            ("int4", "scales", torch.float32)])
def test_wrong_dtype_codes_or_scales_rejected(src, tmp_path, mode, key, dtype):
    # assign=True kept any dtype: float codes loaded and the GPU kernels would read their bytes
    _quantize(src, "--mode", mode, "--groupsize", 32, "--output", tmp_path / "q.pth")
    k = f"layers.1.feed_forward.down_proj.{key}"

    def edit(ck):
        ck["state_dict"][k] = ck["state_dict"][k].to(dtype)
    bad = _tampered(tmp_path / "q.pth", tmp_path / "bad.pth", edit)
    with pytest.raises(CheckpointError, match=f"dtype mismatch for {k}"):
        load_model(bad)
    load_model(tmp_path / "q.pth")  # the untouched file still loads


@pytest.mark.parametrize("entry", [{"mode": "int8", "head": "no"},
                                   {"mode": "int4", "group_size": 32.5},
                                   {"mode": "int4", "group_size": "32"}])
def test_malformed_entry_types_rejected(src, tmp_path, entry):
    # bool("no") is True and int(32.5) is 32: such entries were silently accepted
    _quantize(src, "--output", tmp_path / "q.pth")
    bad = _tampered(tmp_path / "q.pth", tmp_path / "bad.pth", lambda ck: ck.update(quantization=entry))
    with pytest.raises(CheckpointError, match="bad quantization entry"):
        load_model(bad)


def test_ctrl_c_inside_torch_save(src, tmp_path, monkeypatch, capsys):
    # a KeyboardInterrupt inside torch.save's writes surfaced as torch's zip-writer
    # RuntimeError ("unexpected pos"): a traceback and status 1 instead of "interrupted"
    class Interrupted(io.FileIO):
        writes = 0

        def write(self, b):
            Interrupted.writes += 1
            if Interrupted.writes == 3:
                raise KeyboardInterrupt
            return super().write(b)
    monkeypatch.setattr(teal.io, "open", lambda p, mode="r": Interrupted(p, "wb"), raising=False)
    out = tmp_path / "out"
    out.mkdir()
    assert _quantize(src, "--output", out / "q.pth") == 130
    assert "interrupted" in _one_line(capsys)
    assert os.listdir(out) == []


def test_sigterm_mid_write_leaves_no_temp_file(src, tmp_path):
    # kill (SIGTERM) during the write left the hidden temp file behind
    out = tmp_path / "out"
    out.mkdir()
    code = f"""
import os, signal, sys, torch
import quantize
real = torch.save
def save(obj, f, *a, **k):
    f.write(b"partial")
    f.flush()
    os.kill(os.getpid(), signal.SIGTERM)
    real(obj, f, *a, **k)
torch.save = save
sys.exit(quantize.main(["--checkpoint_path", {str(src)!r}, "--quiet", "--device", "cpu",
                        "--output", {str(out / 'q.pth')!r}]))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}"))
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "interrupted; nothing written"
    assert os.listdir(out) == []


def test_thresholds_line_is_true(src, tmp_path, capsys):
    # the line said "the source's thresholds.safetensors beside it is used" also when the
    # output is in another folder (generate.py --sparsity then fails) or the source has none
    folder = tmp_path / "m"
    path = write_checkpoint(folder, tiny_model())
    assert _quantize(path) == 0
    assert "the source has no thresholds.safetensors" in capsys.readouterr().out
    (folder / "thresholds.safetensors").write_bytes(b"x")
    assert _quantize(path, "--output", folder / "q.pth") == 0
    assert "source's thresholds.safetensors beside it is used" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    assert _quantize(path, "--output", other / "q.pth") == 0
    out = capsys.readouterr().out
    assert f"pass --thresholds {folder / 'thresholds.safetensors'}" in out
    assert (other / "tokenizer.json").is_file()


def test_int4_head_of_odd_vocab_names_no_quantize_head(src, tmp_path, capsys):
    assert _quantize(src, "--mode", "int4", "--groupsize", 32, "--quantize_head",
                     "--output", tmp_path / "q.pth") == 1
    assert "--no-quantize_head" in _one_line(capsys)
    assert os.listdir(tmp_path) == []


def test_report_counts_are_true(tmp_path, capsys):
    # dim 64 (q/k/v, o, gate/up: K = 64), MLP 80 (down: K = 80): every K is short of 128,
    # only down's of 64; 7 projections x 2 layers; int4 keeps the head, int8 quantizes it
    path = write_checkpoint(tmp_path, tiny_model(dim=64, intermediate_size=80))
    assert _quantize(path, "--mode", "int4", "--groupsize", 128) == 0
    assert _quantize(path, "--mode", "int4", "--groupsize", 64) == 0
    assert _quantize(path, "--mode", "int8") == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("quantized")]
    assert lines == [
        "quantized 14 projections of 2 layers to int4-g128, 14 with K not a multiple of 128 "
        "(last group short); the output head kept in float32",
        "quantized 14 projections of 2 layers to int4-g64, 2 with K not a multiple of 64 "
        "(last group short); the output head kept in float32",
        "quantized 14 projections of 2 layers to int8; the output head too"]
    for name in ("model_int4-g128.pth", "model_int4-g64.pth", "model_int8.pth"):
        model, meta = load_model(tmp_path / name)
        assert meta["quantization"]["source"] == str(path)
