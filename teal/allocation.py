"""Apply a sparsity configuration (allocation x scoring) to a model's projection thresholds.

Allocation: how a model-level target sparsity is split among the projections.
- "uniform": every projection at the target (TEAL's uniform baseline).
- "greedy": per-layer, per-projection sparsities found by TEAL's block-wise greedy search
  (`teal.greedy`, file `greedy.json`), linearly interpolated between the grid's targets.

Scoring: which entries of an input x are zeroed for a projection with weight W (see
`teal.thresholds`): "magnitude" (|x_i| <= t, TEAL) or "weight" (|x_i| * ||W[:, i]||_2 <= t_w,
WINA, arXiv 2505.19427, applied as the per-channel threshold t_w / ||W[:, i]||_2).

Calibration: thresholds from the dense model's histograms (TEAL's recipe) or, with
`calibrate_sequentially`, re-derived on the sparsified model's own activations.
"""
from __future__ import annotations

from pathlib import Path

import torch

from teal.calibration import block_inputs
from teal.greedy import AllocationError, GreedyAllocation
from teal.projections import PROJECTIONS
from teal.sparse_linear import configured
from teal.thresholds import SCORINGS, Calibration, apply_sparsities, histogram_quantile, update_histogram

ALLOCATIONS = ("uniform", "greedy")
CALIBRATIONS = ("dense", "sequential")


def sweep_configurations(sparsities, allocations=("uniform",), scorings=("magnitude",),
                         calibrations=("dense",), dense: bool = False) -> list[tuple]:
    """The (sparsity, allocation, scoring, calibration) rows of a sweep, as the evaluation CLIs
    run them: the dense baseline once and first, as (0.0, "dense", "-", "-"), when 0 is among
    `sparsities` or `dense` is true; then every combination of the other sparsities (sorted)
    with the allocations, scorings and calibrations (calibration outermost)."""
    rows = [(0.0, "dense", "-", "-")] if dense or 0.0 in sparsities else []
    rows += [(s, a, sc, c) for c in calibrations for s in sorted(set(sparsities) - {0.0})
             for a in allocations for sc in scorings]
    return rows


def load_sweep_files(model, rows, thresholds, greedy_path=None) -> tuple:
    """(Calibration or None, GreedyAllocation or None) that the `rows` of a sweep need on
    `model`: the calibration file `thresholds` when a row is sparse, the greedy allocation
    `greedy_path` when a sparse row uses allocation "greedy" (both checked against the model).

    Raises:
        ThresholdsError / teal.greedy.AllocationError: a missing, corrupt or mismatched file.
    """
    calib = greedy = None
    if any(row[0] > 0 for row in rows):
        calib = Calibration.load(thresholds, model.config.to_dict())
        if any(row[0] > 0 and row[1] == "greedy" for row in rows):
            greedy = GreedyAllocation.load(greedy_path)
            greedy.check_model(model.config.to_dict())
    return calib, greedy


def apply_configuration(model, row: tuple, calib=None, greedy=None, calib_ids=None,
                        seq_len: int = 2048, calib_tokens: int = 8192,
                        progress: bool = False) -> dict:
    """Configure a loaded model for one row of `sweep_configurations`.

    The dense row (sparsity 0) turns every projection dense (`teal.configure(sparse=False)`);
    a sparse row sets the thresholds with `apply_config` and, for calibration "sequential",
    re-derives them with `calibrate_sequentially` over `calib_tokens` of `calib_ids` (1-D
    token ids) in windows of `seq_len`. The sparse/sparsify_prefill/track flags are left to
    the caller. Returns {(layer, proj): target sparsity} applied ({} for the dense row).

    Raises:
        ValueError: a sparse row without `calib`, a sequential one without `calib_ids`, plus
            everything `apply_config` and `calibrate_sequentially` raise.
    """
    from teal.sparse_linear import configure
    sparsity, allocation, scoring, calibration = row
    if sparsity == 0.0:
        configure(model, sparse=False)
        return {}
    if calib is None:
        raise ValueError("a sparse configuration needs a calibration file (thresholds)")
    applied = apply_config(model, calib, sparsity, allocation=allocation, scoring=scoring,
                           greedy=greedy)
    if calibration == "sequential":
        if calib_ids is None:
            raise ValueError("calibration 'sequential' needs calibration token ids")
        calibrate_sequentially(model, calib, calib_ids, applied, scoring, seq_len=seq_len,
                               n_tokens=calib_tokens, progress=progress)
    elif calibration != "dense":
        raise ValueError(f"unknown calibration {calibration!r}; choose from "
                         f"{', '.join(CALIBRATIONS)}")
    return applied


