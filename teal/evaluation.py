"""Evaluation: perplexity on a token stream, and the measured effective sparsity.

Perplexity follows the usual LLM convention (see the data README): the text is tokenized
once and scored as exp(mean NLL) over every predicted token, in windows of at most `seq_len`
tokens. **Every token after the first is predicted exactly once**: consecutive windows
overlap by one token (each window starts with the last token of the one before, which is
context only there), so no token is lost at a window boundary. A stream of N tokens is N - 1
predictions in ceil((N - 1) / (seq_len - 1)) windows (`scoring_windows`); with `context`
(the token just before the stream, e.g. for a run that starts mid-text) the stream's first
token is predicted too, so consecutive runs add up exactly to one run over their union.

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

from teal.projections import PROJECTIONS


def scoring_windows(token_ids: Tensor, seq_len: int, max_tokens: Optional[int] = None,
                    context: Optional[Tensor] = None) -> list[Tensor]:
    """The windows (1-D views) that score every token after the first exactly once.

    The stream is the first `max_tokens` of `token_ids`, preceded by the last token of
    `context` when given. Windows have `seq_len` tokens (the last may be shorter, at least 2)
    and overlap by one: window k covers stream positions [k (seq_len - 1), k (seq_len - 1) +
    seq_len), predicts all but its first token, and its first token is the last one of window
    k - 1. So the stream's first token is context only and every other token is predicted
    once.

    Raises:
        ValueError: seq_len < 2 (a window must predict something).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    ids = token_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if context is not None and context.numel():
        ids = torch.cat([context.reshape(-1)[-1:].to(ids), ids])
    stride = seq_len - 1
    return [ids[i:i + seq_len] for i in range(0, max(ids.numel() - 1, 0), stride)]


def window_ends(n_tokens: int, seq_len: int, context: bool = False) -> list[int]:
    """Token counts (of the scored tokens, context excluded) at which the windows of
    `scoring_windows` end: the prefixes whose perplexity one run reports exactly."""
    total = n_tokens + int(context)
    ends, end = [], seq_len
    while True:
        end = min(end, total)
        ends.append(end - int(context))
        if end >= total:
            return ends
        end += seq_len - 1


@torch.no_grad()
def perplexity(model, token_ids: Tensor, seq_len: int = 2048, *, max_tokens: Optional[int] = None,
               device=None, progress: bool = True, desc: str = "perplexity",
               on_window=None, context: Optional[Tensor] = None) -> float:
    """exp(mean NLL) of `token_ids` (1-D), every token after the first predicted once.

    Args:
        model: a `model.Transformer` configured as it should be scored.
        token_ids: 1-D int tensor; the first `max_tokens` are used.
        seq_len: window length (at most the model's context); windows overlap by one token
            (`scoring_windows`), a final shorter window with at least 2 tokens is scored too.
        device: where to run (default: the model's device).
        progress: show a tqdm bar.
        on_window: optional callback(tokens_done, nll_sum, predicted) after each window
            (e.g. to report the perplexity of a prefix of the text from the same run);
            tokens_done counts tokens of `token_ids`, so a prefix of T tokens has T - 1
            predictions (T with `context`).
        context: the token(s) just before `token_ids` in the text: the last one is context
            for the first window, so `token_ids[0]` is predicted too (a run over a later part
            of a text then adds up exactly with a run over the part before).

    Raises:
        ValueError: nothing to predict (fewer than 2 tokens, 1 with context), seq_len < 2,
            or seq_len beyond the model's context.
    """
    from tqdm import tqdm

    if seq_len > model.config.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context {model.config.block_size}")
    device = device or model.tok_embeddings.weight.device
    windows = scoring_windows(token_ids, seq_len, max_tokens, context)
    if not windows:
        raise ValueError("need at least 2 tokens to compute perplexity")
    offset = 1 if context is not None and context.numel() else 0
    nll, count = 0.0, 0
    for k, w in enumerate(tqdm(windows, desc=desc, unit="win", disable=not progress,
                               leave=False)):
        w = w.to(device)
        logits = model(w[None])[0, :-1]  # (T-1, vocab) fp32
        nll += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
        count += w.numel() - 1
        if on_window is not None:  # tokens of token_ids up to the end of this window
            on_window(k * (seq_len - 1) + w.numel() - offset, nll, count)
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
