"""scripts/bench_decode.py logic on CPU (a tiny real checkpoint; speed itself is never tested)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from model import ModelArgs, Transformer
from teal.checkpoint import save_checkpoint
from fixtures_smollm2 import smollm2  # noqa: F401  (session fixture: real tokenizer.json)
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


def test_quant_formats_rows(tiny, tmp_path, capsys):
    """--quant: per format its torch baseline then ours at every sparsity, in one process."""
    out = tmp_path / "q.json"
    _run("--checkpoint", tiny / "model.pth", "--sparsities", 0.5, "--quant", "bf16", "int8", "int4",
         "--groupsize", 32, "--quant_head", "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["dense", "50%", "torch int8", "int8 50%", "torch int4",
                                          "int4 50%"]
    assert [r["format"] for r in rows] == ["bf16", "bf16", "int8", "int8", "int4", "int4"]
    assert [r["wformat"] for r in rows] == ["dense", "dense", "int8", "int8", "int4-g32", "int4-g32"]
    assert [r["baseline"] for r in rows] == [True, False] * 3
    assert all(r["tokens_per_s"] > 0 for r in rows)
    by = {r["config"]: r for r in rows}
    for fmt in ("int8", "int4"):
        eff = by[f"{fmt} 50%"]["effective_sparsity"]
        assert set(eff) >= {"q_proj", "down_proj"} and 0.3 < eff["q_proj"] < 0.7, eff
        assert by[f"torch {fmt}"]["effective_sparsity"] == {}
    # bytes read per token: quantized codes (and the head with --quant_head) shrink them
    gb = {k: r["gb_per_token"] for k, r in by.items()}
    assert gb["torch int4"] < gb["torch int8"] < gb["dense"]
    if torch.cuda.is_available():  # the row-skipping kernels read only the kept rows
        assert gb["int8 50%"] < gb["torch int8"] and gb["int4 50%"] < gb["torch int4"]
    else:  # the torch path (CPU) reads every row at any sparsity: no fewer bytes than the
        # baseline's codes (int8: the same codes and scales; int4: tinygemm's scales are larger)
        assert gb["int8 50%"] == gb["torch int8"] and gb["int4 50%"] <= gb["torch int4"]
    table = capsys.readouterr().out
    assert "x torch" in table and "int4-g32" in table and "torch int8" in table


def test_quant_without_bf16_and_errors(tiny, tmp_path):
    out = tmp_path / "q.json"
    _run("--checkpoint", tiny / "model.pth", "--sparsities", 0.0, "--quant", "int8", "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["torch int8", "int8 0%"]
    with pytest.raises(SystemExit):  # argparse: not a format
        _run("--checkpoint", tiny / "model.pth", "--quant", "int3")


def _quantized_module(mode, gated, dtype, group=32):
    import teal
    from teal.quant import QuantSpec
    from teal.sparse_linear import QuantizedSparseLinear
    torch.manual_seed(0)
    sizes, names = ((96, 96), ("gate_proj", "up_proj")) if gated else ((64, 32, 32), ("q", "k", "v"))
    m = teal.SparseLinear(64, sizes, names=names, gated=gated, dtype=dtype)
    return QuantizedSparseLinear.from_module(m, QuantSpec(mode, group if mode == "int4" else 0))


def _dequantized_ref(q, x):
    y = torch.nn.functional.linear(x.double(), q.weight.double())  # the dequantized weight
    if q.gated:
        g, u = y.split(q.sizes, dim=-1)
        return torch.nn.functional.silu(g) * u
    return y


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_int8_baseline_matches_dequantized_weight(gated, dtype):
    q = _quantized_module("int8", gated, dtype)
    base = bench_decode.TorchInt8Linear(q)
    x = torch.randn(1, 3, 64).to(dtype)
    y, ref = base(x), _dequantized_ref(q, x)
    assert y.dtype == dtype and y.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    assert base.stored_bytes() == q.qweight.numel() + q.scales.numel() * x.element_size()


def _int4_cpu_ops() -> bool:
    try:
        torch.ops.aten._convert_weight_to_int4pack_for_cpu
        torch.ops.aten._weight_int4pack_mm_for_cpu
    except (AttributeError, RuntimeError):
        return False
    return True


@pytest.mark.skipif(not _int4_cpu_ops(), reason="this torch build has no CPU int4 tinygemm ops "
                    "(aten._weight_int4pack_mm_for_cpu); the int4 baseline is checked on CUDA only")
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_torch_int4_baseline_matches_dequantized_weight(gated, group):
    q = _quantized_module("int4", gated, torch.float32, group)
    base = bench_decode.TorchInt4Linear(q)
    x = torch.randn(1, 2, 64)
    y, ref = base(x), _dequantized_ref(q, x)
    assert y.shape == ref.shape
    # tinygemm's zero point z = b + 8 s is rounded to the activation dtype (fp32 here)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-4
    # bf16 activations: the same codes, looser (bf16 products and zero points)
    qb = _quantized_module("int4", gated, torch.bfloat16, group)
    xb = x.bfloat16()
    yb, refb = bench_decode.TorchInt4Linear(qb)(xb), _dequantized_ref(qb, xb)
    assert ((yb.double() - refb).norm() / refb.norm()).item() < 3e-2


def test_torch_baseline_model_replaces_every_quantized_module(tiny):
    from model import load_model
    from teal.quant import QuantSpec
    from teal.sparse_linear import QuantizedSparseLinear, quantize_model
    model, _ = load_model(tiny / "model.pth")
    quantize_model(model, QuantSpec("int8", 0, head=True))
    base = bench_decode.torch_baseline(model, "int8")
    assert not any(isinstance(m, QuantizedSparseLinear) for m in base.modules())
    assert isinstance(base.output, bench_decode.TorchInt8Linear)
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        a, b = model(ids), base(ids)
    assert ((a - b).norm() / a.norm()).item() < 1e-4  # fp32: same codes, same math


def test_profile_kernel_groups():
    """Kernel names as torch.profiler reported them for a compiled decode step on the H200."""
    g = bench_decode._kernel_group
    assert g("dot_gemv_kernel") == g("masked_gemv_kernel") == g("list_gemv_kernel") == "TEAL sparse GEMV"
    assert g("keep_list_kernel") == "TEAL sparse GEMV"
    assert g("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_sparse_gemv_t_view_11").startswith("other")
    assert g("triton_red_fused__to_copy_add_mean_mm_mul_pow_rsqrt_t_view_16") == "inductor GEMV (torch int8 path)"
    assert g("triton_poi_fused__to_copy__unsafe_view_add_index_mm_mul_select_split").startswith("other")
    assert g("void at::native::tinygemm_m16n8k16_chunk_kernel<at::native::ALayout_RM<") == "torch int4 tinygemm"
    assert g("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_NNT") == "cuBLAS GEMV/GEMM"
    assert g("decode_attention_kernel") == "decode attention kernel"


def test_real_text_prompt(smollm2, tmp_path, monkeypatch):
    """--prompt: the checkpoint's tokenizer encodes the (chat-wrapped) text, and that is the
    prompt every configuration decodes from; bad uses are one-line errors."""
    import shutil
    from teal.tokenizer import load_tokenizer
    args = ModelArgs(**dict(TINY, vocab_size=49152))
    meta = {"name": "tiny-text", "tokenizer": {"file": "tokenizer.json", "eos_id": 2,
                                               "eos_ids": [2], "chat_template": "chatml"}}
    save_checkpoint(tmp_path / "model.pth", args.to_dict(), Transformer(args).state_dict(), meta)
    shutil.copy(smollm2.folder / "tokenizer.json", tmp_path / "tokenizer.json")
    noise_calibration(args).save(tmp_path / "thresholds.safetensors")
    seen = []

    def fake_time(m, fn, prompt, n, runs):
        seen.append(prompt.tolist())
        return [1.0]
    monkeypatch.setattr(bench_decode, "time_decode", fake_time)
    _run("--checkpoint", tmp_path / "model.pth", "--sparsities", 0.5, "--prompt", "The sea is")
    tok = load_tokenizer(tmp_path, meta)
    want = tok.encode(tok.apply_chat_template("The sea is"), special=True)
    assert seen == [want, want] and len(want) > 5
    with pytest.raises(SystemExit, match="--prompt needs --checkpoint"):
        _run("--models", "Llama-2-7b", "--prompt", "x")
    with pytest.raises(SystemExit, match="^error: --prompt is empty"):
        _run("--checkpoint", tmp_path / "model.pth", "--sparsities", 0.5, "--prompt", " ")
    with pytest.raises(SystemExit, match="^error: --prompt .* exceed the context length 64"):
        _run("--checkpoint", tmp_path / "model.pth", "--sparsities", 0.5, "--prompt", "word " * 80)
