"""Calibration: stream histograms of every projection input through a dense forward pass.

TEAL (arXiv 2408.14690, Section 3.2) sets each projection's threshold to a quantile of |x|
of its input over calibration text. `collect_histograms` runs the model dense over windows
of calibration tokens and, through forward pre-hooks registered here (the model and
`SparseLinear` carry no calibration logic), accumulates into a `teal.thresholds.Calibration`:

- `hist` (n_layer, 4, n_bins): |x| of the four distinct inputs per block (attention input =
  input of q_proj, attention output = input of o_proj, MLP input = input of gate_proj, MLP
  intermediate = input of down_proj);
- `extra_tensors["hist_weighted"]` (n_layer, 7, n_bins), optional: the weight-informed score
  |x_i| * ||W[:, i]||_2 of each of the seven projections (WINA, arXiv 2505.19427), whose
  column norms differ per projection even where the input is shared.

Memory is bounded by one window's activations plus the histograms, whatever the token count.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from teal.projections import INPUT_SPECS, PROJECTIONS, input_module
from teal.rope import precompute_freqs_cis
from teal.sparse_linear import configured
from teal.thresholds import WEIGHTED_KEY, Calibration, update_histogram


class TextTooShortError(ValueError):
    """The text has fewer tokens than a run needs."""


class TextFileError(ValueError):
    """A text file that is missing, a directory, or not UTF-8 text."""


def check_text_file(text_path, flag: str = "--text") -> None:
    """Raise TextFileError (one line) unless `text_path` is an existing regular file."""
    path = Path(text_path)
    if not path.exists():
        raise TextFileError(f"{flag} {path} not found; pass an existing text file")
    if path.is_dir():
        raise TextFileError(f"{flag} {path} is a directory; pass a text file")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def token_windows(token_ids: Tensor, seq_len: int, max_tokens: Optional[int] = None,
                  min_len: int = 1) -> list[Tensor]:
    """Non-overlapping windows (1-D views) of the first `max_tokens` ids; the last window may
    be shorter than `seq_len` and is dropped when it has fewer than `min_len` tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    ids = token_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [w for w in ids.split(seq_len) if w.numel() >= min_len]


@contextlib.contextmanager
def _no_kv_cache(model):
    caches = [b.attention.kv_cache for b in model.layers]
    for b in model.layers:
        b.attention.kv_cache = None
    try:
        yield
    finally:
        for b, c in zip(model.layers, caches):
            b.attention.kv_cache = c


