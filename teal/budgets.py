"""Per-layer sparsity budgets tuned end to end on held-out validation text.

TEAL's allocations give every block the same block-level sparsity: uniform gives every
projection the target; the greedy search (`teal.greedy`) splits the target among a block's
seven projections by the block-output error, but each block still sits at the target,
because that error is not comparable across blocks. Blocks differ in how much their sparsity
hurts the model's output (measured here on SmolLM2-135M: the first and last blocks most), so
a model-level target can be spent better by moving sparsity between blocks.

Objective (nats per predicted token, over `n_tokens` validation tokens in windows of
`seq_len`, every position sparsified as perplexity scores it; the tokens come after the
calibration tokens, so selection never sees the text the thresholds came from): "nll", the
mean negative log-likelihood of the next token (log perplexity, the reported metric; the
default), or "kl", the mean KL(p_dense || p_sparse). They disagree: on SmolLM2-135M at 25%
greedy's split has 0.4x uniform's KL but the higher perplexity (validation and test alike).

Search, per target T: the within-block split is a mixture `mixed_split` of the uniform split
(all seven projections at the block sparsity) and the greedy file's split for that block
sparsity (`GreedyAllocation.sparsities`), its weight chosen from `MIXES` at uniform block
budgets; then, in rounds, with the block sparsities s_l at the current point (start: all T),
measure for every block l and every level s_l + k * step (k = -radius_steps ..
radius_steps, k != 0, level in [0, max_sparsity]) the objective with only that block moved;
take the changes as additive and pick the levels with sum_l k_l = 0 (the model-level target
stays exact: all blocks have the same parameter count) that minimise their sum (exact
dynamic programme). The new point is kept when its measured objective is lower; otherwise
the step is halved. A moved block's evaluation reruns only that block and the ones after it
(the states entering each block are cached for the current point).

Output: the tables in the greedy-allocation format (`teal-greedy/1`, file `tuned.json`) with
the search record in `meta["tuning"]`; `apply_config(..., allocation="tuned")` reads it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.calibration import _no_kv_cache, rope_and_mask
from teal.greedy import FORMAT, GreedyAllocation, _key
from teal.projections import PROJECTIONS
from teal.sparse_linear import configured, set_thresholds
from teal.thresholds import Calibration

OBJECTIVES = {
    "nll": "mean negative log-likelihood of the next token (log perplexity) over the tuning "
           "tokens, every position sparsified",
    "kl": "mean per-token KL(p_dense || p_sparse) of the next-token distribution over the "
          "tuning tokens, every position sparsified",
}
MIXES = (1.0, 0.75, 0.5, 0.25, 0.0)  # weights of the uniform split tried (rest: greedy's)


def best_moves(costs: Sequence[dict]) -> list[int]:
    """Choose one move k_l per block from `costs[l]` ({k: cost}; k = 0 is always allowed at
    cost 0) so that sum_l k_l = 0 and sum_l cost is least (exact dynamic programme).

    Returns the list of k_l (all 0 when no zero-sum combination beats staying put)."""
    best = {0: (0.0, [])}  # running sum of k -> (total cost, moves so far)
    for options in costs:
        opts = dict(options)
        opts[0] = 0.0
        nxt = {}
        for total, (c, moves) in best.items():
            for k, ck in opts.items():
                key = total + k
                cand = c + ck
                if key not in nxt or cand < nxt[key][0] - 1e-15:
                    nxt[key] = (cand, moves + [k])
        best = nxt
    cost, moves = best[0]
    return moves if cost < 0.0 else [0] * len(costs)


class BudgetProblem:
    """The objective of `tune_budgets` for one model, scoring and set of tuning windows.

    Args:
        model: a `model.Transformer` (its thresholds are overwritten while searching).
        calib: its Calibration.
        windows: (W, L) token ids; each window predicts its tokens 1 .. L-1.
        scoring: "magnitude" or "weight".
        objective: "nll" or "kl" (`OBJECTIVES`).

    Raises:
        ValueError: an unknown objective.
    """

    def __init__(self, model, calib: Calibration, windows: Tensor, scoring: str = "magnitude",
                 objective: str = "nll"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown tuning objective {objective!r}; choose from "
                             f"{', '.join(OBJECTIVES)}")
        self.model, self.calib, self.scoring, self.kind = model, calib, scoring, objective
        self.windows = windows
        self.pos, self.freqs, self.mask = rope_and_mask(model, windows.shape[1], windows.device)
        self.handles = {}
        for layer, proj, p in model.projections():
            self.handles.setdefault(layer, {})[proj] = p
        self._thresholds = {}
        self.n_layer = model.config.n_layer
        self.dense_logp = None
        if objective == "kl":
            with torch.no_grad(), configured(model, sparse=False, track=False), \
                    _no_kv_cache(model):
                self.dense_logp = [F.log_softmax(lg, dim=-1) for lg in self._logits_from(0, None)]
        self.states = None  # states entering each block at the current point
        self.evaluations = 0

    def _threshold(self, layer: int, proj: str, s: float):
        key = (layer, proj, round(s, 9))
        if key not in self._thresholds:
            p = self.handles[layer][proj]
            norms = p.column_norms() if self.scoring == "weight" else None
            self._thresholds[key] = self.calib.projection_threshold(layer, proj, s, self.scoring,
                                                                    norms)
        return self._thresholds[key]

    def set_block(self, layer: int, sparsities: Sequence[float]) -> None:
        """Set block `layer`'s seven projections (order `PROJECTIONS`) to `sparsities`."""
        set_thresholds({self.handles[layer][proj]: (self._threshold(layer, proj, s), s)
                        for proj, s in zip(PROJECTIONS, sparsities)})

    def _logits_from(self, layer: int, x: Optional[Tensor], keep_states: bool = False):
        m = self.model
        if x is None:
            x = m.tok_embeddings(self.windows)
        states = [x] if keep_states else None
        for block in m.layers[layer:]:
            x = block(x, self.pos, self.freqs, self.mask)
            if keep_states:
                states.append(x)
        if keep_states:
            self.states = states[:-1]
        head = m.output(m.norm(x)).float()
        return list(head.unbind(0))

    @torch.no_grad()
    def objective(self, from_layer: int = 0, keep_states: bool = False) -> float:
        """The objective (nats per predicted token) of the current thresholds; with
        `from_layer` > 0 the blocks before it are taken from the cached states of the current
        point (they must not have changed since the last `keep_states` evaluation)."""
        x = None if from_layer == 0 else self.states[from_layer]
        with configured(self.model, sparsify_prefill=True, track=False), _no_kv_cache(self.model):
            logits = self._logits_from(from_layer, x, keep_states=keep_states)
        self.evaluations += 1
        total, count = 0.0, 0
        for w, lg in enumerate(logits):
            lp = F.log_softmax(lg[:-1], dim=-1)  # position i predicts token i + 1
            if self.kind == "nll":
                total -= lp.gather(1, self.windows[w, 1:, None]).sum().item()
            else:
                ref = self.dense_logp[w][:-1]
                total += (ref.exp() * (ref - lp)).sum().item()
            count += lp.shape[0]
        return total / count


