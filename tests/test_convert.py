"""Converters: GGUF -> ours, HF -> ours, GGUF -> HF export; checkpoint errors; download/prepare.

References are independent of the code under test where it matters: Q4_1/Q8_0 blocks are
decoded here from the GGUF bytes, RoPE rotate-half is written here, and tiny Hugging Face
models are built and run by `transformers` itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_smollm2 import bytes_to_unicode, smollm2, smollm2_hf  # noqa: F401 (fixtures)
from model import ModelArgs, Transformer, load_model
from teal.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_dict_shapes
from teal.convert import (GGUFError, HFConversionError, convert_gguf, convert_hf, export_hf,
                          hf_to_interleaved, interleaved_to_hf)
from teal.rope import apply_rotary_emb, precompute_freqs_cis
from teal.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = False, seed: int = 0) -> dict:
    """A tiny llama GGUF (2 blocks, dim 16, 4 heads / 2 KV heads) with a byte-level vocab.

    Returns the GGUF-named float32 arrays written (q/k as stored, i.e. interleaved order).
    """
    import gguf
    rng = np.random.default_rng(seed)
    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [b2u[b] for b in range(256)] \
        + ["Ġt", "he", "Ġthe"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    merges = ["Ġ t", "h e", "Ġt he"]
    V, D, F, L, H, KV = len(tokens), 16, 24, 2, 4, 2
    hd = D // H
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}")

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.3

    arrays = {"token_embd.weight": rand(V, D), "output_norm.weight": 1 + rand(D)}
    if not tied:
        arrays["output.weight"] = rand(V, D)
    for i in range(L):
        p = f"blk.{i}."
        arrays.update({p + "attn_norm.weight": 1 + rand(D), p + "ffn_norm.weight": 1 + rand(D),
                       p + "attn_q.weight": rand(H * hd, D), p + "attn_k.weight": rand(KV * hd, D),
                       p + "attn_v.weight": rand(KV * hd, D), p + "attn_output.weight": rand(D, D),
                       p + "ffn_gate.weight": rand(F, D), p + "ffn_up.weight": rand(F, D),
                       p + "ffn_down.weight": rand(D, F)})
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


def run_cli(script: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run scripts/<script> on this checkout's code: a script's sys.path[0] is scripts/, so
    without ROOT on PYTHONPATH `import teal` would find whatever copy is installed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for n in needles:
        assert n in last, last


def rotate_half_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Hugging Face's RoPE (rotate-half pairs (i, i + d/2)) for x (T, H, d), written from its
    definition."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions[:, None].double() * inv[None]          # (T, d/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].float()
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


# ----------------------------------------------------------------------------- SmolLM2 (real)

def test_smollm2_config(smollm2):
    cfg = load_checkpoint(smollm2.checkpoint)["config"]
    assert cfg == ModelArgs.from_name("SmolLM2-135M-Instruct").to_dict()
    assert (cfg["n_layer"], cfg["dim"], cfg["n_head"], cfg["n_local_heads"], cfg["head_dim"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (30, 576, 9, 3, 64, 1536, 49152)
    assert cfg["rope_base"] == 100000.0 and cfg["norm_eps"] == 1e-5 and cfg["tie_embeddings"]


def test_smollm2_state_dict(smollm2):
    ckpt = load_checkpoint(smollm2.checkpoint)
    sd = ckpt["state_dict"]
    with torch.device("meta"):
        want = Transformer(ModelArgs.from_dict(ckpt["config"])).state_dict()
    assert set(sd) == set(want)
    for k, v in want.items():
        assert sd[k].shape == v.shape and sd[k].dtype == torch.float32, k
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])  # tied
    assert ckpt["meta"]["tokenizer"] == {"file": "tokenizer.json", "backend": "hf", "bos_id": 1,
                                         "eos_id": 2, "eos_ids": [2], "add_bos": False,
                                         "chat_template": "chatml"}


def _raw_tensors(gguf_path: Path, *names: str):
    import gguf
    r = gguf.GGUFReader(gguf_path)
    by_name = {t.name: t for t in r.tensors}
    return [(by_name[n].tensor_type.name, np.asarray(by_name[n].data)) for n in names]


def test_dequantization_matches_block_formats(smollm2):
    """Decode Q4_1 (q_proj, stored permuted as-is) and Q8_0 (embedding) blocks by hand."""
    sd = load_checkpoint(smollm2.checkpoint)["state_dict"]
    (qtype, raw), (etype, eraw) = _raw_tensors(smollm2.gguf, "blk.0.attn_q.weight",
                                               "token_embd.weight")
    assert qtype == "Q4_1"
    blocks = raw.reshape(raw.shape[0], -1, 20)          # (rows, blocks, 2+2+16 bytes)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # (rows, blocks, 32)
    want = (d * q + m).reshape(raw.shape[0], -1)
    torch.testing.assert_close(sd["layers.0.attention.q_proj.weight"], torch.from_numpy(want),
                               rtol=0, atol=1e-6)

    assert etype == "Q8_0"
    blocks = eraw[:2048].reshape(2048, -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    want = (d * q).reshape(2048, -1)
    torch.testing.assert_close(sd["tok_embeddings.weight"][:2048], torch.from_numpy(want),
                               rtol=0, atol=1e-6)


def test_hf_roundtrip_gives_same_state_dict(smollm2, smollm2_hf, tmp_path):
    """GGUF -> HF export -> convert_hf equals GGUF -> ours: every key, bit for bit."""
    out = convert_hf(smollm2_hf, tmp_path / "from_hf", progress=False)
    a = load_checkpoint(smollm2.checkpoint)
    b = load_checkpoint(out)
    assert a["config"] == b["config"]
    assert set(a["state_dict"]) == set(b["state_dict"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["meta"]["tokenizer"] == b["meta"]["tokenizer"]
    assert (tmp_path / "from_hf" / "tokenizer.json").read_bytes() == \
        (smollm2.folder / "tokenizer.json").read_bytes()


def test_hf_export_config(smollm2_hf):
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] == 3 and cfg["rope_theta"] == 100000.0
    assert "chatml" in "".join(["chatml" if "<|im_start|>" in json.loads(
        (smollm2_hf / "tokenizer_config.json").read_text())["chat_template"] else ""])


# ----------------------------------------------------------------------------- state-dict format

_SMALL_CONFIGS = [
    dict(n_layer=2, n_head=4, n_local_heads=2, dim=16, intermediate_size=24),  # GQA
    dict(n_layer=1, n_head=2, n_local_heads=2, dim=16, intermediate_size=40,
         tie_embeddings=True),
    dict(n_layer=3, n_head=3, n_local_heads=1, dim=12, head_dim=8, intermediate_size=20),
]


@pytest.mark.parametrize("small", _SMALL_CONFIGS)
def test_state_dict_shapes_match_the_model(small):
    cfg = ModelArgs(block_size=32, vocab_size=50, **small).to_dict()
    with torch.device("meta"):
        model = Transformer(ModelArgs(**cfg))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state_dict_shapes(cfg) == want
    assert "output.weight" in want and len(want) == 3 + 9 * cfg["n_layer"]


def test_state_dict_shapes_rejects_invalid_configs():
    cfg = ModelArgs(block_size=32, vocab_size=50, n_layer=1, n_head=4, n_local_heads=2,
                    dim=16, intermediate_size=24).to_dict()
    with pytest.raises(ValueError, match="not a multiple of n_local_heads=3"):
        state_dict_shapes(dict(cfg, n_local_heads=3))
    with pytest.raises(ValueError, match="dim=0 is not a positive integer"):
        state_dict_shapes(dict(cfg, dim=0))
    with pytest.raises(ValueError, match="lacks 'head_dim'"):
        state_dict_shapes({k: v for k, v in cfg.items() if k != "head_dim"})


def test_check_state_dict_messages():
    from teal.convert import check_state_dict
    cfg = ModelArgs(block_size=32, vocab_size=50, n_layer=1, n_head=4, n_local_heads=2,
                    dim=16, intermediate_size=24).to_dict()
    sd = {k: torch.zeros(shape) for k, shape in state_dict_shapes(cfg).items()}
    check_state_dict(sd, cfg, "GGUF", GGUFError)
    with pytest.raises(GGUFError, match=r"GGUF lacks tensors for \['norm.weight'\]"):
        check_state_dict({k: v for k, v in sd.items() if k != "norm.weight"}, cfg, "GGUF",
                         GGUFError)
    bad = dict(sd, **{"layers.0.attention.k_proj.weight": torch.zeros(16, 16)})
    with pytest.raises(HFConversionError, match=r"k_proj.weight has shape \(16, 16\), "
                                                r"expected \(8, 16\)"):
        check_state_dict(bad, cfg, "checkpoint", HFConversionError)
    with pytest.raises(GGUFError, match="the GGUF config is invalid .*n_local_heads=3"):
        check_state_dict(sd, dict(cfg, n_local_heads=3), "GGUF", GGUFError)
    with pytest.raises(GGUFError, match=r"unexpected tensors \['extra.weight'\]"):
        check_state_dict(dict(sd, **{"extra.weight": torch.zeros(1)}), cfg, "GGUF", GGUFError)


# ----------------------------------------------------------------------------- RoPE permutation

def test_permutation_is_a_per_head_inverse_pair():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(hf_to_interleaved(interleaved_to_hf(w, 3), 3), w)
    assert not torch.equal(interleaved_to_hf(w, 3), w)
    # head 0 of the HF layout holds the even rows of head 0 first, then its odd rows
    assert torch.equal(interleaved_to_hf(w, 3)[:4], w[0:8:2])


def test_permutation_makes_rope_conventions_agree():
    """Scores q.k with HF weights + rotate-half RoPE equal ours with interleaved RoPE."""
    torch.manual_seed(0)
    T, D, H, KV, hd, base = 7, 32, 4, 2, 16, 500.0
    x = torch.randn(T, D)
    wq_hf, wk_hf = torch.randn(H * hd, D), torch.randn(KV * hd, D)
    pos = torch.arange(T)
    q_hf = rotate_half_rope((x @ wq_hf.T).view(T, H, hd), pos, base)
    k_hf = rotate_half_rope((x @ wk_hf.T).view(T, KV, hd), pos, base)
    fc = precompute_freqs_cis(T, hd, base)
    q = apply_rotary_emb((x @ hf_to_interleaved(wq_hf, H).T).view(1, T, H, hd), fc)[0]
    k = apply_rotary_emb((x @ hf_to_interleaved(wk_hf, KV).T).view(1, T, KV, hd), fc)[0]
    k_hf, k = k_hf.repeat_interleave(H // KV, 1), k.repeat_interleave(H // KV, 1)
    s_hf = torch.einsum("thd,shd->hts", q_hf, k_hf)
    s = torch.einsum("thd,shd->hts", q, k)
    torch.testing.assert_close(s, s_hf, rtol=1e-4, atol=1e-4)
    s_wrong = torch.einsum("thd,shd->hts", apply_rotary_emb((x @ wq_hf.T).view(1, T, H, hd),
                                                            fc)[0], k)
    assert not torch.allclose(s_wrong, s_hf, atol=1e-2)


# ----------------------------------------------------------------------------- tiny GGUF

def test_tiny_gguf_untied(tmp_path):
    arrays = write_tiny_gguf(tmp_path / "tiny.Q8_0.gguf")
    path = convert_gguf(tmp_path / "tiny.Q8_0.gguf", tmp_path / "out", progress=False)
    ckpt = load_checkpoint(path)
    assert ckpt["meta"]["name"] == "tiny"
    cfg, sd = ckpt["config"], ckpt["state_dict"]
    assert cfg["tie_embeddings"] is False and cfg["n_local_heads"] == 2 and cfg["head_dim"] == 4
    assert torch.equal(sd["output.weight"], torch.from_numpy(arrays["output.weight"]))
    assert torch.equal(sd["layers.1.attention.k_proj.weight"],
                       torch.from_numpy(arrays["blk.1.attn_k.weight"]))  # kept as stored
    assert torch.equal(sd["layers.0.feed_forward.down_proj.weight"],
                       torch.from_numpy(arrays["blk.0.ffn_down.weight"]))
    tok = load_tokenizer(path.parent, ckpt["meta"])
    assert tok.encode("<|im_start|>the", special=True) == [1, 3 + ord("t"), 260]  # "h e" merged
    assert tok.encode(" the", special=False) == [261]                      # "Ġt" + "he"
    assert tok.decode(tok.encode("héllo 42\n", special=False)) == "héllo 42\n"


def test_tiny_gguf_matches_transformers_untied(tmp_path):
    """Untied head + GQA at tiny scale: our model on the GGUF == transformers on the export."""
    from transformers import LlamaForCausalLM
    write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    ours, _ = load_model(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "ours", progress=False))
    hf = LlamaForCausalLM.from_pretrained(str(export_hf(tmp_path / "tiny.gguf", tmp_path / "hf",
                                                        progress=False)),
                                          dtype=torch.float32).eval()
    ids = torch.randint(0, 262, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_gguf_cli_dtype(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", tied=True)
    r = run_cli("convert_gguf_checkpoint.py", tmp_path / "m.gguf", "--out-dir", tmp_path / "o",
                "--dtype", "bfloat16", "--name", "my-model", "--no-progress")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(tmp_path / "o" / "model.pth")
    assert ckpt["meta"]["name"] == "my-model" and ckpt["config"]["tie_embeddings"]
    assert {t.dtype for t in ckpt["state_dict"].values()} == {torch.bfloat16}


def test_interrupted_gguf_conversion_leaves_no_output(tmp_path, monkeypatch):
    import teal.checkpoint as tc
    write_tiny_gguf(tmp_path / "m.gguf")
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        real_save({"format": "partial"}, f)  # something is on disk when the "crash" comes
        raise KeyboardInterrupt

    monkeypatch.setattr(tc.torch, "save", dying_save)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "m.gguf", out, progress=False)
    assert not out.exists() or list(out.iterdir()) == []


# ----------------------------------------------------------------------------- bad input

def test_unsupported_gguf_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out", progress=False)
    r = run_cli("convert_gguf_checkpoint.py", tmp_path / "gpt2.gguf", "--out-dir", tmp_path / "o")
    assert_one_line_error(r, "gpt2", "not supported")
    assert not (tmp_path / "o").exists()


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not a gguf file" * 10)
    assert_one_line_error(run_cli("convert_gguf_checkpoint.py", tmp_path / "x.gguf"),
                          "not a readable GGUF")
    assert_one_line_error(run_cli("convert_gguf_checkpoint.py", tmp_path / "missing.gguf"),
                          "not found")


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    m = Transformer(ModelArgs(block_size=32, vocab_size=50, n_layer=1, n_head=2, dim=16,
                              intermediate_size=32))
    save_checkpoint(path, m.config.to_dict(), m.state_dict(), {"name": "t"})
    return path


def test_truncated_checkpoint(tmp_path):
    path = _tiny_checkpoint(tmp_path / "model.pth")
    load_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_missing_default_checkpoint_says_run_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"scripts/prepare\.py"):
        load_checkpoint("checkpoints/SmolLM2-135M-Instruct/model.pth")


# ----------------------------------------------------------------------------- HF folders

def _tiny_hf_model(folder: Path, tokenizer_src: Path, rope_scaling=None, tie=False, seed=0,
                   **save_kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                      rope_scaling=rope_scaling, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder), **save_kw)
    (folder / "tokenizer.json").write_bytes(tokenizer_src.read_bytes())
    return model


@pytest.mark.parametrize("variant", ["llama31_sharded", "tied"])
def test_hf_conversion_matches_transformers(tmp_path, smollm2, variant):
    """Tiny random Llama folders saved by transformers: Llama-3.1 rope scaling with sharded
    safetensors, and tied embeddings; our logits equal transformers'."""
    rope = None
    save_kw = {}
    want_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64)
    if variant == "llama31_sharded":
        rope = dict(want_scaling, rope_type="llama3")  # (transformers edits the dict it gets)
        save_kw = dict(max_shard_size="20KB")
    # the folder name says Llama-2-7b: the architecture must come from config.json anyway
    folder = tmp_path / "Llama-2-7b"
    hf = _tiny_hf_model(folder, smollm2.folder / "tokenizer.json", rope_scaling=rope,
                        tie=variant == "tied", **save_kw)
    if variant == "llama31_sharded":
        assert (folder / "model.safetensors.index.json").is_file()
    path = convert_hf(folder, tmp_path / "out", progress=False)
    ckpt = load_checkpoint(path)
    assert ckpt["meta"]["name"] == "Llama-2-7b"
    assert ckpt["config"]["dim"] == 32 and ckpt["config"]["n_local_heads"] == 2
    assert ckpt["config"]["tie_embeddings"] == (variant == "tied")
    if rope:
        assert ckpt["config"]["rope_scaling"] == want_scaling
    model, _ = load_model(path)
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_hf_bin_fallback_and_dtype(tmp_path, smollm2):
    folder = tmp_path / "hfbin"
    hf = _tiny_hf_model(folder, smollm2.folder / "tokenizer.json")
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    path = convert_hf(folder, tmp_path / "out", dtype=torch.bfloat16, progress=False)
    sd = load_checkpoint(path)["state_dict"]
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    torch.testing.assert_close(sd["layers.1.feed_forward.up_proj.weight"],
                               hf.model.layers[1].mlp.up_proj.weight.bfloat16())