def rope_and_mask(model, seqlen: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(input_pos, freqs_cis, causal mask) of a plain causal forward over `seqlen` tokens."""
    cfg = model.config
    freqs = precompute_freqs_cis(seqlen, cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    pos = torch.arange(seqlen, device=device)
    mask = torch.tril(torch.ones(seqlen, seqlen, dtype=torch.bool, device=device))
    return pos, freqs.to(device), mask


@torch.no_grad()
def block_inputs(model, idx: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Yield (layer, hidden state entering that block) for token ids `idx` (B, T); the final
    norm and output head are skipped (calibration never needs logits)."""
    pos, freqs, mask = rope_and_mask(model, idx.shape[1], idx.device)
    with _no_kv_cache(model):
        x = model.tok_embeddings(idx)
        for i, layer in enumerate(model.layers):
            yield i, x
            x = layer(x, pos, freqs, mask)


class HistogramCollector:
    """Forward pre-hooks that add projection inputs to a `Calibration` (use as a context).

    Args:
        model: a `model.Transformer`.
        calib: the Calibration to accumulate into (its `hist`, and with `weighted` its
            `extra_tensors["hist_weighted"]`, created if missing).
        weighted: also histogram |x_i| * ||W[:, i]||_2 of each of the seven projections.
    """

    def __init__(self, model, calib: Calibration, weighted: bool = True):
        self.model = model
        self.calib = calib
        self.weighted = weighted
        self._handles = []
        n_layer, _, n_bins = calib.hist.shape
        if weighted and WEIGHTED_KEY not in calib.extra_tensors:
            calib.extra_tensors[WEIGHTED_KEY] = torch.zeros(n_layer, len(PROJECTIONS), n_bins,
                                                            dtype=torch.float64)
            calib.meta.setdefault("extra", {})[WEIGHTED_KEY] = dict(
                projections=list(PROJECTIONS),
                score="|x_i| * ||W[:, i]||_2 (WINA, arXiv 2505.19427)")

    def _hook(self, layer: int, spec, module):
        """Pre-hook of one input's module: its input's |x| histogram and, with `weighted`,
        each of its projections' score histograms."""
        lo, hi = self.calib.bins["lo"], self.calib.bins["hi"]
        weighted = []
        if self.weighted:
            for proj in module.projections():
                hist = self.calib.extra_tensors[WEIGHTED_KEY][layer, PROJECTIONS.index(proj.name)]
                weighted.append((hist, proj.column_norms()))

        def hook(_module, args):
            x = args[0]
            self.calib.update(layer, spec.name, x)
            for hist, norms in weighted:
                local = torch.zeros(hist.numel(), dtype=torch.float64, device=x.device)
                update_histogram(local, x.float().abs() * norms.to(x.device), lo, hi)
                hist.add_(local.cpu())
        return hook

    def __enter__(self):
        for layer, block in enumerate(self.model.layers):
            for spec in INPUT_SPECS:
                module = input_module(block, spec.name)
                self._handles.append(module.register_forward_pre_hook(self._hook(layer, spec, module)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


@torch.no_grad()
def collect_histograms(model, token_ids: Tensor, seq_len: int = 2048, *,
                       max_tokens: Optional[int] = None, calib: Optional[Calibration] = None,
                       weighted: bool = True, device=None, progress: bool = True,
                       text_meta: Optional[dict] = None) -> Calibration:
    """Histogram every projection input of a dense forward over `token_ids`.

    Args:
        model: a `model.Transformer`; it is run dense (its sparsity flags are restored after).
        token_ids: 1-D int tensor of calibration tokens.
        seq_len: window length; windows do not overlap (the last one may be shorter).
        max_tokens: use at most this many tokens.
        calib: accumulate into this Calibration (default: a new empty one for the model).
        weighted: also collect the weight-informed score histograms (`hist_weighted`).
        device: where to run (default: the model's device).
        progress: show a tqdm bar.
        text_meta: stored as `meta["text"]` (e.g. path and sha256 of the source text).

    Returns:
        The Calibration, with `meta["tokens"]` increased by the number of tokens seen.
    """
    from tqdm import tqdm

    device = device or model.tok_embeddings.weight.device
    if calib is None:
        calib = Calibration.empty(model.config.to_dict(), model.config.n_layer)
    windows = token_windows(token_ids, seq_len, max_tokens)
    with configured(model, sparse=False, track=False), HistogramCollector(model, calib, weighted):
        for w in tqdm(windows, desc="calibrate", unit="win", disable=not progress):
            for layer, x in block_inputs(model, w[None].to(device)):
                calib.update_absmax(layer, "residual", x)
            calib.meta["tokens"] = calib.meta.get("tokens", 0) + w.numel()
    if text_meta is not None:
        calib.meta["text"] = text_meta
    return calib


def load_token_ids(text_path, checkpoint_path, ckpt_meta: dict) -> Tensor:
    """Read a text file whole and tokenize it once, without BOS: 1-D int64 tensor.

    The text is a document, not a prompt: special-token strings written in it (an
    end-of-turn marker quoted in an article) are encoded as the ordinary text they are.
    `ckpt_meta` is the checkpoint's meta dict (its "tokenizer" record picks the backend)."""
    from teal.tokenizer import load_tokenizer
    check_text_file(text_path, "text")
    tok = load_tokenizer(Path(checkpoint_path).parent, ckpt_meta)
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"text {text_path} is not UTF-8 text (undecodable byte at offset "
                            f"{e.start}); pass a plain-text file") from None
    return torch.tensor(tok.encode(text, special=False, bos=False), dtype=torch.long)


def check_enough_tokens(n: int, needed: int, what: str, text_path) -> None:
    """Raise TextTooShortError (one line) when `n` < `needed` tokens."""
    if n < needed:
        raise TextTooShortError(f"{text_path} has only {n} tokens, {what} needs at least "
                                f"{needed}; use a longer text or lower the minimum")


def source_meta(text_path, n_tokens: int, **extra) -> dict:
    """Metadata describing calibration text: path, sha256, tokens used."""
    return dict(path=str(text_path), sha256=sha256_file(text_path), tokens=n_tokens, **extra)


__all__: Sequence[str] = ["collect_histograms", "HistogramCollector", "block_inputs",
                          "token_windows",
                          "TextTooShortError", "TextFileError", "check_text_file", "load_token_ids",
                          "source_meta", "sha256_file",
                          "rope_and_mask", "check_enough_tokens"]