def apply_config(model, calib: Calibration, sparsity: float, allocation: str = "uniform",
                 scoring: str = "magnitude", greedy=None, checkpoint_dir=None) -> dict:
    """Set every projection's threshold for a model-level target `sparsity`.

    Args:
        model: a `model.Transformer`.
        calib: its Calibration (validated against the model here).
        sparsity: model-level target in [0, 1); 0 leaves every projection dense.
        allocation: "uniform" or "greedy" (needs `greedy`).
        scoring: "magnitude" or "weight".
        greedy: a `teal.greedy.GreedyAllocation`, or a path to `greedy.json`.
        checkpoint_dir: where to look for `greedy.json` when `greedy` is None.

    Returns:
        {(layer, proj): sparsity} applied (modules whose projections are all at 0 run dense).

    Raises:
        ValueError: sparsity outside [0, 1), unknown allocation/scoring, missing greedy file
            (as `teal.greedy.AllocationError`), or a target beyond the greedy grid.
        ThresholdsError: calibration made for another model, or without weighted histograms.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    calib.check_model(model.config.to_dict())
    if allocation == "uniform":
        def get(layer, proj):
            return sparsity
    elif allocation == "greedy":
        if greedy is None and checkpoint_dir is not None:
            greedy = Path(checkpoint_dir) / "greedy.json"
        if greedy is None:
            raise AllocationError("allocation 'greedy' needs a greedy.json; create it with "
                                  "`python calibrate.py --checkpoint_path <model.pth> "
                                  "--greedy-only`")
        if not isinstance(greedy, GreedyAllocation):
            greedy = GreedyAllocation.load(greedy)
        greedy.check_model(model.config.to_dict())
        table = greedy.sparsities(scoring, sparsity)  # (n_layer, 7)

        def get(layer, proj):
            return float(table[layer][PROJECTIONS.index(proj)])
    else:
        raise ValueError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    apply_sparsities(model, calib, get, scoring)
    return {(layer, proj): get(layer, proj) for layer, proj, _ in model.projections()}


def configured_sparsity(model, applied: dict) -> float:
    """Parameter-weighted mean of the target sparsities in `applied` (from `apply_config`)."""
    num = den = 0.0
    for layer, proj, p in model.projections():
        n = p.in_features * p.out_features
        num += applied[(layer, proj)] * n
        den += n
    return num / den


@torch.no_grad()
def calibrate_sequentially(model, calib: Calibration, token_ids: torch.Tensor, applied: dict,
                           scoring: str = "magnitude", seq_len: int = 2048,
                           n_tokens: int = 8192, device=None, progress: bool = False) -> dict:
    """Re-derive the thresholds of a configuration on the sparsified model's own activations.

    Thresholds from dense calibration (TEAL's recipe) undershoot downstream: once q/k/v (or
    gate/up) inputs are sparsified, the inputs of o_proj and down_proj (and of later blocks)
    shrink, so more of them fall below a dense-calibrated threshold and the measured sparsity
    overshoots the target (on SmolLM2-135M at 65% uniform: down_proj 76%, model-level 71%).
    Here every projection's threshold is set, in forward order, to the quantile of its input
    in the model as sparsified so far: all calibration windows go through the model as one
    batch, and a forward pre-hook on each projection module computes its projections'
    thresholds from the batch it is about to see (histogram quantile, as `Calibration`).
    Exact for every position because the model is causal and sparsification is per token.

    Args:
        model: a `model.Transformer`, configured by `apply_config` (its thresholds are replaced).
        calib: only its bin layout is used.
        token_ids: 1-D calibration token ids; the first `n_tokens` (whole windows) are used.
        applied: {(layer, proj): sparsity} as returned by `apply_config`.
        scoring: "magnitude" or "weight" (thresholds on |x| or on |x_i| * ||W[:, i]||_2).
        progress: show a tqdm bar over the blocks (on stderr).

    Returns:
        {(layer, proj): threshold (float, or (in_features,) tensor for weight scoring)}.
    """
    device = device or model.tok_embeddings.weight.device
    n_win = min(n_tokens, token_ids.numel()) // seq_len
    if n_win < 1:
        raise ValueError(f"sequential calibration needs at least {seq_len} tokens")
    ids = token_ids[:n_win * seq_len].view(n_win, seq_len).to(device)
    lo, hi, n_bins = calib.bins["lo"], calib.bins["hi"], calib.bins["n"]
    out, handles, by_module = {}, [], {}
    for layer, proj, p in model.projections():
        s = applied[(layer, proj)]
        if s > 0:
            norms = p.column_norms() if scoring == "weight" else None
            by_module.setdefault(id(p.module), (p.module, []))[1].append((layer, p, s, norms))

    def make_hook(members):
        def hook(_module, args):
            x = args[0].detach().float().abs()
            for layer, p, s, norms in members:
                h = torch.zeros(n_bins, dtype=torch.float64, device=x.device)
                update_histogram(h, x if norms is None else x * norms.to(x.device), lo, hi)
                t = histogram_quantile(h, s, lo, hi)
                t = t if norms is None else t / norms.clamp_min(1e-30)
                p.set_threshold(t)
                out[(layer, p.name)] = t
        return hook

    for module, members in by_module.values():
        handles.append(module.register_forward_pre_hook(make_hook(members)))
    try:
        from tqdm import tqdm
        with configured(model, sparsify_prefill=True, track=False):
            blocks = block_inputs(model, ids)  # runs every block on the whole batch
            for _ in tqdm(blocks, total=len(model.layers), unit="block", leave=False,
                          desc=f"sequential calibration ({ids.numel()} tokens)",
                          disable=not progress):
                pass
    finally:
        for h in handles:
            h.remove()
    return out


__all__ = ["apply_config", "calibrate_sequentially", "configured_sparsity", "ALLOCATIONS",
           "SCORINGS"]
