"""GPT-Fast-style Llama-family transformer whose projections are TEAL sparse linears.

One `ModelArgs` dataclass, one table of known configs (`transformer_configs`), and a small
`Transformer` with a static KV cache, GQA, RMSNorm and RoPE (interleaved pairs, the Meta /
gpt-fast convention; Hugging Face checkpoints are permuted into it at conversion).

The seven projections of a block (q_proj ... down_proj) are four `teal.SparseLinear` modules,
one per distinct input, built from the spec in `teal.projections`: `attention.qkv` (q, k, v),
`attention.o_proj`, `feed_forward.gate_up` (gate, up, SwiGLU epilogue) and
`feed_forward.down_proj`. Attention and MLP only call them; all sparsity logic (thresholds,
decode vs prefill dispatch, fused kernels) lives in `teal/`.

References:
- gpt-fast (PyTorch team): model layout, static KV cache, interleaved RoPE.
- Llama 2 / Llama 3 papers: RMSNorm, SwiGLU MLP, GQA; Llama 3.1 RoPE frequency scaling.
- TEAL (Liu et al., 2024, arXiv 2408.14690): activation sparsity on every projection input.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from teal import kernels
from teal.checkpoint import load_model as _load_model
from teal.kernels import DEFAULT_POLICY, KernelPolicy
from teal.projections import build_input_module, model_projections
from teal.rope import apply_rotary_emb, precompute_freqs_cis
from teal.sparse_linear import install_state_dict_hooks


@dataclass
class ModelArgs:
    """Architecture hyper-parameters of a Llama-family decoder.

    Attributes:
        block_size: maximum context length (tokens) of the KV cache and RoPE tables.
        vocab_size: number of token ids.
        n_layer: number of transformer blocks.
        n_head: number of query heads.
        dim: model (residual stream) width.
        intermediate_size: MLP hidden width (gate/up output, down input).
        n_local_heads: number of KV heads (GQA); -1 means equal to `n_head`.
        head_dim: per-head width; 0 means `dim // n_head`.
        rope_base: RoPE theta.
        norm_eps: RMSNorm epsilon.
        rope_scaling: Llama-3.1 frequency scaling dict (keys `factor`, `low_freq_factor`,
            `high_freq_factor`, `original_max_position_embeddings`) or None.
        tie_embeddings: the output head shares the token embedding matrix.
    """

    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int = 0
    n_local_heads: int = -1
    head_dim: int = 0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size == 0:
            hidden = 4 * self.dim
            n_hidden = int(2 * hidden / 3)
            self.intermediate_size = (n_hidden + 255) // 256 * 256
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(
                f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """Config of a known model (exact key of `transformer_configs`, case-insensitive).

        Raises:
            KeyError: the name is unknown (message lists the known names).
        """
        for key, cfg in transformer_configs.items():
            if key.lower() == name.lower():
                return cls(**cfg)
        raise KeyError(f"unknown model {name!r}; known: {', '.join(transformer_configs)}")

    def to_dict(self) -> dict:
        """Plain dict (JSON- and `torch.load(weights_only=True)`-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Inverse of `to_dict`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)

