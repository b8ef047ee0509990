"""TEAL thresholds: activation histograms, their inverse CDF, and the calibration file.

TEAL (arXiv 2408.14690, Section 3.1-3.2) zeroes the entries of a projection input x with
|x| <= t, where t is the s-quantile of |x| over calibration tokens for target sparsity s.
We stream histograms of |x| with log-spaced bins (bounded memory, any number of tokens) for
the four distinct projection inputs of each block:

    attn_in  (input of q_proj, k_proj, v_proj)   attn_out (input of o_proj)
    mlp_in   (input of gate_proj, up_proj)       mlp_mid  (silu(gate) * up, input of down_proj)

and invert the CDF at load time, so one calibration file serves every sparsity level.

File format (`thresholds.safetensors`, written atomically next to the checkpoint):
    tensor `hist`: float64 (n_layer, 4, n_bins) counts, inputs in the order of `INPUTS`;
    metadata `teal`: JSON with `format`, `model` (ModelArgs dict), `n_layer`, `tokens`,
    `text` (calibration source), `bins` ({lo, hi, n}), and free-form `extra`.
    tensor `hist_weighted` (optional): float64 (n_layer, 7, n_bins) histograms of the
    weight-informed score |x_i| * ||W[:, i]||_2 of every projection (order `PROJECTIONS`).
    tensor `absmax` (optional, written by every calibration since issue 14): float64
    (n_layer, 5) max |x| seen of the four inputs (order `INPUTS`) and of the residual stream
    entering the block (`ABSMAX_COLUMNS`): what loading in float16 checks (`fp16_overflow`).
    Every tensor is validated on load (shape, finite, non-negative, no empty histogram).

An input that is all zero on the calibration text (its whole histogram in the lowest bin)
gets threshold 0 (nothing that is non-zero elsewhere is dropped) and a warning, not a
quantile of nothing.

Scoring (which entries of x a projection with weight W zeroes, `projection_threshold`):
- "magnitude": |x_i| <= t, t the s-quantile of |x| of that input (TEAL);
- "weight": |x_i| * ||W[:, i]||_2 <= t_w (WINA, arXiv 2505.19427), t_w the s-quantile of the
  score, applied as the per-channel threshold t_w / ||W[:, i]||_2 that the kernels read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

import warnings

from teal.io import atomic_write
from teal.projections import INPUT_OF, INPUTS, PROJECTIONS
from teal.sparse_linear import set_thresholds

FORMAT = "teal-thresholds/1"
WEIGHTED_KEY = "hist_weighted"
ABSMAX_KEY = "absmax"
ABSMAX_COLUMNS = (*INPUTS, "residual")
FP16_MAX = 65504.0
# float16 is refused when a calibrated max |x| exceeds FP16_MAX / FP16_HEADROOM: other text
# can go beyond what the calibration text showed, and a projection's output is wider still.
FP16_HEADROOM = 4.0
SCORINGS = ("magnitude", "weight")

# Log-spaced bins of |x| in [LO, HI): 12 decades in 8192 bins, ~0.34% relative width.
# Bin 0 also holds everything below LO (including exact zeros), the last bin everything >= HI.
DEFAULT_BINS = dict(lo=1e-7, hi=1e5, n=8192)


class ThresholdsError(ValueError):
    """A thresholds file that is missing, corrupt, or made for another model."""


def bin_indices(a: Tensor, lo: float, hi: float, n: int) -> Tensor:
    """Bin index (int64) of each non-negative value of `a` for log-spaced bins."""
    la = torch.log(a.float().clamp_min(lo))
    idx = ((la - math.log(lo)) * (n / (math.log(hi) - math.log(lo)))).long()
    return idx.clamp_(0, n - 1)


def update_histogram(hist: Tensor, x: Tensor, lo: float, hi: float) -> None:
    """Add |x| (any shape) to `hist` (n_bins,) float64 in place."""
    idx = bin_indices(x.detach().abs().reshape(-1), lo, hi, hist.numel())
    hist += torch.bincount(idx, minlength=hist.numel()).to(hist)


def histogram_quantile(hist: Tensor, s: float, lo: float, hi: float) -> float:
    """Threshold t with a fraction `s` of the histogram's mass at or below t.

    Linear interpolation in log space inside the bin; s == 0 gives 0.0 (dense).

    Raises:
        ValueError: s outside [0, 1) or an empty histogram.
    """
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {s}")
    if s == 0.0:
        return 0.0
    h = hist.double().cpu()
    total = h.sum().item()
    if total <= 0:
        raise ValueError("empty histogram (calibrated on 0 tokens?); re-run calibrate.py with "
                         "--max_tokens >= 1")
    if h[0].item() >= total:  # all zero (below lo): no quantile to take, keep every non-zero
        return 0.0
    cdf = torch.cumsum(h, 0) / total
    i = int(torch.searchsorted(cdf, torch.tensor([s], dtype=cdf.dtype)).item())
    i = min(i, h.numel() - 1)
    prev = cdf[i - 1].item() if i > 0 else 0.0
    frac = (s - prev) / max(cdf[i].item() - prev, 1e-300)
    n = h.numel()
    log_lo, step = math.log(lo), (math.log(hi) - math.log(lo)) / n
    if i == 0:  # everything below lo: threshold lo keeps all values above it
        return lo
    return math.exp(log_lo + (i + min(max(frac, 0.0), 1.0)) * step)


@dataclass
class Calibration:
    """Histograms of |x| for the four projection inputs of every block, plus metadata.

    Attributes:
        hist: float64 (n_layer, 4, n_bins) counts (inputs ordered as `INPUTS`).
        meta: dict with `model` (ModelArgs dict), `tokens`, `text`, `bins`, ...
        extra_tensors: other tensors of the file (kept on save).
    """

    hist: Tensor
    meta: dict
    extra_tensors: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, model_args: dict, n_layer: int, bins: Optional[dict] = None) -> "Calibration":
        bins = dict(bins or DEFAULT_BINS)
        hist = torch.zeros(n_layer, len(INPUTS), bins["n"], dtype=torch.float64)
        return cls(hist, dict(format=FORMAT, model=model_args, n_layer=n_layer, tokens=0,
                              text=None, bins=bins))

    @property
    def bins(self) -> dict:
        return self.meta["bins"]

    def update(self, layer: int, input_name: str, x: Tensor) -> None:
        """Accumulate |x| into the histogram of `input_name` at `layer` (x on any device), and
        its max |x| into `absmax`."""
        h = self.hist[layer, INPUTS.index(input_name)]
        local = torch.zeros(h.numel(), dtype=torch.float64, device=x.device)
        update_histogram(local, x, self.bins["lo"], self.bins["hi"])
        h += local.cpu()
        self.update_absmax(layer, input_name, x)

    def update_absmax(self, layer: int, column: str, x: Tensor) -> None:
        """Raise the recorded max |x| of `column` (an input of `INPUTS` or "residual")."""
        if ABSMAX_KEY not in self.extra_tensors:
            self.extra_tensors[ABSMAX_KEY] = torch.zeros(self.hist.shape[0], len(ABSMAX_COLUMNS),
                                                         dtype=torch.float64)
        if x.numel():
            m = self.extra_tensors[ABSMAX_KEY]
            j = ABSMAX_COLUMNS.index(column)
            m[layer, j] = max(m[layer, j].item(), float(x.detach().abs().max().float()))

    def zero_inputs(self) -> list[tuple[int, str]]:
        """(layer, input) pairs whose every calibration value was zero (below `bins.lo`)."""
        h = self.hist.double()
        zero = (h[..., 0] >= h.sum(-1)) & (h.sum(-1) > 0)
        return [(layer, INPUTS[i]) for layer, i in zero.nonzero().tolist()]

    def fp16_overflow(self, headroom: float = FP16_HEADROOM) -> Optional[str]:
        """Why float16 is unsafe for this model, or None: a recorded max |x| above
        FP16_MAX / headroom (one line naming the largest); a file without the record says
        so too.
        """
        m = self.extra_tensors.get(ABSMAX_KEY)
        if m is None:
            return ("the calibration file has no max |x| record (made before it was "
                    "recorded), so float16 cannot be checked; re-run calibrate.py")
        limit = FP16_MAX / headroom
        if float(m.max()) <= limit:
            return None
        flat = int(m.argmax())
        layer, col = divmod(flat, m.shape[1])
        return (f"max |x| {float(m.max()):.4g} of layer {layer} {ABSMAX_COLUMNS[col]} on the "
                f"calibration text is beyond float16's safe range ({limit:.0f} = {FP16_MAX:.0f}"
                f"/{headroom:g})")

    def threshold(self, layer: int, input_name: str, sparsity: float) -> float:
        """Threshold giving `sparsity` on the calibration distribution of that input.

        Raises:
            ThresholdsError: the histogram is empty (a calibration on no tokens).
        """
        h = self.hist[layer, INPUTS.index(input_name)]
        if sparsity > 0 and float(h.double().sum()) <= 0:
            raise ThresholdsError(f"the thresholds histogram of layer {layer} {input_name} is "
                                  f"empty (calibrated on 0 tokens?); re-run calibrate.py with "
                                  f"--max_tokens >= 1")
        return self._quantile(h, sparsity, f"layer {layer} {input_name}")

    def _quantile(self, h: Tensor, sparsity: float, what: str) -> float:
        t = histogram_quantile(h, sparsity, self.bins["lo"], self.bins["hi"])
        if sparsity > 0 and t == 0.0:
            warnings.warn(f"{what} is all zero on the calibration text: threshold 0 (only "
                          f"exact zeros are dropped), not {sparsity:.0%} of nothing",
                          stacklevel=3)
        return t

    def weighted_histograms(self) -> Tensor:
        """The (n_layer, 7, n_bins) weight-informed score histograms (order `PROJECTIONS`).

        Raises:
            ThresholdsError: the file was calibrated without them.
        """
        h = self.extra_tensors.get(WEIGHTED_KEY)
        if h is None or h.dim() != 3 or h.shape[:2] != (self.hist.shape[0], len(PROJECTIONS)):
            raise ThresholdsError("the thresholds file has no weight-informed histograms "
                                  f"({WEIGHTED_KEY}); re-run calibrate.py (without --no-weighted)")
        return h

    def projection_threshold(self, layer: int, proj: str, sparsity: float,
                             scoring: str = "magnitude", norms: Optional[Tensor] = None):
        """Threshold of projection `proj` of block `layer` for `sparsity` under `scoring`:
        a float (magnitude), or the fp32 (in_features,) tensor t_w / ||W[:, i]||_2 (weight;
        `norms` are the projection's column norms, `Projection.column_norms()`).

        Raises:
            ValueError: unknown scoring, or weight scoring without norms.
            ThresholdsError: empty histograms, or no weight-informed histograms.
        """
        if scoring == "magnitude":
            return self.threshold(layer, INPUT_OF[proj], sparsity)
        if scoring != "weight":
            raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
        if norms is None:
            raise ValueError("weight-informed scoring needs the projection's column norms")
        hist = self.weighted_histograms()[layer, PROJECTIONS.index(proj)]
        t = self._quantile(hist, sparsity, f"layer {layer} {proj} (weight-informed score)")
        # A zero column never contributes: any threshold is exact, keep it finite.
        return t / norms.float().clamp_min(1e-30)

    def save(self, path) -> None:
        """Write atomically (temp file + rename) as safetensors with JSON metadata.

        The file gets the mode a plain open() would give (safetensors itself writes 0600).

        Raises:
            OSError: the folder does not exist or is not writable (nothing is written).
        """
        from safetensors.torch import save_file
        tensors = {"hist": self.hist.contiguous(), **{k: v.contiguous() for k, v in
                                                       self.extra_tensors.items()}}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                                 metadata={"teal": json.dumps(self.meta)}))

    @classmethod
    def load(cls, path, model_args: Optional[dict] = None) -> "Calibration":
        """Load and (with `model_args`) validate against the model it will be applied to.

        Raises:
            ThresholdsError: missing/corrupt file or a mismatch with `model_args`
                (different layer count or widths), with the fix in the message.
        """
        path = Path(path)
        if not path.exists():
            raise ThresholdsError(f"thresholds file {path} not found; create it with "
                                  f"`python calibrate.py --checkpoint_path <model.pth>`")
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("teal", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
            raise ThresholdsError(f"thresholds file {path} is unreadable ({e.__class__.__name__});"
                                  f" delete it and re-run calibrate.py") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "hist" not in tensors:
            raise ThresholdsError(f"{path} is not a TEAL thresholds file ({FORMAT}); "
                                  f"re-run calibrate.py")
        hist = tensors.pop("hist")
        calib = cls(hist, meta, tensors)
        if model_args is not None:  # "made for another model" is the more useful message
            calib.check_model(model_args, path)
        _check_histograms(hist, meta, path, tensors)
        return calib

    def check_model(self, model_args: dict, path="thresholds") -> None:
        """Raise ThresholdsError unless the file was calibrated on this architecture."""
        mine = self.meta.get("model") or {}
        keys = ("n_layer", "dim", "intermediate_size", "n_head", "n_local_heads", "head_dim")
        diffs = [f"{k} {mine.get(k)} != {model_args.get(k)}" for k in keys
                 if mine.get(k) != model_args.get(k)]
        if self.hist.shape[0] != model_args.get("n_layer"):
            diffs.append(f"{self.hist.shape[0]} layers of histograms")
        if diffs:
            raise ThresholdsError(f"thresholds file {path} was made for another model "
                                  f"({'; '.join(diffs)}); re-run calibrate.py for this checkpoint")


def _check_histograms(hist: Tensor, meta: dict, path, extra: Optional[dict] = None) -> None:
    """Raise ThresholdsError (naming the file and the fix) unless every field is valid:
    `meta["bins"]` a valid {lo, hi, n}, `n_layer` and `tokens` non-negative integers, `hist`
    (n_layer, 4, n) and `hist_weighted` (n_layer, 7, n) finite, non-negative and without an
    empty histogram, `absmax` (n_layer, 5) finite and non-negative, no other tensor."""
    fix = "delete it and re-run calibrate.py"
    bins = meta.get("bins")
    try:
        lo, hi, n = float(bins["lo"]), float(bins["hi"]), int(bins["n"])
        ok = 0 < lo < hi and n >= 1 and math.isfinite(hi)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ThresholdsError(f"thresholds file {path} has no valid `bins` metadata "
                              f"({bins!r}); {fix}")
    for key in ("n_layer", "tokens"):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ThresholdsError(f"thresholds file {path} has an invalid `{key}` ({v!r}); {fix}")
    n_layer = meta.get("n_layer")
    extra = dict(extra or {})
    unknown = sorted(set(extra) - {WEIGHTED_KEY, ABSMAX_KEY})
    if unknown:
        raise ThresholdsError(f"thresholds file {path} has unknown tensors {unknown}; {fix}")
    tensors = [("hist", hist, (n_layer, len(INPUTS), n), "(n_layer, inputs, bins)", INPUTS)]
    if WEIGHTED_KEY in extra:
        tensors.append((WEIGHTED_KEY, extra[WEIGHTED_KEY], (n_layer, len(PROJECTIONS), n),
                        "(n_layer, projections, bins)", PROJECTIONS))
    if ABSMAX_KEY in extra:
        tensors.append((ABSMAX_KEY, extra[ABSMAX_KEY], (n_layer, len(ABSMAX_COLUMNS)),
                        "(n_layer, inputs + residual)", None))
    for key, t, want, dims, names in tensors:
        if tuple(t.shape) != want:
            raise ThresholdsError(f"thresholds file {path} has `{key}` of shape "
                                  f"{tuple(t.shape)}, expected {want} {dims}; {fix}")
        h = t.double()
        if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
            raise ThresholdsError(f"thresholds file {path} has negative or non-finite values in "
                                  f"`{key}`; {fix}")
        if names is None:
            continue
        empty = (h.sum(-1) <= 0).nonzero().tolist()
        if empty:
            layer, i = empty[0]
            raise ThresholdsError(f"thresholds file {path} has an empty `{key}` histogram "
                                  f"(layer {layer} {names[i]}, {len(empty)} empty in all; "
                                  f"calibrated on 0 tokens?); re-run calibrate.py with "
                                  f"--max_tokens >= 1")


def apply_uniform_sparsity(model, calib: Calibration, sparsity: float,
                           scoring: str = "magnitude") -> dict:
    """Set every projection's threshold for `sparsity` (TEAL's uniform allocation).

    With sparsity 0 the model is left dense (`sparse=False`). Returns {(layer, proj): t}.

    Raises:
        ValueError: sparsity outside [0, 1).
    """
    return apply_sparsities(model, calib, {p: sparsity for p in PROJECTIONS}, scoring)


def apply_sparsities(model, calib: Calibration, sparsity, scoring: str = "magnitude") -> dict:
    """Set thresholds (and calibrated sparsities) from per-projection sparsities.

    Args:
        model: a `model.Transformer` (anything with `projections()`).
        sparsity: a mapping proj -> s (same for every layer) or a callable (layer, proj) -> s.
        scoring: "magnitude" or "weight" (see `Calibration.projection_threshold`).

    Returns {(layer, proj): threshold}. A module whose projections are all at 0 runs dense.

    Raises:
        ValueError: a sparsity outside [0, 1), an unknown scoring.
    """
    get = sparsity if callable(sparsity) else (lambda layer, proj: sparsity[proj])
    values, out = {}, {}
    for layer, proj, p in model.projections():
        s = float(get(layer, proj))
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity of layer {layer} {proj} must be in [0, 1), got {s}")
        norms = p.column_norms() if scoring == "weight" else None
        t = calib.projection_threshold(layer, proj, s, scoring, norms)
        values[p] = (t, s)
        out[(layer, proj)] = t
    set_thresholds(values)
    return out
