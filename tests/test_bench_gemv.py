"""scripts/bench_gemv.py logic on CPU: weight formats, their torch baselines, the --compare
candidates (speed itself is measured on a GPU only)."""
import sys
from pathlib import Path

import pytest
import torch

from teal.kernels import KernelPolicy, kernels_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_gemv  # noqa: E402


def _int4_cpu_ops() -> bool:
    try:
        torch.ops.aten._convert_weight_to_int4pack_for_cpu
        torch.ops.aten._weight_int4pack_mm_for_cpu
    except (AttributeError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("wformat", ["dense", "int8", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("kind,arg", [("seg", (64, 32, 32)), ("gated", 48)])
def test_bench_formats_baselines_and_bytes(wformat, kind, arg):
    if wformat.startswith("int4") and not _int4_cpu_ops():
        pytest.skip("this torch build has no CPU int4 tinygemm ops (aten._weight_int4pack_mm_for_cpu)")
    torch.manual_seed(0)
    K = 128
    b = bench_gemv.Bench(kind, K, arg, torch.bfloat16, 1 << 12, "cpu", wformat, eager_baselines=True)
    N = b.N
    assert len(b.wt) >= 2 and b.wformat == wformat
    assert b.check_baseline() == ""
    assert b.baseline_call(1).shape == (1, N)
    row = {"dense": 2 * N, "int8": N, "int4-g32": N // 2, "int4-g64": N // 2}[wformat]
    scales = {"dense": 0, "int8": 4 * N, "int4-g32": (K // 32) * 2 * N * 2,
              "int4-g64": (K // 64) * 2 * N * 2}[wformat]
    out = arg if kind == "gated" else N
    assert b.active_bytes(10) == 10 * row + scales + 2 * K + 2 * out
    assert b.full_bytes() == K * row + scales + 2 * (K + N)
    if kernels_available("cpu"):  # the Triton interpreter: the kernel against the float64 reference
        policy = KernelPolicy(interpreter=True)
        t, kept = b.thresholds(0.5)
        assert 0 < kept < K
        assert b.check(t, 0.5, policy) == ""


def test_compare_candidates_fitted_and_unique():
    for name, kind, K, arg in [("qkv", "seg", 4096, (4096, 1024, 1024)), ("gate_up", "gated", 4096, 14336),
                               ("down", "seg", 14336, (4096,))]:
        dense = bench_gemv.candidates(name, kind, K, arg, "dense")
        assert dense == [c for c in bench_gemv.CANDIDATES[name] if c.algo != "words"]
        for wf in ("int8", "int4-g32", "int4-g128"):
            c = bench_gemv.candidates(name, kind, K, arg, wf)
            assert len(set(c)) == len(c) and c
            if wf.startswith("int4"):
                group = int(wf[6:])
                assert all(cfg.algo != "list" and cfg.block_k <= group for cfg in c)
                assert len(c) < len(bench_gemv.CANDIDATES[name])  # the lists collapsed
            assert sum(cfg.algo == "words" for cfg in c) >= 4  # the words candidates kept


def test_cli_errors_in_one_line():
    with pytest.raises(SystemExit):  # argparse: int4's tinygemm baseline is bf16 only
        bench_gemv.main(["--wformat", "int4-g128", "--dtype", "float16"])
    with pytest.raises(SystemExit):
        bench_gemv.main(["--wformat", "int5"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench_gemv.main(["--wformat", "int8"])


@pytest.mark.skipif(not kernels_available("cpu"), reason="needs the Triton interpreter")
@pytest.mark.parametrize("kind,arg", [("seg", (64, 32, 32)), ("gated", 48)])
def test_check_covers_every_row(kind, arg, monkeypatch):
    """--rows: Bench.check compares each of M input rows with its own float64 reference, so
    a wrong row other than the first is caught."""
    torch.manual_seed(0)
    b = bench_gemv.Bench(kind, 128, arg, torch.bfloat16, 1 << 12, "cpu")
    b.x = torch.randn(3, 128).to(torch.bfloat16)
    policy = KernelPolicy(interpreter=True)
    t = torch.full((3 if kind == "seg" else 2,), 0.6)
    assert b.check(t, 0.5, policy) == ""
    call = b.call

    def wrong_last_row(*a, **kw):
        y = call(*a, **kw).clone()
        y[2] = -y[2]
        return y
    monkeypatch.setattr(b, "call", wrong_last_row)
    assert b.check(t, 0.5, policy).startswith("row 2: rel err")
