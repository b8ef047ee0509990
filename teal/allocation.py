"""Apply a sparsity configuration (allocation x scoring) to a model's projection thresholds.

Allocation: how a model-level target sparsity is split among the projections.
- "uniform": every projection at the target (TEAL's uniform baseline).
- "greedy": per-layer, per-projection sparsities found by TEAL's block-wise greedy search
  (`teal.greedy`, file `greedy.json`), linearly interpolated between the grid's targets.
- "tuned": per-block budgets tuned end to end on held-out validation text (`teal.budgets`,
  file `tuned.json`, same format), interpolated likewise between its tuned targets.

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

ALLOCATIONS = ("uniform", "greedy", "tuned")
# "auto" (generate.py's default) picks greedy from this target up when there is no tuned
# table: measured on SmolLM2-135M (README, quality), greedy is worse than uniform at 25% and
# better at 40% and 50%.
AUTO_GREEDY_FROM = 0.4
TABLE_ALLOCATIONS = ("greedy", "tuned")  # the allocations read from a table file
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


def load_sweep_files(model, rows, thresholds, greedy_path=None, tuned_path=None) -> tuple:
    """(Calibration or None, {allocation: GreedyAllocation}) that the `rows` of a sweep need
    on `model`: the calibration file `thresholds` when a row is sparse, the allocation file
    (`greedy_path` for "greedy", `tuned_path` for "tuned") of every table allocation a sparse
    row uses, each checked against the model.

    Raises:
        ThresholdsError / teal.greedy.AllocationError: a missing, corrupt or mismatched file.
    """
    calib, tables = None, {}
    paths = dict(greedy=greedy_path, tuned=tuned_path)
    if any(row[0] > 0 for row in rows):
        calib = Calibration.load(thresholds, model.config.to_dict())
        for name in TABLE_ALLOCATIONS:
            if any(row[0] > 0 and row[1] == name for row in rows):
                tables[name] = GreedyAllocation.load(paths[name], kind=name)
                tables[name].check_model(model.config.to_dict(), paths[name])
    return calib, tables


def apply_configuration(model, row: tuple, calib=None, tables=None, calib_ids=None,
                        seq_len: int = 2048, calib_tokens: int = 8192,
                        progress: bool = False) -> dict:
    """Configure a loaded model for one row of `sweep_configurations`.

    The dense row (sparsity 0) turns every projection dense (`teal.configure(sparse=False)`);
    a sparse row sets the thresholds with `apply_config` (a table allocation's file from
    `tables`, as `load_sweep_files` returns) and, for calibration "sequential",
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
    tables = tables or {}
    applied = apply_config(model, calib, sparsity, allocation=allocation, scoring=scoring,
                           greedy=tables.get("greedy"), tuned=tables.get("tuned"))
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
                 scoring: str = "magnitude", greedy=None, checkpoint_dir=None,
                 tuned=None) -> dict:
    """Set every projection's threshold for a model-level target `sparsity`.

    Args:
        model: a `model.Transformer`.
        calib: its Calibration (validated against the model here).
        sparsity: model-level target in [0, 1); 0 leaves every projection dense.
        allocation: "uniform", "greedy" (needs `greedy`) or "tuned" (needs `tuned`).
        scoring: "magnitude" or "weight".
        greedy: a `teal.greedy.GreedyAllocation`, or a path to `greedy.json`.
        checkpoint_dir: where to look for `greedy.json` / `tuned.json` when not given.
        tuned: the tuned per-block budgets (`teal.budgets`): a GreedyAllocation or a path.

    Returns:
        {(layer, proj): sparsity} applied (modules whose projections are all at 0 run dense).

    Raises:
        ValueError: sparsity outside [0, 1), unknown allocation/scoring, missing greedy file
            (as `teal.greedy.AllocationError`), or a target beyond the file's grid.
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
    elif allocation in TABLE_ALLOCATIONS:
        source = greedy if allocation == "greedy" else tuned
        if source is None and checkpoint_dir is not None:
            source = Path(checkpoint_dir) / f"{allocation}.json"
        if source is None:
            raise AllocationError(f"allocation '{allocation}' needs a {allocation}.json; "
                                  f"create it with {GreedyAllocation.remedy(allocation)}")
        if not isinstance(source, GreedyAllocation):
            source = GreedyAllocation.load(source, kind=allocation)
        source.check_model(model.config.to_dict())
        table = source.sparsities(scoring, sparsity)  # (n_layer, 7)

        def get(layer, proj):
            return float(table[layer][PROJECTIONS.index(proj)])
    else:
        raise ValueError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    apply_sparsities(model, calib, get, scoring)
    return {(layer, proj): get(layer, proj) for layer, proj, _ in model.projections()}


def choose_allocation(sparsity: float, scoring: str = "magnitude", greedy=None,
                      tuned=None) -> tuple[str, str]:
    """What allocation "auto" means for a target: the best measured one whose table is there.

    In order (README "Quality"): "tuned" when `tuned` has a table for `scoring` whose grid
    reaches `sparsity`; else "greedy" when `greedy` has one and `sparsity` >=
    `AUTO_GREEDY_FROM`; else "uniform".

    Args:
        sparsity: model-level target in [0, 1).
        greedy, tuned: the loaded `GreedyAllocation` of greedy.json / tuned.json, or None
            where the file does not exist.

    Returns:
        (allocation, reason): the reason is a short phrase for the run's report.
    """
    def covers(table):
        return (table is not None and scoring in table.allocations
                and sparsity <= max(table.targets(scoring)) + 1e-9)

    if sparsity <= 0.0:
        return "uniform", "dense"
    if covers(tuned):
        return "tuned", "tuned.json covers this target"
    if covers(greedy) and sparsity >= AUTO_GREEDY_FROM - 1e-9:
        return "greedy", (f"no tuned table for {sparsity:.0%}; greedy.json, as measured best "
                          f"from {AUTO_GREEDY_FROM:.0%}")
    missing = ("no tuned.json" if tuned is None else
               f"tuned.json has no {scoring} table" if scoring not in tuned.allocations else
               f"tuned.json stops below {sparsity:.0%}")
    if greedy is not None and sparsity < AUTO_GREEDY_FROM:
        return "uniform", f"{missing}; uniform beats greedy below {AUTO_GREEDY_FROM:.0%}"
    return "uniform", f"{missing}, no greedy table for it"


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


__all__ = ["apply_config", "calibrate_sequentially", "configured_sparsity", "choose_allocation",
           "ALLOCATIONS", "AUTO_GREEDY_FROM",
           "SCORINGS"]
