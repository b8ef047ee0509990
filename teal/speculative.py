"""Speculative decoding with a draft model, including TEAL self-drafting.

A cheap draft proposes `k` tokens one at a time; the verifier (the model whose output we
want) scores the last accepted token and the k proposals in one forward of k + 1 positions,
keeps the longest prefix the acceptance rule allows, and adds one token of its own (the
correction at the first rejection, or a bonus token when all k are kept). Every verify step
therefore makes between 1 and k + 1 tokens.

- Greedy (temperature 0): a proposal is kept when it equals the verifier's argmax, so the
  output is the verifier's own greedy output token for token (up to the floating-point
  rounding of a (k + 1)-row product against one-row decode steps).
- Sampling: the standard rule (Leviathan et al., 2023, "Fast Inference from Transformers via
  Speculative Decoding", Algorithm 1; Chen et al., 2023): keep proposal x ~ q with
  probability min(1, p(x) / q(x)); at the first rejection sample from
  norm(max(p - q, 0)); after k kept proposals sample the bonus token from p. The tokens are
  then distributed exactly as the verifier's own samples (p and q after the same
  temperature / top-k processing).

Self-drafting (`share_weights`): the draft is the verifier itself at a higher TEAL sparsity
(and, given a quantized copy, with int4 weights), so it needs no second model. The verifier
decodes at its own sparsity: its verify forward sparsifies all k + 1 positions
(`sparsify_prefill`), each position with its own mask, exactly as k + 1 decode steps would;
the prompt is prefilled densely, as in plain generation.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from teal.generation import (_sdpa_math, _sync, check_generation_length, dense_forward,
                             logits_to_probs)
from teal.sparse_linear import configured

__all__ = ["share_weights", "accept_greedy", "accept_sampled", "draft_step", "verify_step",
           "speculative_generate", "expected_tokens_per_step"]


def share_weights(model):
    """A second model object that shares `model`'s weights but not its state.

    Parameters and weight buffers (SparseLinear `weight`, quantized `qweight` / `scales`,
    norms, embeddings) are the same tensors; thresholds, counters, KV caches and kernel
    launches are the copy's own, so the copy can run at another sparsity with its own cache
    (self-drafting). No weight memory is added; `setup_caches` allocates the copy's caches.
    """
    memo = {}
    for p in model.parameters():
        memo[id(p)] = p
    own = ("threshold", "_zero_threshold", "counts", "k_cache", "v_cache")
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] not in own:
            memo[id(b)] = b
    for layer in getattr(model, "layers", ()):
        cache = getattr(layer.attention, "kv_cache", None)
        if cache is not None:
            memo[id(cache)] = None
    for attr in ("freqs_cis", "causal_mask"):
        t = getattr(model, attr, None)
        if t is not None:
            memo[id(t)] = t
    twin = copy.deepcopy(model, memo)
    twin.max_batch_size = twin.max_seq_length = -1
    twin.causal_mask = None
    return twin


# ----------------------------------------------------------------------------- rules
def accept_greedy(verify_logits: Tensor, draft_tokens: Tensor) -> tuple[int, int]:
    """Greedy acceptance: (n kept, next token).

    verify_logits: (k + 1, V), the verifier's logits after the last accepted token and after
    each proposal; draft_tokens: (k,) int. The proposals are kept while they equal the
    verifier's argmax; the next token is the verifier's argmax after the kept ones.
    """
    best = verify_logits.argmax(dim=-1)
    k = draft_tokens.numel()
    miss = (best[:k] != draft_tokens.to(best.dtype)).nonzero()
    n = int(miss[0]) if miss.numel() else k
    return n, int(best[n])


def accept_sampled(p: Tensor, q: Tensor, draft_tokens: Tensor,
                   generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """Speculative-sampling acceptance (Leviathan et al., 2023, Algorithm 1): (n kept, next).

    p: (k + 1, V) verifier probabilities; q: (k, V) draft probabilities the proposals
    `draft_tokens` (k,) were drawn from (both after the same temperature / top-k). Proposal
    i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next
    token is drawn from max(p_i - q_i, 0) normalised (from p_i where that is all zero, i.e.
    p_i == q_i up to rounding); when all k are kept, from p_k.
    """
    k = draft_tokens.numel()
    idx = torch.arange(k, device=p.device)
    tok = draft_tokens.to(device=p.device, dtype=torch.long)
    pd, qd = p[idx, tok].double(), q[idx, tok].double()
    r = torch.rand(k, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else "cpu").to(p.device)
    miss = (r * qd >= pd).nonzero()       # keep when r < p/q  (q > 0: x was drawn from q)
    if not miss.numel():
        return k, _draw(p[k], generator)
    n = int(miss[0])
    residual = (p[n].double() - q[n].double()).clamp_min(0)
    if float(residual.sum()) <= 0:
        return n, _draw(p[n], generator)
    return n, _draw(residual, generator)


def _draw(weights: Tensor, generator) -> int:
    w = weights.double()
    dev = generator.device if generator is not None else w.device
    return int(torch.multinomial((w / w.sum()).to(dev), 1, generator=generator))


def expected_tokens_per_step(acceptance: float, k: int) -> float:
    """Tokens per verify step when each proposal is kept with probability `acceptance`,
    independently: sum_{i=0..k} a^i = (1 - a^(k+1)) / (1 - a) (Leviathan et al., 2023,
    Eq. 1). Used to model speed from a measured acceptance rate."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    if acceptance == 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