transformer_configs = {
    "Llama-2-7b": dict(n_layer=32, n_head=32, dim=4096, intermediate_size=11008, block_size=4096),
    "Llama-2-13b": dict(n_layer=40, n_head=40, dim=5120, intermediate_size=13824, block_size=4096),
    "Llama-2-70b": dict(n_layer=80, n_head=64, dim=8192, n_local_heads=8,
                        intermediate_size=28672, block_size=4096),
    "Meta-Llama-3-8B": dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                            intermediate_size=14336, vocab_size=128256, rope_base=500000.0),
    "Meta-Llama-3-70B": dict(block_size=8192, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
                             intermediate_size=28672, vocab_size=128256, rope_base=500000.0),
    "Llama-3.1-8B": dict(block_size=131072, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                         intermediate_size=14336, vocab_size=128256, rope_base=500000.0,
                         rope_scaling=_LLAMA31_SCALING),
    "Llama-3.1-70B": dict(block_size=131072, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
                          intermediate_size=28672, vocab_size=128256, rope_base=500000.0,
                          rope_scaling=_LLAMA31_SCALING),
    "Mistral-7B": dict(n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
                       vocab_size=32000, block_size=32768, rope_base=1000000.0),
    "SmolLM2-135M": dict(block_size=8192, n_layer=30, n_head=9, n_local_heads=3, dim=576,
                         intermediate_size=1536, vocab_size=49152, rope_base=100000.0,
                         tie_embeddings=True),
    "SmolLM2-360M": dict(block_size=8192, n_layer=32, n_head=15, n_local_heads=5, dim=960,
                         intermediate_size=2560, vocab_size=49152, rope_base=100000.0,
                         tie_embeddings=True),
    "SmolLM2-1.7B": dict(block_size=8192, n_layer=24, n_head=32, n_local_heads=32, dim=2048,
                         intermediate_size=8192, vocab_size=49152, rope_base=130000.0,
                         tie_embeddings=True),
}
# Instruct variants share the base architecture.
for _base in ("SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B"):
    transformer_configs[_base + "-Instruct"] = transformer_configs[_base]


