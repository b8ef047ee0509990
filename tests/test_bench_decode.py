"""scripts/bench_decode.py logic on CPU (a tiny real checkpoint; speed itself is never tested)."""
import json
import sys
from pathlib import Path

import pytest

from model import ModelArgs, Transformer
from teal.checkpoint import save_checkpoint
from tiny_models import noise_calibration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_decode  # noqa: E402

TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
            vocab_size=300, block_size=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    args = ModelArgs(**TINY)
    save_checkpoint(d / "model.pth", args.to_dict(), Transformer(args).state_dict(), {"name": "tiny-bench"})
    noise_calibration(args).save(d / "thresholds.safetensors")
    return d


def _run(*argv):
    bench_decode.main(["--device", "cpu", "--dtype", "float32", "--no-compile", "--runs", "1",
                       "--new_tokens", "4", "--prompt_tokens", "5", *map(str, argv)])


def test_real_checkpoint_rows(tiny, tmp_path):
    out = tmp_path / "d.json"
    _run("--checkpoint", tiny / "model.pth", "--sparsities", 0.5, "--json", out)
    d = json.loads(out.read_text())
    rows = d["rows"]
    assert [r["config"] for r in rows] == ["dense", "50%"]
    assert all(r["model"] == "tiny-bench" and r["tokens_per_s"] > 0 for r in rows)
    eff = rows[1]["effective_sparsity"]
    assert set(eff) >= {"q_proj", "o_proj", "gate_proj", "down_proj"}
    # thresholds from the file applied (calibrated on N(0,1) noise: the normed inputs of
    # q/k/v and gate/up match it, o and down see other distributions)
    assert 0.3 < eff["q_proj"] < 0.7 and all(v > 0.2 for v in eff.values()), eff
    assert d["args"]["checkpoint"].endswith("model.pth") and d["env"]["commit"]


def test_bad_checkpoint_or_thresholds_one_line(tiny, tmp_path):
    with pytest.raises(SystemExit, match="^error: "):
        _run("--checkpoint", tmp_path / "missing.pth", "--sparsities", 0.5)
    noise_calibration(ModelArgs(**dict(TINY, n_layer=3)), n=64).save(tmp_path / "other.safetensors")
    with pytest.raises(SystemExit, match="^error: "):
        _run("--checkpoint", tiny / "model.pth", "--thresholds", tmp_path / "other.safetensors",
             "--sparsities", 0.5)


def test_code_commit_and_environment(tmp_path):
    from teal.provenance import code_commit, environment
    root = Path(__file__).resolve().parents[1]
    assert code_commit(root, "abc1234") == "abc1234"
    assert code_commit(root) not in ("abc1234", "")
    assert code_commit(tmp_path) == "unknown"  # not a git checkout
    env = environment(root, "abc1234")
    assert env["commit"] == "abc1234" and env["torch"]


def test_kernel_table_flag_errors_in_one_line(tiny, tmp_path):
    (tmp_path / "bad.json").write_text("{")
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit, match="^error: cannot read the kernel table"):
            _run("--checkpoint", tiny / "model.pth", "--sparsities", 0.5, "--kernel-table", path)


def test_bench_compare_one_line_errors(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_compare
    gemv = tmp_path / "g.json"
    gemv.write_text(json.dumps({"bench": [{"model": "m", "name": "o", "target_sparsity": 0.5, "us": 2.0}]}))
    slow = tmp_path / "s.json"
    slow.write_text(json.dumps({"bench": [{"model": "m", "name": "o", "target_sparsity": 0.5, "us": 2.1}]}))
    assert bench_compare.main(["--old", str(gemv), "--new", str(gemv)]) == 0
    assert bench_compare.main(["--old", str(gemv), "--new", str(slow)]) == 1  # 5% slower
    assert "SLOWER" in capsys.readouterr().out
    cases = {"missing.json": None, "bad.json": "{", "kind.json": json.dumps({"rows": [{"model": "m"}]}),
             "zero.json": json.dumps({"rows": [{"model": "m", "config": "dense", "tokens_per_s": 0}]}),
             "compare.json": json.dumps({"compare": [], "table": []})}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match="^error: "):
            bench_compare.main(["--old", str(tmp_path / name), "--new", str(gemv)])
