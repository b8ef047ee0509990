"""The decode loop (GPT-Fast style): prefill, one-token decode steps, sampling, reporting.

`generate` prefills the prompt densely (TEAL keeps prefill dense at inference) and decodes
token by token through `decode_fn` (`decode_one_token`, or its `torch.compile`d form: one
CUDA graph per step), with greedy or top-k sampling that never synchronises with the host.
`bytes_per_decode_step` and `measure_effective_sparsity` turn a run into GB/s and the
measured sparsity per projection type. Used by generate.py and scripts/bench_decode.py.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.sparse_linear import configure, configured, sparse_linears

__all__ = ["argmax_last", "multinomial_sample_one_no_sync", "logits_to_probs", "sample",
           "prefill", "dense_forward", "decode_one_token", "decode_n_tokens", "generate", "generate_batch",
           "check_generation_length",
           "bytes_per_decode_step", "skips_weight_rows", "measure_effective_sparsity"]


# ----------------------------------------------------------------------------- sampling
def argmax_last(x: Tensor, chunk: int = 512) -> Tensor:
    """torch.argmax(x, dim=-1, keepdim=True) as int32, in two stages for a long last dim.

    x: (B, V) floating point (anything else: plain torch.argmax). Compiled, a single argmax
    over a 128K vocabulary runs as one ~30 us reduction per token; here row chunks of `chunk`
    entries are reduced in parallel first (max + index), then the chunk maxima. First index
    of the maximum, as torch.argmax.
    """
    if x.dim() != 2 or not x.is_floating_point() or x.shape[0] == 0 or x.shape[1] <= 4 * chunk:
        return torch.argmax(x, dim=-1, keepdim=True).to(dtype=torch.int)
    B, V = x.shape
    pad = -V % chunk
    xp = F.pad(x, (0, pad), value=float("-inf")) if pad else x
    m, i = xp.view(B, -1, chunk).max(dim=-1)               # (B, R)
    j = torch.argmax(m, dim=-1, keepdim=True)             # (B, 1): first chunk with the max
    return (j * chunk + i.gather(-1, j)).to(dtype=torch.int)


def multinomial_sample_one_no_sync(probs: Tensor) -> Tensor:
    """Sample one index per row without a host sync (exponential-race trick)."""
    q = torch.empty_like(probs).exponential_(1)
    return argmax_last(probs / q)


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None):
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    """Next token id (B, 1) from logits (B, T, V) at the last position; greedy if temp 0."""
    last = logits[:, -1]
    if temperature <= 0:
        return argmax_last(last)
    return multinomial_sample_one_no_sync(logits_to_probs(last, temperature, top_k))


# ----------------------------------------------------------------------------- decoding
def prefill(model, x: Tensor, input_pos: Tensor, temperature: float, top_k) -> Tensor:
    """The prompt's forward, dense at any prompt length (TEAL keeps prefill dense; a
    one-token prompt would otherwise look like a decode step), and its next token."""
    return sample(dense_forward(model, x, input_pos), temperature, top_k)


def dense_forward(model, x: Tensor, input_pos: Tensor) -> Tensor:
    """model(x, input_pos) with every projection dense (the prefill of a prompt)."""
    with configured(model, sparse=False):
        return model(x, input_pos)


def decode_one_token(model, x: Tensor, input_pos: Tensor, temperature: float, top_k) -> Tensor:
    # x: (B, 1); input_pos: (1,) (every sequence at one position) or (B, 1) (each its own)
    return sample(model(x, input_pos), temperature, top_k)


def decode_n_tokens(model, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int,
                    decode_fn, temperature: float, top_k, stop_ids=(), on_token=None) -> list[Tensor]:
    """Decode up to `num_new_tokens` after `cur_token` (B, 1); stops after a token in
    `stop_ids` (kept as the last one). `on_token(id)`, if given, gets each id as it is made."""
    new_tokens = []
    for _ in range(num_new_tokens):
        with _sdpa_math():
            next_token = decode_fn(model, cur_token, input_pos, temperature, top_k)
        input_pos += 1
        new_tokens.append(next_token.clone())
        cur_token = next_token.clone()
        if stop_ids or on_token is not None:
            tok = int(next_token[0, 0])
            if on_token is not None:
                on_token(tok)
            if tok in stop_ids:
                break
    return new_tokens


def _sdpa_math():
    if torch.cuda.is_available():
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.MATH])
        except ImportError:  # torch < 2.3
            pass
    return contextlib.nullcontext()


def check_generation_length(model, prompt_len: int, max_new_tokens: int) -> None:
    """Raise ValueError (one line naming the fix) unless a prompt of `prompt_len` tokens plus
    `max_new_tokens` fits the model's context (`config.block_size`)."""
    block = model.config.block_size
    if prompt_len < 1:
        raise ValueError("the prompt is empty: generation needs at least one prompt token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > block:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{prompt_len + max_new_tokens} tokens exceed the context length "
                         f"{block}; shorten the prompt or lower max_new_tokens")


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, decode_fn, temperature: float = 0.8,
             top_k: Optional[int] = 200, stop_ids=(), on_token=None) -> tuple[Tensor, dict]:
    """Prefill `prompt` (T,) int and decode up to `max_new_tokens`; returns (ids, timings).

    Generation ends after the first token in `stop_ids`, the prefill's token included (that
    token is the last of `ids`). `on_token(id)` gets every new id as it is made (for
    streaming); its time is left out of `decode_s`.

    Raises:
        ValueError: an empty or non-1-D prompt, `max_new_tokens` < 1, or prompt + new tokens
            beyond the model's context (`model.config.block_size`).
    """
    if prompt.dim() != 1:
        raise ValueError(f"prompt must be a 1-D tensor of token ids, got shape "
                         f"{tuple(prompt.shape)}")
    t = prompt.numel()
    check_generation_length(model, t, max_new_tokens)
    device = prompt.device
    max_seq = t + max_new_tokens
    with torch.device(device):
        model.setup_caches(max_batch_size=1, max_seq_length=max_seq)
    seq = torch.empty(max_seq, dtype=torch.int, device=device)
    seq[:t] = prompt
    input_pos = torch.arange(0, t, device=device)
    _sync(device)
    t0 = time.perf_counter()
    next_token = prefill(model, prompt.view(1, -1), input_pos, temperature, top_k).clone()
    _sync(device)
    t1 = time.perf_counter()
    seq[t] = next_token[0, 0]
    stop_ids = set(stop_ids or ())
    callback_s = [0.0]
    emit = None
    if on_token is not None:
        def emit(tok: int) -> None:
            c = time.perf_counter()
            on_token(tok)
            callback_s[0] += time.perf_counter() - c
    stopped = False
    if stop_ids or emit is not None:
        first = int(next_token[0, 0])
        if emit is not None:
            emit(first)
        stopped = first in stop_ids
    tokens = []
    callback_s[0] = 0.0
    t_dec = time.perf_counter()
    if not stopped:
        input_pos = torch.tensor([t], device=device, dtype=torch.int)
        tokens = decode_n_tokens(model, next_token.view(1, -1), input_pos, max_new_tokens - 1,
                                 decode_fn, temperature, top_k, stop_ids, emit)
    _sync(device)
    t2 = time.perf_counter()
    n = len(tokens)
    if n:
        seq[t + 1:t + 1 + n] = torch.cat(tokens).view(-1)
        stopped = bool(stop_ids) and int(seq[t + n]) in stop_ids
    return seq[:t + 1 + n], {"prefill_s": t1 - t0, "decode_s": t2 - t_dec - callback_s[0],
                             "decode_tokens": n, "stopped": stopped}


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens: int, decode_fn, temperature: float = 0.8,
                   top_k: Optional[int] = 200, stop_ids=()) -> tuple[list, dict]:
    """Generate for B prompts at once, each sequence at its own position in the KV cache.

    prompts: a sequence of B 1-D int tensors (token ids, lengths may differ), on one device.
    The prompts are right-padded to the longest and prefilled in one dense forward (a
    sequence's own tokens never attend to its padding: the causal mask ends at each token);
    sequence b's first token comes from the logits at its last prompt position, and its
    decode steps run at positions len_b, len_b + 1, ... (`input_pos` of shape (B, 1)), so its
    padding slots are overwritten before they could be attended. Each sequence stops after
    its own first token in `stop_ids` (kept as its last id); the batch runs until every
    sequence has stopped or made `max_new_tokens`. Per sequence the tokens equal a B = 1
    `generate` of that prompt, up to the floating-point rounding of batched products.

    Returns (ids, timings): ids[b] is prompt b followed by its new tokens (1-D, prompt's
    device); timings has prefill_s, decode_s (all decode steps), decode_tokens (list: new
    tokens per sequence after the prefill's, counted up to its stop), steps, and
    sequence_decode_s (list: seconds of decoding until that sequence stopped; equal to
    decode_s for every sequence when `stop_ids` is empty, as no step then reads the tokens
    on the host).

    Raises:
        ValueError: no prompts, a prompt that is empty or not 1-D, prompts on different
            devices, `max_new_tokens` < 1, or the longest prompt + new tokens beyond the
            model's context.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_batch needs at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.dim() != 1:
            raise ValueError(f"prompt {i} must be a 1-D tensor of token ids")
    device = prompts[0].device
    if any(p.device != device for p in prompts):
        raise ValueError("every prompt must be on the same device")
    lens = [p.numel() for p in prompts]
    for n in lens:
        check_generation_length(model, n, max_new_tokens)
    B, t_max = len(prompts), max(lens)
    check_generation_length(model, t_max, max_new_tokens)
    with torch.device(device):
        model.setup_caches(max_batch_size=B, max_seq_length=t_max + max_new_tokens)
    padded = torch.zeros(B, t_max, dtype=torch.int, device=device)
    for b, p in enumerate(prompts):
        padded[b, :lens[b]] = p
    lens_t = torch.tensor(lens, device=device)
    _sync(device)
    t0 = time.perf_counter()
    logits = dense_forward(model, padded, torch.arange(t_max, device=device))
    last = logits[torch.arange(B, device=device), lens_t - 1]         # (B, V)
    cur = sample(last.unsqueeze(1), temperature, top_k).clone()       # (B, 1)
    _sync(device)
    t1 = time.perf_counter()
    stop_ids = set(stop_ids or ())
    out = [cur]
    done = [False] * B
    made = [0] * B          # decode tokens per sequence (after the prefill's), up to its stop
    seq_s = [0.0] * B
    if stop_ids:
        for b, tok in enumerate(cur.view(-1).tolist()):
            done[b] = tok in stop_ids
    input_pos = lens_t.view(B, 1).to(torch.int)
    t_dec = time.perf_counter()
    steps = 0
    while steps < max_new_tokens - 1 and not all(done):
        with _sdpa_math():
            cur = decode_fn(model, cur, input_pos, temperature, top_k).clone()
        input_pos = input_pos + 1
        out.append(cur)
        steps += 1
        if stop_ids:
            now = time.perf_counter()
            for b, tok in enumerate(cur.view(-1).tolist()):
                if not done[b]:
                    made[b] += 1
                    done[b] = tok in stop_ids
                    if done[b]:
                        seq_s[b] = now - t_dec
    _sync(device)
    t2 = time.perf_counter()
    new = torch.cat(out, dim=1).cpu()                                 # (B, 1 + steps)
    ids = []
    for b in range(B):
        if not stop_ids:
            made[b], seq_s[b] = steps, t2 - t_dec
        elif not done[b]:
            seq_s[b] = t2 - t_dec
        ids.append(torch.cat([prompts[b], new[b, :1 + made[b]].to(device, prompts[b].dtype)]))
    return ids, {"prefill_s": t1 - t0, "decode_s": t2 - t_dec, "decode_tokens": made,
                 "steps": steps, "sequence_decode_s": seq_s}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- reporting
def skips_weight_rows(module) -> bool:
    """Does a sparse decode step of this SparseLinear read only the kept rows of its weight?
    Its row-skipping kernels do: a GPU kernel (every algorithm loads kept rows only) or the
    CPU kernel (`teal.kernels.cpu`); the exact torch path (`--kernels off`, a quantized
    format on the CPU, a dtype without a kernel) masks the input and then multiplies by the
    whole weight, reading every row, as does a call the dispatch table sends to the masked
    cuBLAS GEMM (algorithm "torch")."""
    launch = module._launch
    return bool(module.sparse) and ((launch is not None and launch.algo_name != "torch")
                                    or module.cpu_kernel_applies())


def bytes_per_decode_step(model, sparsity_by_proj: Optional[dict] = None) -> int:
    """Weight bytes one decode token reads on the path it runs: every parameter except the
    embedding table (only one row is read; a tied output head still reads it), with the stored
    weight bytes of each sparse projection that decodes through a row-skipping kernel
    (`skips_weight_rows`) scaled by its kept fraction (1 - effective sparsity of
    `sparsity_by_proj[name]`); a projection on the torch path reads all of them. Quantized
    projections count their codes (int8: 1 byte, int4: 1/2 byte per weight) and all their
    scales."""
    sparsity_by_proj = sparsity_by_proj or {}
    total, seen = 0.0, set()
    for m in sparse_linears(model):
        wt, scales = m._kernel_weight()
        per_weight = wt.element_size() * wt.shape[1] / sum(m.sizes)
        if m.wformat == "dense":
            seen.add(id(m.weight))
        skips = skips_weight_rows(m)
        for proj in m.projections():
            kept = 1.0 - sparsity_by_proj.get(proj.name, 0.0) if skips else 1.0
            total += proj.out_features * proj.in_features * per_weight * kept
        if scales is not None:
            total += scales.numel() * scales.element_size()
    head = getattr(model, "output", None)
    tied_head = isinstance(head, torch.nn.Linear) and head.weight is model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "tok_embeddings.weight" and not tied_head:
            continue
        total += p.numel() * p.element_size()
    return int(total)


@torch.no_grad()
def measure_effective_sparsity(model, ids: Tensor, prompt_len: int, aggregate=None) -> dict:
    """Per-projection-type fraction of zeroed inputs over the generated tokens.

    Teacher-forced in eager mode over the whole sequence with every token sparsified; the
    counts of the prompt positions are removed by a second pass over the prompt alone.
    `aggregate(model)`, if given, sums the counters across tensor-parallel ranks.
    """
    def run(x):
        configure(model, sparsify_prefill=True, track=True)
        model(x.view(1, -1))
        if aggregate is not None:
            aggregate(model)
        counts = {}
        for _, proj, p in model.projections():
            if p.sparse:
                c = counts.setdefault(proj, torch.zeros(2, dtype=torch.float64))
                c += p.counts.cpu()
        return counts

    if ids.numel() - 1 <= prompt_len:
        return {}  # no decode step ran (only the prefill's token)
    try:  # decode steps consumed positions prompt_len .. len-2 (the last token is never fed)
        full = run(ids[:-1])
        pre = run(ids[:prompt_len])
    finally:
        configure(model, sparsify_prefill=False, track=False)
    return {p: ((full[p][0] - pre[p][0]) / max((full[p][1] - pre[p][1]).item(), 1)).item()
            for p in full}