def search_target(problem: BudgetProblem, split: Callable[[int, float], Sequence[float]],
                  target: float, *, step: float = 0.05, radius_steps: int = 3,
                  rounds: int = 3, min_step: float = 0.0125, max_sparsity: float = 0.9,
                  bar=None) -> tuple[list[float], float, list[dict]]:
    """Per-block sparsities for a model-level `target` (see the module doc).

    Args:
        problem: the BudgetProblem.
        split: (layer, block sparsity) -> its seven projection sparsities.
        target: model-level sparsity in (0, 1).
        step, radius_steps: levels tried per block are s_l + k * step, |k| <= radius_steps.
        rounds: improvement rounds (a rejected round halves the step, down to `min_step`).
        bar: optional tqdm bar, advanced once per evaluation.

    Returns:
        (block sparsities (n_layer,), their objective, history: one dict per round with the
        step, the objective before, the predicted and measured objective of the proposal,
        and whether it was kept).
    """
    n = problem.n_layer
    s = [float(target)] * n

    def apply_point(point):
        for layer in range(n):
            problem.set_block(layer, split(layer, point[layer]))

    apply_point(s)
    current = problem.objective(keep_states=True)
    history = []
    for _ in range(rounds):
        costs = []
        for layer in range(n):
            options = {}
            for k in range(-radius_steps, radius_steps + 1):
                level = s[layer] + k * step
                if k == 0 or level < -1e-9 or level > max_sparsity + 1e-9:
                    continue
                problem.set_block(layer, split(layer, max(level, 0.0)))
                options[k] = problem.objective(from_layer=layer) - current
                if bar is not None:
                    bar.update(1)
            problem.set_block(layer, split(layer, s[layer]))
            costs.append(options)
        moves = best_moves(costs)
        record = dict(step=step, before=current, predicted=current + sum(
            c.get(k, 0.0) for c, k in zip(costs, moves)))
        if not any(moves):
            record.update(measured=current, kept=False)
            history.append(record)
            break
        cand = [max(x + k * step, 0.0) for x, k in zip(s, moves)]
        apply_point(cand)
        measured = problem.objective(keep_states=True)
        record.update(measured=measured, kept=measured < current)
        history.append(record)
        if measured < current:
            s, current = cand, measured
        else:
            apply_point(s)
            problem.objective(keep_states=True)  # restore the cached states
            step /= 2
            if step < min_step - 1e-12:
                break
    return s, current, history


