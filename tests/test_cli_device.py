"""Issue 14 item 11: every command line checks --device the way generate.py does (one
`teal.cli.check_device`): no GPU visible, an unknown device type, a GPU index beyond the
count give one `error:` line naming the fix, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CLIS = ["generate.py", "calibrate.py", "perplexity.py", "evaluate_generation.py", "quantize.py",
        "scripts/bench_decode.py"]


def _run(script, *args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("script", CLIS)
def test_cuda_without_a_visible_gpu_is_one_line(script, tmp_path):
    extra = ["--checkpoint_path", str(tmp_path / "missing.pth")] if script != \
        "scripts/bench_decode.py" else ["--models", "tiny-does-not-matter"]
    r = _run(script, "--device", "cuda", *extra)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no CUDA GPU is visible" in last, r.stderr


def test_check_device_messages(monkeypatch):
    from teal.cli import check_device
    check_device("cpu")
    for bad, needle in (("tpu", "unknown --device"), ("meta", "not supported"),
                        ("cuda:x", "unknown --device")):
        with pytest.raises(ValueError, match=needle):
            check_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ValueError, match=r"cuda:2: only 2 CUDA GPU\(s\) visible"):
        check_device("cuda:2")


def test_tp_launcher_checks_the_device(monkeypatch):
    """tp.maybe_init_dist checks --device before it picks a backend (gloo for cpu)."""
    import tp
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        tp.maybe_init_dist(device="cuda")
    assert tp.maybe_init_dist(device="cpu") is None  # not under torchrun: nothing to start
