"""Model invariants that do not need the real checkpoint (HF equality: test_hf_reference.py)."""
import pytest
import torch

from model import ModelArgs, Transformer, precompute_freqs_cis, transformer_configs


def _tiny(**kw):
    cfg = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
               vocab_size=101, block_size=64)
    cfg.update(kw)
    return Transformer(ModelArgs(**cfg))


def test_kv_cache_decode_equals_full_forward():
    m = _tiny()
    x = torch.randint(0, 101, (1, 17))
    full = m(x)
    m.setup_caches(1, 32)
    parts = [m(x[:, :9], torch.arange(9))]
    for i in range(9, 17):
        parts.append(m(x[:, i:i + 1], torch.tensor([i])))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-4)


def test_tied_embeddings_share_storage():
    m = _tiny(tie_embeddings=True)
    assert m.output.weight is m.tok_embeddings.weight


def test_context_length_error():
    m = _tiny()
    with pytest.raises(ValueError, match="context length"):
        m.setup_caches(1, 65)


def test_llama31_rope_scaling_changes_low_frequencies_only():
    base = precompute_freqs_cis(16, 128, 500000.0)
    cfg = ModelArgs.from_name("Llama-3.1-8B")
    scaled = precompute_freqs_cis(16, 128, 500000.0, cfg.rope_scaling)
    assert torch.allclose(base[:, :8], scaled[:, :8])  # high frequencies untouched
    assert not torch.allclose(base[:, -8:], scaled[:, -8:])


def test_known_configs_build():
    for name in transformer_configs:
        a = ModelArgs.from_name(name)
        assert a.n_head % a.n_local_heads == 0 and a.head_dim * a.n_head >= a.dim // 2
    with pytest.raises(KeyError, match="known"):
        ModelArgs.from_name("nope")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_repeated_kv_reference(dtype, tol):
    """GQA decode attention (no KV repeat) vs a float64 repeat_interleave reference, with
    masked-out cache positions (the unwritten tail of the KV cache)."""
    from model import decode_attention

    B, nh, kvh, S, D = 2, 8, 2, 11, 16
    q = torch.randn(B, nh, 1, D).to(dtype)
    k, v = torch.randn(B, kvh, S, D).to(dtype), torch.randn(B, kvh, S, D).to(dtype)
    k[:, :, 7:] = 1e4  # stale cache entries beyond the mask must not contribute
    v[:, :, 7:] = 1e4
    mask = torch.zeros(1, 1, 1, S, dtype=torch.bool)
    mask[..., :7] = True
    y = decode_attention(q, k, v, mask)
    assert y.shape == (B, nh, 1, D) and y.dtype == dtype
    kr = k[:, :, :7].double().repeat_interleave(nh // kvh, dim=1)
    vr = v[:, :, :7].double().repeat_interleave(nh // kvh, dim=1)
    ref = torch.softmax(q.double() @ kr.transpose(-1, -2) / D ** 0.5, dim=-1) @ vr
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err
