"""Generation-quality evaluation: greedy continuations of a prompt set, judged against dense.

Every configuration (dense first, as the reference) decodes a greedy continuation of each
prompt with `teal.generation.generate` (dense prefill, sparse decode, a fixed number of new
tokens, stopping after an end token as generate.py does). Each continuation is scored by:

- `dense_perplexity`: the dense model's perplexity of the continuation given the prompt
  (teacher-forced; only the continuation's tokens are predicted). A sparse model that drifts
  into text the dense model finds unlikely scores high.
- `repeated_ngram_rate`: the fraction of the continuation's n-grams (n = 4) that already
  occurred earlier in it (degenerate loops score near 1).
- `agreement`: tokens until the first divergence from the dense continuation.

The measured parameter-weighted sparsity over the generated tokens comes from the projections'
counters (`SparseLinear.track`), read by `teal.evaluation.parameter_weighted_sparsity`.
A continuation here is the list of new token ids, the end token that stopped it included
(stopping early is part of what is compared); its text is decoded without that token.

Prompt files are JSON lines: {"id": str, "kind": "chat" | "plain", "domain": str,
"text": str}; chat prompts are wrapped in the checkpoint's chat template.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.evaluation import parameter_weighted_sparsity
from teal.generation import decode_one_token, generate
from teal.sparse_linear import configure, configured

__all__ = ["Prompt", "PromptFileError", "load_prompts", "encode_prompt", "dense_perplexity",
           "repeated_ngram_rate", "agreement", "greedy_continuation", "run_configuration",
           "score_configuration", "summarize"]

KINDS = ("chat", "plain")
FIELDS = ("id", "kind", "domain", "text")


class PromptFileError(ValueError):
    """A prompt file that is missing, unreadable or malformed (one line naming the place)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str    # "chat" or "plain"
    domain: str
    text: str


# ----------------------------------------------------------------------------- prompts
def load_prompts(path) -> list[Prompt]:
    """Read a JSON-lines prompt file (blank lines skipped).

    Each line is an object with string fields "id" (unique), "kind" ("chat" or "plain"),
    "domain" and "text" (non-empty); other keys are ignored.

    Raises:
        PromptFileError: the file is missing, a directory, not UTF-8, has no prompt, or a line
            that is not valid JSON, not an object, lacks a field, has a field of the wrong
            type or value, or repeats an id; the message names the file and the line number.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} not found; pass --prompts PATH") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompt file {path} is a directory; pass a .jsonl file") from None
    except OSError as e:
        raise PromptFileError(f"cannot read prompt file {path} ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text (byte 0x{data[e.start]:02x}"
                              f" at offset {e.start})") from None
    prompts, seen = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}: expected a JSON object with fields "
                                  f"{', '.join(FIELDS)}, got {type(obj).__name__}")
        for field in FIELDS:
            if field not in obj:
                raise PromptFileError(f"{where}: missing field {field!r}")
            if not isinstance(obj[field], str):
                raise PromptFileError(f"{where}: field {field!r} must be a string, got "
                                      f"{type(obj[field]).__name__}")
        if obj["kind"] not in KINDS:
            raise PromptFileError(f"{where}: kind must be 'chat' or 'plain', got {obj['kind']!r}")
        if not obj["text"] or not obj["id"]:
            raise PromptFileError(f"{where}: empty {'text' if obj['id'] else 'id'}")
        if obj["id"] in seen:
            raise PromptFileError(f"{where}: id {obj['id']!r} already used on line "
                                  f"{seen[obj['id']]}")
        seen[obj["id"]] = n
        prompts.append(Prompt(obj["id"], obj["kind"], obj["domain"], obj["text"]))
    if not prompts:
        raise PromptFileError(f"prompt file {path} has no prompts")
    return prompts


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of a prompt as generate.py encodes one: a chat prompt wrapped in the
    tokenizer's chat template when `chat` and the tokenizer has one, special-token strings
    mapped to their ids, one BOS where the tokenizer adds it."""
    text = prompt.text
    if chat and prompt.kind == "chat" and tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template(text)
    return tokenizer.encode(text, special=True)


# ----------------------------------------------------------------------------- metrics
@torch.no_grad()
def dense_perplexity(model, prompt_ids, continuation_ids) -> float:
    """The dense model's perplexity of a continuation given its prompt.

    One teacher-forced causal forward over prompt + continuation with every projection dense
    (the thresholds and flags of `model` are restored afterwards); exp of the mean NLL of the
    continuation's tokens only (the first one predicted from the prompt's last position).

    Args:
        model: a `model.Transformer`.
        prompt_ids: (P,) token ids (tensor or sequence of int), P >= 1.
        continuation_ids: (C,) token ids, C >= 1; P + C must fit the model's context.

    Returns:
        A float >= 1 (computed in float32 from the model's float32 logits).

    Raises:
        ValueError: an empty prompt or continuation, or more tokens than the context.
    """
    p = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    c = torch.as_tensor(continuation_ids, dtype=torch.long).reshape(-1)
    if p.numel() < 1 or c.numel() < 1:
        raise ValueError(f"dense_perplexity needs a prompt and a continuation of at least one "
                         f"token, got {p.numel()} and {c.numel()}")
    device = model.tok_embeddings.weight.device
    x = torch.cat([p, c]).to(device)
    with configured(model, sparse=False):
        logits = model(x[None])[0]                      # (P + C, vocab) fp32
    pred = logits[p.numel() - 1:-1].float()             # positions that predict c
    nll = F.cross_entropy(pred, x[p.numel():], reduction="mean")
    return math.exp(nll.item())


