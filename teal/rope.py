"""Rotary position embeddings (RoPE) in the interleaved-pair order of Meta / gpt-fast.

Shared by the model (`model.py`), calibration and the greedy search, which recompute block
pieces on their own (Su et al., 2021, arXiv 2104.09864; Llama 3.1's frequency scaling).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["precompute_freqs_cis", "apply_rotary_emb"]


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float = 10000.0,
                         rope_scaling: Optional[dict] = None) -> Tensor:
    """RoPE table (seq_len, n_elem // 2, 2) of (cos, sin) in fp32.

    `rope_scaling` applies Llama-3.1's frequency-dependent scaling of the inverse frequencies.
    """
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].double() / n_elem))
    if rope_scaling is not None:
        freqs = _apply_llama31_scaling(freqs, rope_scaling)
    t = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(t, freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def _apply_llama31_scaling(freqs: Tensor, s: dict) -> Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * freqs / factor + smooth * freqs, scaled)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by the angles (T, D/2, 2)
    (the same positions for every sequence) or (B, T, D/2, 2) (each sequence its own)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    lead = freqs_cis.size(0) if freqs_cis.dim() == 4 else 1
    fc = freqs_cis.view(lead, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)