def test_hf_bad_inputs(tmp_path, smollm2):
    folder = tmp_path / "bad"
    _tiny_hf_model(folder, smollm2.folder / "tokenizer.json")
    st = folder / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(HFConversionError, match="corrupt or truncated"):
        convert_hf(folder, tmp_path / "o1", progress=False)
    assert_one_line_error(run_cli("convert_hf_checkpoint.py", folder, "--out-dir", tmp_path / "o1"),
                          "corrupt or truncated")
    assert not (tmp_path / "o1" / "model.pth").exists()
    assert not (tmp_path / "o1" / "tokenizer.json").exists()

    st.unlink()
    assert_one_line_error(run_cli("convert_hf_checkpoint.py", folder), "no model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    assert_one_line_error(run_cli("convert_hf_checkpoint.py", folder), "model_type 'gpt2'")
    (folder / "config.json").unlink()
    assert_one_line_error(run_cli("convert_hf_checkpoint.py", folder), "has no config.json; pass a Hugging Face model folder")


# ----------------------------------------------------------------------------- download, prepare

def test_download_errors_are_explained(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, errors
    from scripts.download import DownloadError, download

    class ConnectError(Exception):  # the HTTP client's class; its name is what is checked
        pass

    def unreachable(*a, **kw):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "list_repo_files", unreachable)
    with pytest.raises(DownloadError, match="cannot reach the Hugging Face Hub"):
        download("meta-llama/Meta-Llama-3-8B", tmp_path)

    def gated(*a, **kw):
        # built without __init__: its signature needs the HTTP client's response object
        e = errors.GatedRepoError.__new__(errors.GatedRepoError)
        Exception.__init__(e, "403 Client Error: gated repo")
        raise e

    monkeypatch.setattr(HfApi, "list_repo_files", gated)
    with pytest.raises(DownloadError, match="HF_TOKEN.*huggingface-cli login"):
        download("meta-llama/Meta-Llama-3-8B", tmp_path)
    assert not (tmp_path / "meta-llama").exists()


def test_prepare_is_idempotent_and_explains_missing_text(smollm2, tmp_path):
    from scripts import prepare
    mtime = smollm2.checkpoint.stat().st_mtime_ns
    assert prepare.ensure_checkpoint(progress=False) == smollm2.checkpoint
    assert prepare.ensure_gguf() == smollm2.gguf
    assert smollm2.checkpoint.stat().st_mtime_ns == mtime
    with pytest.raises(prepare.PrepareError, match="--calib-text"):
        prepare.find_calib_text(tmp_path / "nope.txt")
    assert_one_line_error(run_cli("prepare.py", "--calib-text", tmp_path / "nope.txt"),
                          "--calib-text")


# ----------------------------------------------------------------------------- more bad input

def test_gguf_bad_out_dir(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        r = run_cli("convert_gguf_checkpoint.py", tmp_path / "m.gguf", "--out-dir", out,
                    "--no-progress")
        assert_one_line_error(r, "is a file, not a folder")


def test_gguf_truncated_tensor_data(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) - 600])
    r = run_cli("convert_gguf_checkpoint.py", tmp_path / "t.gguf", "--out-dir", tmp_path / "o",
                "--no-progress")
    assert_one_line_error(r)
    assert "truncated or corrupt; download it again" in r.stderr
    assert not (tmp_path / "o" / "model.pth").exists()


