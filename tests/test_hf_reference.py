"""Our dense fp32 SmolLM2 (GGUF -> model.pth) against Hugging Face transformers' LlamaForCausalLM.

transformers runs the same dequantized weights from an HF folder exported from the GGUF
(q/k rows permuted back to rotate-half order); it uses rotate-half RoPE and its own attention,
norm and MLP code, so it is an independent reference for model.py + the converters. A missing
or wrong q/k permutation can still agree on many argmaxes: the logits are compared too.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures_smollm2 import smollm2, smollm2_hf  # noqa: F401 (fixtures)
from model import load_model
from teal.checkpoint import load_checkpoint
from teal.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
N_PROMPT, N_NEW = 64, 32


@pytest.fixture(scope="module")
def ours(smollm2):
    model, meta = load_model(smollm2.checkpoint, dtype=torch.float32)
    return model.eval(), load_tokenizer(smollm2.folder, meta)


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32).eval()


def _real_text_ids(tok, n: int = N_PROMPT) -> list[int]:
    text = DATA.read_text(encoding="utf-8")[:4000] if DATA.is_file() else (
        "The history of the Roman Empire spans many centuries, from the founding of the city "
        "to the fall of Constantinople. Historians have long debated the causes of its decline, "
        "pointing to economic troubles, military defeats, political instability and plague. ") * 3
    ids = tok.encode(text, special=False)
    assert len(ids) >= n
    return ids[:n]


@torch.no_grad()
def greedy_ours(model, prompt: list[int], n_new: int) -> list[int]:
    """Prefill the prompt, then decode one token at a time through the KV cache."""
    model.setup_caches(1, len(prompt) + n_new)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)))
    out, pos = [], len(prompt)
    for _ in range(n_new):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), torch.tensor([pos]))
        pos += 1
    return out


@torch.no_grad()
def greedy_hf(model, prompt: list[int], n_new: int) -> list[int]:
    """transformers' `generate` (greedy); it may stop early at EOS."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                          dtype=torch.long),
                         do_sample=False, max_new_tokens=n_new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(ours, hf_model):
    """64 tokens of real text and transformers' logits for them."""
    ids = _real_text_ids(ours[1])
    with torch.no_grad():
        return ids, hf_model(torch.tensor([ids])).logits.float()


@torch.no_grad()
def test_dense_logits_match_transformers(ours, reference):
    model, _ = ours
    ids, want = reference
    got = model(torch.tensor([ids]))
    diff = (got - want).abs().max().item()
    print(f"max |logits(ours) - logits(transformers)| = {diff:.3g}")
    assert diff < 1e-3, f"max abs logit diff {diff:.3g} vs transformers"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@torch.no_grad()
def test_cached_prefill_matches_transformers(ours, reference):
    """The same through the KV-cache path (setup_caches + input_pos), not the plain forward."""
    model, _ = ours
    ids, want = reference
    model.setup_caches(1, len(ids))
    got = model(torch.tensor([ids]), torch.arange(len(ids)))
    assert (got - want).abs().max().item() < 1e-3


def test_greedy_generation_matches_transformers(ours, hf_model):
    model, tok = ours
    prompt = _real_text_ids(tok)
    b = greedy_hf(hf_model, prompt, N_NEW)
    a = greedy_ours(model, prompt, N_NEW)
    if len(b) < N_NEW:  # transformers stopped at EOS: compare up to it
        assert b[-1] in tok.eos_ids, b
        a = a[:len(b)]
    assert len(b) >= 8
    assert a == b, f"ours: {tok.decode(a)!r}\nhf:   {tok.decode(b)!r}"


def test_checkpoint_meta(smollm2):
    ckpt = load_checkpoint(smollm2.checkpoint)
    meta = ckpt["meta"]
    assert meta["name"] == "SmolLM2-135M-Instruct"
    assert meta["source"].endswith(".gguf")
    assert meta["tokenizer"]["file"] == "tokenizer.json"
    assert (smollm2.folder / "tokenizer.json").is_file()
