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

from pathlib import Path

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
    applied = {}
    for layer, proj, lin in model.sparse_linears():
        s = get(layer, proj)
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity of layer {layer} {proj} must be in [0, 1), got {s}")
        lin.set_threshold(projection_threshold(calib, layer, proj, s, scoring, lin))
        lin.sparse = s > 0.0
        lin.target_sparsity = s
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




@torch.no_grad()
def calibrate_sequentially(model, calib: Calibration, token_ids: torch.Tensor, applied: dict,
                           scoring: str = "magnitude", seq_len: int = 2048,
                           n_tokens: int = 8192, device=None) -> dict:
    """Re-derive the thresholds of a configuration on the sparsified model's own activations.

    Thresholds from dense calibration (TEAL's recipe) undershoot downstream: once q/k/v (or
    gate/up) inputs are sparsified, the inputs of o_proj and down_proj (and of later blocks)
    shrink, so more of them fall below a dense-calibrated threshold and the measured sparsity
    overshoots the target (on SmolLM2-135M at 65% uniform: down_proj 76%, model-level 71%).
    Here every projection's threshold is set, in forward order, to the quantile of its input
    in the model as sparsified so far: all calibration windows go through the model as one
    batch, and a forward pre-hook on each projection computes its threshold from the batch it
    is about to see (histogram quantile, as `Calibration`). Exact for every position because
    the model is causal and sparsification is per token.

    Args:
        model: a `model.Transformer`, configured by `apply_config` (its thresholds are replaced).
        calib: only its bin layout is used.
        token_ids: 1-D calibration token ids; the first `n_tokens` (whole windows) are used.
        applied: {(layer, proj): sparsity} as returned by `apply_config`.
        scoring: "magnitude" or "weight" (thresholds on |x| or on |x_i| * ||W[:, i]||_2).

    Returns:
        {(layer, proj): threshold (float, or (in_features,) tensor for weight scoring)}.
    """
    import teal
    from teal.calibration import block_inputs, column_norms
    from teal.thresholds import update_histogram

    device = device or model.tok_embeddings.weight.device
    n_win = min(n_tokens, token_ids.numel()) // seq_len
    if n_win < 1:
        raise ValueError(f"sequential calibration needs at least {seq_len} tokens")
    ids = token_ids[:n_win * seq_len].view(n_win, seq_len).to(device)
    lo, hi, n_bins = calib.bins["lo"], calib.bins["hi"], calib.bins["n"]
    out, handles = {}, []

    def make_hook(layer, proj, s):
        norms = column_norms(projection_module(model, layer, proj)) if scoring == "weight" else None

        def hook(mod, args):
            x = args[0].detach().float().abs()
            h = torch.zeros(n_bins, dtype=torch.float64, device=x.device)
            update_histogram(h, x if norms is None else x * norms.to(x.device), lo, hi)
            t = histogram_quantile(h, s, lo, hi)
            t = t if norms is None else t / norms.clamp_min(1e-30)
            mod.set_threshold(t)
            out[(layer, proj)] = t
        return hook

    for layer, proj, lin in model.sparse_linears():
        s = applied[(layer, proj)]
        if s > 0:
            handles.append(lin.register_forward_pre_hook(make_hook(layer, proj, s)))
    teal.configure(model, sparsify_prefill=True, track=False)
    try:
        for _ in block_inputs(model, ids):  # runs every block on the whole batch
            pass
    finally:
        for h in handles:
            h.remove()
    return out


def projection_module(model, layer: int, proj: str):
    from teal.calibration import projection
    return projection(model, layer, proj)


__all__ = ["apply_config", "calibrate_sequentially", "projection_threshold",
           "weighted_threshold", "configured_sparsity", "ALLOCATIONS", "SCORINGS"]