def mixed_split(greedy: Optional[GreedyAllocation], scoring: str, uniform_weight: float):
    """(layer, block sparsity s) -> seven projection sparsities: `uniform_weight` * [s] * 7 +
    (1 - uniform_weight) * the greedy file's split of block `layer` at block sparsity s.
    Both parts have block sparsity s, so the mixture does too (parameter-weighted).

    Raises:
        ValueError: a weight outside [0, 1], or a weight below 1 without `greedy`.
    """
    if not 0.0 <= uniform_weight <= 1.0:
        raise ValueError(f"uniform_weight must be in [0, 1], got {uniform_weight}")
    if uniform_weight < 1.0 and greedy is None:
        raise ValueError("a split with greedy's share needs a greedy allocation (greedy.json)")
    n_proj = len(PROJECTIONS)
    cache = {}

    def split(layer, s):
        key = round(s, 9)
        if uniform_weight == 1.0 or s <= 0.0:
            return [s] * n_proj
        if key not in cache:
            cache[key] = greedy.sparsities(scoring, s)
        return [uniform_weight * s + (1.0 - uniform_weight) * g for g in cache[key][layer]]
    return split


@torch.no_grad()
def tune_budgets(model, calib: Calibration, token_ids: Tensor, targets: Sequence[float], *,
                 offset: int = 0, n_tokens: int = 16384, seq_len: int = 2048,
                 greedy: Optional[GreedyAllocation] = None, scoring: str = "magnitude",
                 objective: str = "nll", mixes: Sequence[float] = MIXES, step: float = 0.05,
                 radius_steps: int = 3, rounds: int = 3, progress: bool = True,
                 source: Optional[dict] = None, device=None) -> GreedyAllocation:
    """Tune per-block sparsity budgets for each of `targets` (see the module doc).

    Per target: the within-block split is the mixture (`mixed_split`) of the weights in
    `mixes` with the lowest objective at uniform block budgets (only the uniform split
    without `greedy`), then `search_target` moves sparsity between blocks.

    Args:
        model: a `model.Transformer`; its thresholds and dispatch flags are left as a dense
            model's when this returns (every projection at sparsity 0, `sparse` off).
        calib: its Calibration.
        token_ids: 1-D validation token ids; tokens [offset, offset + n_tokens) are used, in
            whole windows of `seq_len` (pass the calibration's token count as `offset`).
        targets: model-level sparsities in (0, 1) (at most the greedy grid's last target
            when `greedy` is given).
        greedy: the greedy allocation whose within-block split may be mixed in.
        objective: "nll" (log perplexity, the reported metric) or "kl" (to the dense model).

    Returns:
        A GreedyAllocation (format `teal-greedy/1`) with one (n_layer, 7) table per target
        for `scoring`; `meta["tuning"]` records per target the objective of uniform TEAL,
        of every mixture tried, the chosen uniform weight, the block sparsities, the final
        objective and the rounds.

    Raises:
        ValueError: too few tokens after `offset` for one window, a target outside (0, 1),
            an unknown objective, a mixture weight outside [0, 1].
    """
    from tqdm import tqdm

    calib.check_model(model.config.to_dict())
    if greedy is not None:
        greedy.check_model(model.config.to_dict())
    for t in targets:
        if not 0.0 < t < 1.0:
            raise ValueError(f"tuning targets must be in (0, 1), got {t}")
    mixes = [float(w) for w in mixes] if greedy is not None else [1.0]
    for w in mixes:
        mixed_split(greedy, scoring, w)  # bad weights fail before any work
    device = device or model.tok_embeddings.weight.device
    seq_len = min(seq_len, model.config.block_size)
    ids = token_ids.reshape(-1)[offset:offset + n_tokens]
    n_win = ids.numel() // seq_len
    if n_win < 1:
        raise ValueError(f"budget tuning needs at least {seq_len} validation tokens after the "
                         f"first {offset} (the calibration tokens); the text has "
                         f"{token_ids.numel()}: pass a longer text or fewer --tune-tokens")
    windows = ids[:n_win * seq_len].view(n_win, seq_len).to(device)
    problem = BudgetProblem(model, calib, windows, scoring, objective)
    n = problem.n_layer
    meta = dict(format=FORMAT, model=model.config.to_dict(), n_layer=n,
                projections=list(PROJECTIONS), targets=[float(t) for t in targets],
                method="per-block budgets tuned end to end (teal.budgets)",
                objective=objective, objective_text=OBJECTIVES[objective],
                tokens=n_win * seq_len, offset=offset, seq_len=seq_len, step=step,
                radius_steps=radius_steps, rounds=rounds, mixes=mixes, scorings=[scoring],
                source=source or {}, tuning={})
    out = GreedyAllocation(meta, {scoring: {}}, {})
    bar = tqdm(total=len(targets) * (len(mixes) + rounds * n * 2 * radius_steps), unit="eval",
               desc=f"tuning budgets ({objective})", disable=not progress)
    try:
        for t in targets:
            by_mix = {}
            for w in mixes:
                split = mixed_split(greedy, scoring, w)
                for layer in range(n):
                    problem.set_block(layer, split(layer, t))
                by_mix[w] = problem.objective()
                bar.update(1)
            w = min(by_mix, key=by_mix.get)
            split = mixed_split(greedy, scoring, w)
            s, final, history = search_target(problem, split, t, step=step,
                                              radius_steps=radius_steps, rounds=rounds, bar=bar)
            out.allocations[scoring][_key(t)] = [
                [round(float(x), 6) for x in split(layer, s[layer])] for layer in range(n)]
            meta["tuning"][_key(t)] = dict(
                uniform_objective=by_mix.get(1.0), mixes={str(k): v for k, v in by_mix.items()},
                uniform_weight=w, objective=final, block_sparsities=[round(x, 6) for x in s],
                rounds=history)
    finally:
        bar.close()
        for layer in range(n):
            problem.set_block(layer, [0.0] * len(PROJECTIONS))
    return out


__all__ = ["tune_budgets", "search_target", "best_moves", "mixed_split", "BudgetProblem",
           "OBJECTIVES", "MIXES"]