class KVCache(nn.Module):
    """Static KV cache: k/v of shape (B, n_local_heads, max_seq_length, head_dim)."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_heads: int, head_dim: int,
                 dtype=torch.bfloat16):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, H, T, D) at positions `input_pos` and return the caches of these B
        sequences, (B, H, S, D).

        input_pos: (T,) int, the same positions for every sequence, or (B, T), each
        sequence at its own positions (batched decoding of prompts of different lengths).
        """
        bsz = k_val.shape[0]
        k_cache, v_cache = self.k_cache[:bsz], self.v_cache[:bsz]
        if input_pos.dim() == 1:
            k_cache[:, :, input_pos] = k_val.to(k_cache.dtype)
            v_cache[:, :, input_pos] = v_val.to(v_cache.dtype)
        else:  # rows b, positions input_pos[b]: advanced indices first, so (B, T, H, D)
            rows = torch.arange(bsz, device=input_pos.device).view(-1, 1)
            k_cache[rows, :, input_pos] = k_val.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, input_pos] = v_val.transpose(1, 2).to(v_cache.dtype)
        return k_cache, v_cache


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class Attention(nn.Module):
    """Causal GQA self-attention with TEAL sparse q/k/v (one fused module) and o projections.

    `kernel_policy` decides whether single-query decode attention runs on the fused kernel.
    """

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head = config.n_head
        self.n_local_heads = config.n_local_heads
        self.head_dim = config.head_dim
        self.qkv = build_input_module("attn_in", config)      # q_proj | k_proj | v_proj
        self.o_proj = build_input_module("attn_out", config)
        self.kv_cache: Optional[KVCache] = None
        self.kernel_policy: KernelPolicy = DEFAULT_POLICY

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv.sizes, dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if seqlen == 1 and self.kv_cache is not None:
            y = decode_attention(q, k, v, mask, self.kernel_policy)
        else:
            rep = self.n_head // self.n_local_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        y = y.transpose(1, 2).contiguous().view(bsz, seqlen, self.n_head * self.head_dim)
        return self.o_proj(y)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                     policy: KernelPolicy = DEFAULT_POLICY) -> Tensor:
    """Single-query GQA attention without repeating the KV heads.

    Runs as one Triton kernel (`teal.kernels.decode_attention`: online softmax in fp32,
    skipping the unfilled cache tail) where `policy` allows it and the kernel supports the
    operands (batch 1, fp16/bf16, power-of-two head_dim); otherwise in torch as below.

    q: (B, n_head, 1, D); k, v: (B, n_kv_head, S, D) (the KV cache, S = cache length);
    mask: bool, broadcastable to (B, 1, 1, S), True where a position may be attended.
    Returns (B, n_head, 1, D) in q's dtype. The n_head / n_kv_head query heads of a group
    are stacked as rows of one (rep, D) x (D, S) product, so each cache entry is read once
    (softmax(q k^T / sqrt(D)) v with scores in the input dtype, softmax in fp32, like the
    eager Hugging Face Llama attention).
    """
    if (policy.attention and policy.allows(q.device) and mask.dtype == torch.bool
            and mask.numel() == k.shape[2] and kernels.decode_attention_supported(q, k, v)):
        return kernels.decode_attention(q, k, v, mask)
    B, nh, T, D = q.shape
    kvh = k.shape[1]
    qg = q.reshape(B, kvh, (nh // kvh) * T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (D ** -0.5)  # (B, kvh, rep, S)
    scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, nh, T, D)


class FeedForward(nn.Module):
    """SwiGLU MLP down_proj(silu(gate_proj(x)) * up_proj(x)), gate/up fused in one module."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.gate_up = build_input_module("mlp_in", config)   # silu(gate_proj) * up_proj
        self.down_proj = build_input_module("mlp_mid", config)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gate_up(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, input_pos: Tensor, freqs_cis: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama-family decoder. State-dict keys (the checkpoint format, see teal/checkpoint.py):

    `tok_embeddings.weight` (vocab, dim); per block i: `layers.i.attention_norm.weight`,
    `layers.i.attention.{q,k,v,o}_proj.weight`, `layers.i.ffn_norm.weight`,
    `layers.i.feed_forward.{gate,up,down}_proj.weight` (nn.Linear (out, in) shapes; q/k rows
    in interleaved-pair RoPE order); `norm.weight`; `output.weight` (vocab, dim), the same
    tensor as `tok_embeddings.weight` when `tie_embeddings`. In memory q/k/v and gate/up are
    fused (`attention.qkv`, `feed_forward.gate_up`); the state dict is split and merged on
    save and load (`teal.sparse_linear.install_state_dict_hooks`).
    """

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.freqs_cis: Optional[Tensor] = None
        self.causal_mask: Optional[Tensor] = None
        self.max_batch_size = -1
        self.max_seq_length = -1
        install_state_dict_hooks(self)

    def setup_caches(self, max_batch_size: int, max_seq_length: int,
                     dtype: Optional[torch.dtype] = None) -> None:
        """Allocate KV caches for `max_batch_size` sequences of up to `max_seq_length` tokens.

        Raises:
            ValueError: a size below 1, or `max_seq_length` beyond the model's context
                (`block_size`).
        """
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_length", max_seq_length)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"setup_caches: {name} must be a positive integer, got {value!r}")
        if max_seq_length > self.config.block_size:
            raise ValueError(f"{max_seq_length} tokens exceed the model's context length "
                             f"{self.config.block_size}; use a shorter prompt or fewer new tokens")
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        cfg = self.config
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, max_seq_length, cfg.n_local_heads,
                                           cfg.head_dim, dtype).to(device)
        self.freqs_cis = precompute_freqs_cis(cfg.block_size, cfg.head_dim, cfg.rope_base,
                                              cfg.rope_scaling).to(device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length,
                                                 dtype=torch.bool, device=device))
        self.max_batch_size = max_batch_size
        self.max_seq_length = max_seq_length

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None) -> Tensor:
        """Logits (B, T, vocab) in fp32 for token ids `idx` (B, T) at positions `input_pos`.

        With `input_pos` the KV caches (set up by `setup_caches`) are read and written:
        `input_pos` (T,) puts every sequence at the same positions; (B, T) puts sequence b at
        positions input_pos[b] (its own RoPE angles, cache slots and causal mask), for
        batched decoding of prompts of different lengths. Without it the call is a plain
        causal forward over `idx` (positions 0..T-1, no cache).

        Raises:
            ValueError: more tokens than the context or the caches hold, a batch larger than
                the caches', or `input_pos` of another length than `idx` or (eager, on a CPU
                tensor: checked without a device sync) outside the caches.
            RuntimeError: `input_pos` given before `setup_caches`.
        """
        if input_pos is None:
            seqlen = idx.shape[1]
            if self.freqs_cis is None or self.freqs_cis.device != idx.device:
                cfg = self.config
                self.freqs_cis = precompute_freqs_cis(cfg.block_size, cfg.head_dim, cfg.rope_base,
                                                      cfg.rope_scaling).to(idx.device)
            if seqlen > self.config.block_size:
                raise ValueError(f"{seqlen} tokens exceed the context length "
                                 f"{self.config.block_size}")
            input_pos = torch.arange(seqlen, device=idx.device)
            mask = torch.tril(torch.ones(seqlen, seqlen, dtype=torch.bool, device=idx.device))
            caches = [b.attention.kv_cache for b in self.layers]
            for b in self.layers:
                b.attention.kv_cache = None
            try:
                return self._forward(idx, input_pos, mask)
            finally:
                for b, c in zip(self.layers, caches):
                    b.attention.kv_cache = c
        if self.causal_mask is None:
            raise RuntimeError("call setup_caches() before a forward with input_pos")
        self._check_cache_fit(idx, input_pos)
        if input_pos.dim() == 1:
            mask = self.causal_mask[None, None, input_pos]      # (1, 1, T, S)
        else:
            mask = self.causal_mask[input_pos].unsqueeze(1)     # (B, 1, T, S)
        return self._forward(idx, input_pos, mask)

    def _check_cache_fit(self, idx: Tensor, input_pos: Tensor) -> None:
        """ValueError instead of an index error (CPU) or a device-side assert (CUDA) for a
        forward the caches cannot hold. Shapes are checked always; positions only for a CPU
        `input_pos` outside torch.compile (on a GPU reading them would sync every step:
        `teal.generation.generate` checks prompt + new tokens against the context first)."""
        bsz, seqlen = idx.shape[0], idx.shape[-1]
        if input_pos.shape not in ((seqlen,), (bsz, seqlen)):
            raise ValueError(f"input_pos must hold one position per token: {bsz} x {seqlen} "
                             f"tokens, input_pos of shape {tuple(input_pos.shape)} (expected "
                             f"({seqlen},) or ({bsz}, {seqlen}))")
        if seqlen > self.max_seq_length or bsz > self.max_batch_size:
            raise ValueError(f"{bsz} x {seqlen} tokens do not fit the KV caches "
                             f"({self.max_batch_size} x {self.max_seq_length}); call "
                             f"setup_caches with a larger max_seq_length / max_batch_size")
        if input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(input_pos.min()), int(input_pos.max())
            if lo < 0 or hi >= self.max_seq_length:
                raise ValueError(f"positions {lo}..{hi} are outside the KV caches (0.."
                                 f"{self.max_seq_length - 1}); call setup_caches with "
                                 f"max_seq_length >= {hi + 1} (at most the context length "
                                 f"{self.config.block_size})")

    def _forward(self, idx: Tensor, input_pos: Tensor, mask: Tensor) -> Tensor:
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, input_pos, freqs_cis, mask)
        x = self.norm(x)
        return self.output(x).float()

    def projections(self):
        """Yield (layer index, projection name, `teal.sparse_linear.Projection`) for every
        projection, layer by layer in `teal.projections.PROJECTIONS` order."""
        return model_projections(self)


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None):
    """`Transformer` from a checkpoint made by scripts/convert_*.py: (model, checkpoint meta).

    Raises:
        teal.checkpoint.CheckpointError: missing, corrupt or mismatched checkpoint (one line
            naming the fix).
    """
    return _load_model(path, lambda config: Transformer(ModelArgs.from_dict(config)), device, dtype)
