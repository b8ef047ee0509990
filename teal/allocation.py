"""Apply a sparsity configuration (allocation x scoring) to a model's SparseLinear thresholds.

Allocation: how a model-level target sparsity is split among the projections.
- "uniform": every projection at the target (TEAL's uniform baseline).
- "greedy": per-layer, per-projection sparsities found by TEAL's block-wise greedy search
  (`teal.greedy`, file `greedy.json`), linearly interpolated between the grid's targets.

Scoring: which entries of an input x are zeroed for a projection with weight W.
- "magnitude": |x_i| <= t, t the s-quantile of |x| of that input (TEAL).
- "weight": |x_i| * ||W[:, i]||_2 <= t_w (WINA, arXiv 2505.19427), t_w the s-quantile of the
  score over calibration tokens; applied as the per-channel threshold t_w / ||W[:, i]||_2,
  which SparseLinear and the kernels read like a scalar one.
"""
from __future__ import annotations

import torch

from teal.thresholds import INPUT_OF, PROJECTIONS, Calibration, histogram_quantile

ALLOCATIONS = ("uniform", "greedy")
SCORINGS = ("magnitude", "weight")


def weighted_threshold(calib: Calibration, layer: int, proj: str, sparsity: float,
                       norms: torch.Tensor) -> torch.Tensor:
    """Per-input-channel threshold t_w / ||W[:, i]||_2 (fp32, (in_features,)) for `sparsity`
    under weight-informed scoring; `norms` are the projection's column norms."""
    from teal.calibration import weighted_histograms
    hist = weighted_histograms(calib)[layer, PROJECTIONS.index(proj)]
    t = histogram_quantile(hist, sparsity, calib.bins["lo"], calib.bins["hi"])
    # A zero column never contributes: any threshold is exact, keep it finite.
    return t / norms.float().clamp_min(1e-30)


def projection_threshold(calib: Calibration, layer: int, proj: str, sparsity: float,
                         scoring: str = "magnitude", lin=None):
    """Threshold of projection `proj` of block `layer` for `sparsity` under `scoring`:
    a float (magnitude) or a (in_features,) tensor (weight; needs the module `lin`)."""
    if scoring == "magnitude":
        return calib.threshold(layer, INPUT_OF[proj], sparsity)
    if scoring == "weight":
        from teal.calibration import column_norms
        return weighted_threshold(calib, layer, proj, sparsity, column_norms(lin))
    raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")


def apply_config(model, calib: Calibration, sparsity: float, allocation: str = "uniform",
                 scoring: str = "magnitude", greedy=None) -> dict:
    """Set every projection's threshold for a model-level target `sparsity`.

    Args:
        model: a `model.Transformer`.
        calib: its Calibration (validated against the model here).
        sparsity: model-level target in [0, 1); 0 leaves every projection dense.
        allocation: "uniform" or "greedy" (needs `greedy`).
        scoring: "magnitude" or "weight".
        greedy: a `teal.greedy.GreedyAllocation`, or a path to `greedy.json`.

    Returns:
        {(layer, proj): sparsity} applied (projections at 0 run dense, `sparse=False`).

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
        from teal.greedy import AllocationError, GreedyAllocation
        if greedy is None:
            raise AllocationError("allocation 'greedy' needs a greedy.json; create it with "
                                  "`python calibrate.py --greedy-only`")
        if not isinstance(greedy, GreedyAllocation):
            greedy = GreedyAllocation.load(greedy)
        greedy.check_model(model.config.to_dict())
        table = greedy.sparsities(scoring, sparsity)  # (n_layer, 7)

        def get(layer, proj):
            return float(table[layer][PROJECTIONS.index(proj)])
    else:
        raise ValueError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    applied = {}
    for layer, proj, lin in model.sparse_linears():
        s = get(layer, proj)
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity of layer {layer} {proj} must be in [0, 1), got {s}")
        lin.set_threshold(projection_threshold(calib, layer, proj, s, scoring, lin))
        lin.sparse = s > 0.0
        applied[(layer, proj)] = s
    return applied


def configured_sparsity(model, applied: dict) -> float:
    """Parameter-weighted mean of the target sparsities in `applied` (from `apply_config`)."""
    num = den = 0.0
    for layer, proj, lin in model.sparse_linears():
        n = lin.in_features * lin.out_features
        num += applied[(layer, proj)] * n
        den += n
    return num / den


__all__ = ["apply_config", "projection_threshold", "weighted_threshold", "configured_sparsity",
           "ALLOCATIONS", "SCORINGS"]
