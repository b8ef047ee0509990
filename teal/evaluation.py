"""Evaluation: perplexity on a token stream, and the measured effective sparsity.

Perplexity follows the usual LLM convention (see the data README): the text is tokenized
once, cut into non-overlapping windows of `seq_len` tokens, each window is scored
independently (teacher forcing, no context carried across windows), and the result is
exp(mean NLL) over every predicted token (T - 1 per window of T tokens).

To score a sparse model, call `teal.configure(model, sparsify_prefill=True)` first: every
token's projections are then sparsified, the teacher-forced equivalent of generating every
token sparsely with a KV cache (a causal forward whose inputs are sparsified at every
position computes exactly the states a sparse decode would have cached).

Effective sparsity is read from `SparseLinear.counts` (enable with
`teal.configure(model, track=True)`, which also resets them).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.calibration import token_windows
from teal.projections import PROJECTIONS


@torch.no_grad()
def perplexity(model, token_ids: Tensor, seq_len: int = 2048, *, max_tokens: Optional[int] = None,
               device=None, progress: bool = True, desc: str = "perplexity",
               on_window=None) -> float:
    """exp(mean NLL) of `token_ids` (1-D) over non-overlapping windows of `seq_len` tokens.

    Args:
        model: a `model.Transformer` configured as it should be scored.
        token_ids: 1-D int tensor; the first `max_tokens` are used.
        seq_len: window length (at most the model's context); a final shorter window with at
            least 2 tokens is scored too.
        device: where to run (default: the model's device).
        progress: show a tqdm bar.
        on_window: optional callback(tokens_done, nll_sum, predicted) after each window
            (e.g. to report the perplexity of a prefix of the text from the same run).

    Raises:
        ValueError: fewer than 2 tokens to score, or seq_len beyond the model's context.
    """
    from tqdm import tqdm

    if seq_len > model.config.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context {model.config.block_size}")
    device = device or model.tok_embeddings.weight.device
    windows = token_windows(token_ids, seq_len, max_tokens, min_len=2)
    if not windows:
        raise ValueError("need at least 2 tokens to compute perplexity")
    nll, count, done = 0.0, 0, 0
    for w in tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False):
        w = w.to(device)
        logits = model(w[None])[0, :-1]  # (T-1, vocab) fp32
        nll += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
        count += w.numel() - 1
        done += w.numel()
        if on_window is not None:
            on_window(done, nll, count)
    return math.exp(nll / count)


def _layer_projection_sparsity(model) -> dict:
    """{(layer, proj): measured fraction zeroed} (0.0 for projections running dense;
    NaN for sparse ones that saw no input while tracking)."""
    out = {}
    for layer, proj, lin in model.projections():
        out[(layer, proj)] = lin.effective_sparsity() if lin.sparse else 0.0
    return out


def effective_sparsity(model, per_layer: bool = False) -> dict:
    """Measured fraction of zeroed input entries per projection type (q_proj, ..., down_proj).

    Every layer's projection sees the same tokens, so the per-type figure is the mean over
    layers (a dense layer counts as 0). With `per_layer`, returns {(layer, proj): fraction}.
    """
    by = _layer_projection_sparsity(model)
    if per_layer:
        return by
    out = {}
    for proj in PROJECTIONS:
        vals = [v for (l, p), v in by.items() if p == proj]
        out[proj] = sum(vals) / len(vals) if vals else float("nan")
    return out


def parameter_weighted_sparsity(model) -> float:
    """Model-level sparsity: measured zeroed fraction of every block projection's input,
    weighted by the projection's parameter count (the weight bytes a sparse GEMV skips).
    The output head is not counted (TEAL's model-wide figure covers the block projections)."""
    num = den = 0.0
    by = _layer_projection_sparsity(model)
    for layer, proj, lin in model.projections():
        n = lin.in_features * lin.out_features
        num += by[(layer, proj)] * n
        den += n
    return num / den


def format_sparsity(eff: dict) -> str:
    """One line: 'q 0.500 k 0.498 ...' of an `effective_sparsity` dict."""
    return " ".join(f"{p.removesuffix('_proj')} {v:.3f}" for p, v in eff.items())