def test_gguf_cli_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    import scripts.convert_gguf_checkpoint as cg  # the command line itself

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(cg, "convert_gguf", interrupted)
    with pytest.raises(SystemExit) as e:
        cg.main([str(tmp_path / "m.gguf")])
    assert e.value.code == 130 and "interrupted; nothing written" in capsys.readouterr().err


def test_hf_weights_disagree_with_config(tmp_path, smollm2):
    folder = tmp_path / "hf29"
    _tiny_hf_model(folder, smollm2.folder / "tokenizer.json")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    r = run_cli("convert_hf_checkpoint.py", folder, "--out-dir", tmp_path / "o", "--no-progress")
    assert_one_line_error(r, "2 layers", "config says 1")
    assert not (tmp_path / "o" / "model.pth").exists()
    (folder / "config.json").write_text("[1, 2]")
    assert_one_line_error(run_cli("convert_hf_checkpoint.py", folder), "not a JSON object")
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_attention_heads=0)))
    assert_one_line_error(run_cli("convert_hf_checkpoint.py", folder), "config.json")


def test_checkpoint_wrong_kinds_of_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory; pass the model.pth"):
        load_checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(CheckpointError, match="not a teal-fast checkpoint"):
        load_checkpoint(tmp_path / "tokenizer.json")
    torch.save({"format": "teal-fast/1", "config": {}}, tmp_path / "nosd.pth")
    with pytest.raises(CheckpointError, match="state_dict"):
        load_checkpoint(tmp_path / "nosd.pth")
    path = _tiny_checkpoint(tmp_path / "model.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["n_head"] = 0
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="invalid config"):
        load_model(path)