# ----------------------------------------------------------------------------- steps
def draft_step(model, token: Tensor, input_pos: Tensor) -> Tensor:
    """One decode step of the draft: logits (1, 1, V) for `token` (1, 1) at `input_pos` (1,)."""
    return model(token, input_pos)


def verify_step(model, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """The verifier's logits (1, k + 1, V) for `tokens` (1, k + 1) at `input_pos` (k + 1,),
    every position sparsified with its own mask (as k + 1 decode steps; `sparsify_prefill`
    is set by `speculative_generate` around the call)."""
    return model(tokens, input_pos)


@torch.no_grad()
def speculative_generate(model, draft, prompt: Tensor, max_new_tokens: int, k: int, *,
                         temperature: float = 0.0, top_k: Optional[int] = None, stop_ids=(),
                         on_token: Optional[Callable[[int], None]] = None,
                         draft_fn: Callable = draft_step, verify_fn: Callable = verify_step,
                         generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict]:
    """Generate with `model` as the verifier and `draft` proposing `k` tokens per step.

    prompt: (T,) int token ids on the models' device. Both models are prefilled densely on
    the prompt (their own KV caches); the first token is the verifier's. Each step: the
    draft decodes k proposals (`draft_fn`, e.g. torch.compile'd `draft_step`), the verifier
    scores them in one (k + 1)-position forward (`verify_fn`), `accept_greedy` (temperature
    0) or `accept_sampled` decides, and the tokens are emitted (`on_token(id)` for each).
    After a step that kept all k proposals the draft is fed its last proposal, so its cache
    holds every accepted token. Generation ends after a token in `stop_ids` (kept as the
    last id) or `max_new_tokens` new tokens.

    Returns (ids, stats): ids = prompt + new tokens (1-D); stats: prefill_s, decode_s (the
    steps, `on_token` time excluded), decode_tokens (new tokens after the prefill's),
    stopped, verify_steps, proposed, accepted, acceptance_rate (accepted / proposed),
    tokens_per_step (tokens made per verify step), accepted_histogram (list of k + 1 counts:
    steps that kept 0..k proposals).

    Raises:
        ValueError: k < 1, a prompt that is empty or not 1-D, models of different
            vocabularies, or prompt + new tokens + k + 1 beyond either model's context.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"speculate_k must be a positive integer, got {k!r}")
    if prompt.dim() != 1:
        raise ValueError(f"prompt must be a 1-D tensor of token ids, got shape "
                         f"{tuple(prompt.shape)}")
    if model.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs "
                         f"from the verifier's ({model.config.vocab_size}); use a draft of the "
                         f"same model family and tokenizer")
    t = prompt.numel()
    for m in (model, draft):
        check_generation_length(m, t, max_new_tokens + k + 1)
    device = prompt.device
    max_seq = t + max_new_tokens + k + 1
    with torch.device(device):
        model.setup_caches(max_batch_size=1, max_seq_length=max_seq)
        draft.setup_caches(max_batch_size=1, max_seq_length=max_seq)
    greedy = temperature <= 0
    stop_ids = set(stop_ids or ())

    def probs(logits):  # (n, V) -> (n, V) fp32
        return logits_to_probs(logits.float(), temperature, top_k)

    _sync(device)
    t0 = time.perf_counter()
    pos = torch.arange(t, device=device)
    logits = dense_forward(model, prompt.view(1, -1), pos)[0, -1:]
    dense_forward(draft, prompt.view(1, -1), pos)
    first = int(logits.argmax(-1)) if greedy else _draw(probs(logits)[0], generator)
    _sync(device)
    t1 = time.perf_counter()
    out = [first]
    hist = [0] * (k + 1)
    steps = proposed = accepted = 0
    callback_s = 0.0

    def emit(tok):
        nonlocal callback_s
        if on_token is not None:
            c = time.perf_counter()
            on_token(tok)
            callback_s += time.perf_counter() - c

    emit(first)
    stopped = first in stop_ids
    n_pos = t  # position of the last emitted token (not yet in either cache)
    t_dec = time.perf_counter()
    while not stopped and len(out) < max_new_tokens:
        last = torch.tensor([[out[-1]]], dtype=torch.int, device=device)
        proposals, qs = [], []
        cur = last
        for i in range(k):
            with _sdpa_math():
                dl = draft_fn(draft, cur, torch.tensor([n_pos + i], device=device, dtype=torch.int))
            dl = dl[0, -1:]
            if greedy:
                tok = int(dl.argmax(-1))
            else:
                q = probs(dl)[0]
                qs.append(q)
                tok = _draw(q, generator)
            proposals.append(tok)
            cur = torch.tensor([[tok]], dtype=torch.int, device=device)
        drafted = torch.tensor(proposals, dtype=torch.long, device=device)
        toks = torch.cat([last.view(-1).long(), drafted]).view(1, -1).to(torch.int)
        with configured(model, sparsify_prefill=True), _sdpa_math():
            vl = verify_fn(model, toks, torch.arange(n_pos, n_pos + k + 1, device=device))[0]
        if greedy:
            n, nxt = accept_greedy(vl, drafted)
        else:
            n, nxt = accept_sampled(probs(vl), torch.stack(qs), drafted, generator)
        if n == k:  # the draft never saw its last proposal: put it in its cache
            with _sdpa_math():
                draft_fn(draft, cur, torch.tensor([n_pos + k], device=device, dtype=torch.int))
        steps += 1
        proposed += k
        accepted += n
        hist[n] += 1
        for tok in proposals[:n] + [nxt]:
            if len(out) >= max_new_tokens:
                break
            out.append(tok)
            emit(tok)
            if tok in stop_ids:
                stopped = True
                break
        n_pos += n + 1
    _sync(device)
    t2 = time.perf_counter()
    new = torch.tensor(out, dtype=prompt.dtype, device=device)
    return torch.cat([prompt, new]), {
        "prefill_s": t1 - t0, "decode_s": t2 - t_dec - callback_s,
        "decode_tokens": len(out) - 1, "stopped": stopped, "verify_steps": steps,
        "proposed": proposed, "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else float("nan"),
        "tokens_per_step": (len(out) - 1) / steps if steps else float("nan"),
        "accepted_histogram": hist}