def repeated_ngram_rate(ids, n: int = 4) -> float:
    """Fraction of the n-grams of `ids` (a sequence or 1-D tensor of token ids) that already
    occurred at an earlier position of `ids` (overlapping occurrences count).

    0.0 for no repeat; 0.0 by definition when `ids` has fewer than n + 1 tokens (fewer than
    two n-grams). Raises ValueError for n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ids = [int(t) for t in (ids.tolist() if isinstance(ids, Tensor) else ids)]
    if len(ids) < n + 1:
        return 0.0
    seen, repeated = set(), 0
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


def agreement(ids, dense_ids) -> int:
    """Number of leading tokens of `ids` equal to `dense_ids` (both sequences or 1-D tensors
    of token ids): the index of the first divergence, or the shorter length when one is a
    prefix of the other (identical sequences: their length)."""
    a = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    b = dense_ids.tolist() if isinstance(dense_ids, Tensor) else list(dense_ids)
    k = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        k += 1
    return k


# ----------------------------------------------------------------------------- generation
def greedy_continuation(model, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids=(),
                        decode_fn: Callable = decode_one_token) -> tuple[list[int], bool]:
    """Greedy (temperature 0) continuation of a prompt with the model as configured.

    Args:
        prompt_ids: the prompt's token ids (P >= 1).
        max_new_tokens: new tokens at most (>= 1); P + max_new_tokens must fit the context.
        stop_ids: end-token ids; generation stops after the first one (kept in the output).

    Returns:
        (new token ids, stopped at an end token).

    Raises:
        ValueError: an empty prompt, max_new_tokens < 1, or too long for the context.
    """
    device = model.tok_embeddings.weight.device
    prompt = torch.tensor(list(prompt_ids), dtype=torch.int, device=device)
    seq, tm = generate(model, prompt, max_new_tokens, decode_fn, temperature=0.0, top_k=None,
                       stop_ids=set(stop_ids))
    return seq[prompt.numel():].tolist(), bool(tm["stopped"])


def run_configuration(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                      stop_ids=(), sparse: bool = True, progress: Optional[Callable] = None
                      ) -> tuple[list[tuple[list[int], bool]], Optional[float]]:
    """Generate every prompt's greedy continuation with the model's current thresholds.

    The prompt is prefilled densely and every decode step runs sparse (as generate.py);
    counters are on while decoding (`configure(track=True)`, so decode runs the exact torch
    path rather than the Triton kernels), so the sparsity is measured on exactly the
    projection inputs of the generated tokens. `sparse=False` runs dense.

    Returns:
        ([(new ids, stopped) per prompt], measured parameter-weighted sparsity over all
        decode steps: None for a dense run or when no decode step ran).
    """
    configure(model, sparsify_prefill=False, track=sparse)
    if not sparse:
        configure(model, sparse=False)
    out = []
    try:
        for ids in prompt_ids:
            out.append(greedy_continuation(model, ids, max_new_tokens, stop_ids))
            if progress is not None:
                progress()
        measured = parameter_weighted_sparsity(model) if sparse else None
    finally:
        configure(model, track=False)
    if measured is not None and measured != measured:  # NaN: no decode step saw an input
        measured = None
    return out, measured


def score_configuration(model, prompt_ids: Sequence[Sequence[int]], continuations,
                        dense_continuations, n: int = 4) -> list[dict]:
    """Per-prompt metrics of one configuration's continuations (list of (ids, stopped), as
    `run_configuration` returns) against the dense ones: dict(new_tokens, stopped,
    dense_perplexity, repeated_ngram_rate, agreement)."""
    rows = []
    for p, (ids, stopped), (dense, _) in zip(prompt_ids, continuations, dense_continuations):
        rows.append(dict(new_tokens=len(ids), stopped=stopped,
                         dense_perplexity=dense_perplexity(model, p, ids),
                         repeated_ngram_rate=repeated_ngram_rate(ids, n),
                         agreement=agreement(ids, dense)))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Means over prompts of the per-prompt metrics of `score_configuration`."""
    k = len(rows)
    if not k:
        return {}
    return dict(mean_dense_perplexity=sum(r["dense_perplexity"] for r in rows) / k,
                mean_repeated_ngram_rate=sum(r["repeated_ngram_rate"] for r in rows) / k,
                mean_agreement=sum(r["agreement"] for r in rows) / k,
                mean_new_tokens=sum(r["new_tokens"] for r in rows) / k,
                stopped=sum(bool(r["stopped"]) for r in rows))