# ----------------------------------------------------------------------------- issue 14 item 7

def test_hf_config_tensor_disagreements_all_named_before_any_reshape(tmp_path, smollm2):
    """KV heads that do not fit the tensors, an intermediate size the tensors do not have,
    and tensors no name maps: one line naming each (all unmapped ones, grouped over layers),
    raised before the q/k reshape (which used to fail with a bare RuntimeError)."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "hfbad"
    _tiny_hf_model(folder, smollm2.folder / "tokenizer.json")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_key_value_heads=1,
                                                        intermediate_size=40)))
    sd = load_file(str(folder / "model.safetensors"))
    for i in range(2):
        sd[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.zeros(32)
    sd["model.extra_head.weight"] = torch.zeros(3, 3)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFConversionError) as e:
        convert_hf(folder, tmp_path / "o", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert ("3 unmapped tensors: model.extra_head.weight, "
            "model.layers.{0-1}.self_attn.q_proj.bias") in msg, msg
    assert "layers.{0-1}.attention.k_proj.weight" in msg
    assert "has shape (16, 32) where the config gives (8, 32) [n_local_heads 1 x head_dim 8]" \
        in msg, msg
    assert "intermediate_size 40" in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    r = run_cli("convert_hf_checkpoint.py", folder, "--out-dir", tmp_path / "o", "--no-progress")
    assert_one_line_error(r, "unmapped tensors", "n_local_heads 1")


def test_gguf_head_counts_that_do_not_divide_are_named(tmp_path):
    import gguf
    write_tiny_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    from teal.convert.gguf import model_args_from_metadata, read_metadata
    md = read_metadata(reader)
    md["llama.attention.head_count_kv"] = 3  # 4 heads, 3 KV heads: no whole groups
    from teal.convert.common import check_source_tensors
    from teal.convert.gguf import our_tensor_name
    args = model_args_from_metadata(md, {t.name for t in reader.tensors})
    shapes = {t.name: tuple(int(x) for x in reversed([int(d) for d in t.shape]))
              for t in reader.tensors}
    shapes["blk.0.attn_q.bias"] = (16,)
    shapes["blk.1.attn_q.bias"] = (16,)
    with pytest.raises(GGUFError) as e:
        check_source_tensors(shapes, our_tensor_name, args, "GGUF file m.gguf", GGUFError)
    msg = str(e.value)
    assert "n_head 4 is not a multiple of n_local_heads 3" in msg
    assert "2 unmapped tensors: blk.{0-1}.attn_q.bias" in msg


# ----------------------------------------------------------------------------- issue 14 item 10

def test_hf_output_size_estimate_from_headers(tmp_path, smollm2):
    """The estimate (headers only) matches the tensor bytes of the written checkpoint, in the
    file's dtype, a chosen dtype, and with a tied head stored once."""
    from teal.convert.hf import hf_checkpoint_nbytes, model_args_from_config

    def stored_bytes(path):
        sd = load_checkpoint(path)["state_dict"]
        seen = {t.untyped_storage().data_ptr(): t.nbytes for t in sd.values()}
        return sum(seen.values())
    for tie in (False, True):
        folder = tmp_path / f"hf{int(tie)}"
        _tiny_hf_model(folder, smollm2.folder / "tokenizer.json", tie=tie)
        args = model_args_from_config(json.loads((folder / "config.json").read_text()))
        for dtype in (None, torch.bfloat16):
            before = dict(args)
            n = hf_checkpoint_nbytes(folder, args, dtype)
            assert args == before
            path = convert_hf(folder, tmp_path / f"o{int(tie)}{dtype}", dtype=dtype,
                              progress=False)
            assert n == stored_bytes(path), (tie, dtype)


def test_hf_too_little_disk_space_fails_before_any_tensor_is_read(tmp_path, smollm2,
                                                                   monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    import scripts.convert_hf_checkpoint as ch  # the command line itself
    import teal.convert.hf as hfmod
    from teal.io import WriteError
    folder = tmp_path / "hfspace"
    _tiny_hf_model(folder, smollm2.folder / "tokenizer.json")
    out = tmp_path / "out"
    asked = []

    def nearly_full(path):
        asked.append(Path(path))
        return namedtuple("usage", "total used free")(1 << 30, (1 << 30) - 50_000, 50_000)

    def no_loading(*a, **kw):
        raise AssertionError("a tensor was read before the free-space check")
    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    monkeypatch.setattr(hfmod, "iter_hf_tensors", no_loading)
    monkeypatch.setattr(torch, "save", no_loading)
    with pytest.raises(WriteError) as e:
        convert_hf(folder, out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {out / 'model.pth'}: it needs about ")
    assert "only 0.1 MB are free on the disk of" in msg
    assert msg.endswith("free some space or choose another location")
    assert asked and not out.exists()

    with pytest.raises(SystemExit) as e:
        ch.main([str(folder), "--out-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: cannot write {out / 'model.pth'}: it needs about ")
    assert err[-1].endswith("free some space or choose another location")
    assert not out.exists()

    # with room enough the same conversion goes through (the check is not always failing)
    monkeypatch.undo()
    assert convert_hf(folder, out, progress=False).is_file()
