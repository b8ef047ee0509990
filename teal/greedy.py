"""TEAL's block-wise greedy sparsity allocation (arXiv 2408.14690, Section 3.3 / Appendix).

Uniform sparsity gives every projection the same sparsity; but projections differ in how
much zeroing their small inputs hurts. The greedy search, run independently per transformer
block on dense calibration activations, starts with all seven projections (q, k, v, o, gate,
up, down) at 0% and repeatedly raises the sparsity of the one projection whose step increases
the block-output error least. Every step adds the same number of parameters' worth of
sparsity (`step` x the block's parameter count; a projection with P_p parameters moves by
step * P_block / P_p), so the block's parameter-weighted sparsity advances by `step` per step
and the allocation can be recorded at every model-level target of a grid (5%, 10%, ..., 90%):
all blocks have the same size, so a block-level target equals the model-level one.

Error: squared error of the block output (x + attn + mlp) against the dense block output,
summed over sampled positions (reported normalised by the dense output's squared norm).
Thresholds of a projection at sparsity s come from the calibration histograms, either by
magnitude (|x| <= t) or weight-informed (|x_i| * ||W[:, i]||_2 <= t_w), see teal.allocation.

Cost and memory: the block inputs of `n_tokens` calibration tokens (windows of `seq_len`)
are kept for one block at a time, then propagated densely through it. Block outputs are
compared at `positions` sampled positions per window (keys/values use every position), and
each candidate recomputes only what its projection feeds: a q/k/v/o step reruns attention,
o and the MLP; a gate/up step the MLP; a down step only down_proj.

Output (`greedy.json`, written atomically): per scoring method, per target, the
(n_layer, 7) sparsities, plus metadata: model config, calibration file and text, tokens,
step size. `teal.allocation.apply_config(..., allocation="greedy")` reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.calibration import rope_and_mask
from teal.io import atomic_write_json
from teal.projections import PROJECTIONS, block_projections
from teal.rope import apply_rotary_emb
from teal.sparse_linear import configured
from teal.thresholds import Calibration

FORMAT = "teal-greedy/1"
TARGETS = tuple(round(0.05 * i, 2) for i in range(1, 19))  # 0.05 ... 0.90
MAX_SPARSITY = 0.99  # a projection's sparsity never goes beyond this


class AllocationError(ValueError):
    """A greedy allocation file that is missing, malformed, or made for another model."""


def _key(target: float) -> str:
    return f"{target:.4f}"


@dataclass
class GreedyAllocation:
    """Greedy allocations for one model: `allocations[scoring][target key]` is a list of
    n_layer lists of 7 sparsities (order `PROJECTIONS`); `errors` likewise holds each
    block's normalised output error at that target; `meta` the provenance."""

    meta: dict
    allocations: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(meta=self.meta, allocations=self.allocations, errors=self.errors)

    def save(self, path) -> None:
        """Write JSON atomically (temp file + rename).

        Raises:
            OSError: the folder does not exist or is not writable (nothing is written).
        """
        atomic_write_json(path, self.to_dict(), indent=1)

    @property
    def kind(self) -> str:
        """"tuned" for a file written by `teal.budgets` (it records its search in
        `meta["tuning"]`), else "greedy"."""
        return "tuned" if self.meta.get("tuning") is not None else "greedy"

    @staticmethod
    def remedy(kind: str = "greedy") -> str:
        """The command that (re)creates an allocation file of `kind` ("greedy" or "tuned")."""
        flag = "--greedy-only" if kind == "greedy" else "--tune-only"
        return f"`python calibrate.py --checkpoint_path <model.pth> {flag}`"

    @classmethod
    def load(cls, path, kind: str = "greedy") -> "GreedyAllocation":
        """Read and check the structure of an allocation file: `kind` "greedy" (greedy.json,
        `teal.greedy`) or "tuned" (tuned.json, `teal.budgets`; same format).

        Raises:
            AllocationError: missing, unreadable or malformed file (the fix in the message).
        """
        path = Path(path)
        fix = f"create it with {cls.remedy(kind)}"
        if not path.exists():
            raise AllocationError(f"{kind} allocation file {path} not found; {fix}")
        try:
            d = json.loads(path.read_text())
            meta, allocs = d["meta"], d["allocations"]
            ok = meta.get("format") == FORMAT and isinstance(allocs, dict)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            ok = False
        if not ok:
            raise AllocationError(f"{path} is not a {kind} allocation file ({FORMAT}); {fix}")
        _check_fields(path, meta, allocs, d.get("errors", {}), fix)
        return cls(meta, allocs, d.get("errors", {}))

    def check_model(self, model_args: dict, path="greedy.json") -> None:
        """Raise AllocationError unless the allocation was searched on this architecture."""
        mine = self.meta.get("model") or {}
        keys = ("n_layer", "dim", "intermediate_size", "n_head", "n_local_heads", "head_dim")
        diffs = [f"{k} {mine.get(k)} != {model_args.get(k)}" for k in keys
                 if mine.get(k) != model_args.get(k)]
        if diffs:
            raise AllocationError(f"{self.kind} allocation {path} was made for another model "
                                  f"({'; '.join(diffs)}); re-run {self.remedy(self.kind)} "
                                  f"for this checkpoint")

    def targets(self, scoring: str) -> list[float]:
        return sorted(float(k) for k in self._table(scoring))

    def _table(self, scoring: str) -> dict:
        if scoring not in self.allocations:
            raise AllocationError(f"the greedy allocation file has no '{scoring}' scoring "
                                  f"(has: {', '.join(self.allocations) or 'none'}); re-run "
                                  f"`python calibrate.py --checkpoint_path <model.pth> "
                                  f"--greedy-only "
                                  f"--greedy-scoring {scoring}`")
        return self.allocations[scoring]

    def sparsities(self, scoring: str, target: float) -> list[list[float]]:
        """(n_layer, 7) sparsities for a model-level `target`, linearly interpolated between
        the grid's targets (and 0 -> all dense), which keeps the parameter-weighted mean exact.

        Raises:
            AllocationError: no allocation for `scoring`, or `target` beyond the grid.
        """
        table = self._table(scoring)
        grid = sorted((float(k), v) for k, v in table.items())
        n_layer = self.meta["n_layer"]
        points = [(0.0, [[0.0] * len(PROJECTIONS) for _ in range(n_layer)])] + grid
        if target > points[-1][0] + 1e-9:
            raise AllocationError(f"target sparsity {target} is beyond the {self.kind} grid "
                                  f"(max {points[-1][0]})")
        for (t0, a0), (t1, a1) in zip(points, points[1:]):
            if target <= t1 + 1e-9:
                w = 0.0 if t1 == t0 else min(max((target - t0) / (t1 - t0), 0.0), 1.0)
                return [[(1 - w) * x0 + w * x1 for x0, x1 in zip(r0, r1)]
                        for r0, r1 in zip(a0, a1)]
        return points[0][1]


def _check_fields(path, meta: dict, allocs: dict, errors, fix: str) -> None:
    """Raise AllocationError (naming the file, the field and the fix) unless every field of a
    greedy.json is valid: `n_layer` a positive integer, `model` a dict, scorings of
    `SCORINGS`, every target key a sparsity in (0, 1) written as `_key` writes it, every
    allocation n_layer x 7 sparsities in [0, 1), `errors` (when present) keyed likewise."""
    from teal.thresholds import SCORINGS
    n_layer = meta.get("n_layer")
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise AllocationError(f"{path}: meta n_layer {n_layer!r} is not a positive integer; {fix}")
    if not isinstance(meta.get("model"), dict):
        raise AllocationError(f"{path}: meta has no model config; {fix}")
    if not allocs:
        raise AllocationError(f"{path} holds no allocation; {fix}")
    if not isinstance(errors, dict):
        raise AllocationError(f"{path}: `errors` is not a mapping; {fix}")
    for what, tables in (("allocation", allocs), ("errors", errors)):
        for scoring, table in tables.items():
            if scoring not in SCORINGS or not isinstance(table, dict):
                raise AllocationError(f"{path}: {what} scoring {scoring!r} is not one of "
                                      f"{', '.join(SCORINGS)}; {fix}")
            for target, rows in table.items():
                try:
                    t = float(target)
                    ok = 0.0 < t < 1.0 and _key(t) == target
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise AllocationError(f"{path}: {what} {scoring} has target key "
                                          f"{target!r}, not a sparsity in (0, 1) written as "
                                          f"{_key(0.5)!r}; {fix}")
                if what == "errors":
                    if (not isinstance(rows, list) or len(rows) != n_layer or
                            not all(isinstance(e, (int, float)) and e >= 0 for e in rows)):
                        raise AllocationError(f"{path}: errors {scoring}/{target} is not "
                                              f"{n_layer} non-negative numbers; {fix}")
                    continue
                try:
                    ok = (len(rows) == n_layer and all(len(r) == len(PROJECTIONS) for r in rows)
                          and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                  and 0.0 <= x < 1.0 for r in rows for x in r))
                except TypeError:
                    ok = False
                if not ok:
                    raise AllocationError(f"{path}: allocation {scoring}/{target} is malformed"
                                          f" (expected {n_layer} x {len(PROJECTIONS)} "
                                          f"sparsities in [0, 1)); {fix}")


def _mask(x: Tensor, t) -> Tensor:
    """x with entries |x| <= t zeroed (t None: unchanged); the rule of SparseLinear."""
    return x if t is None else x * (x.abs() > t)


class BlockProblem:
    """One block's greedy search state over fixed dense inputs x (W, L, D).

    Block outputs are evaluated at positions `idx` (E,) of every window; keys and values use
    all L positions. `threshold(proj, s)` gives a projection's threshold (float or (K,)).
    """

    STAGES = ("q", "k", "v", "o", "gate", "up", "down")

    def __init__(self, layer_module, x: Tensor, idx: Tensor, freqs: Tensor, threshold):
        self._rope = apply_rotary_emb
        self.b = layer_module
        att = layer_module.attention
        projs = block_projections(layer_module)
        self.w = {st: projs[p].weight for st, p in zip(self.STAGES, PROJECTIONS)}
        self.n_head, self.n_kv, self.hd = att.n_head, att.n_local_heads, att.head_dim
        self.threshold = threshold
        W, L, _ = x.shape
        self.idx = idx
        self.x_q = x[:, idx]  # (W, E, D) residual at the evaluated positions
        self.xa = layer_module.attention_norm(x)  # (W, L, D)
        self.xa_q = self.xa[:, idx]
        self.freqs_all = freqs[:L]
        self.freqs_q = freqs[idx]
        self.amask = torch.arange(L, device=x.device)[None, :] <= idx[:, None]  # (E, L)
        self.s = {p: 0.0 for p in PROJECTIONS}
        self.cur = self._full({})
        self.dense_out = self.cur["out"]
        self.dense_sq = self.dense_out.double().pow(2).sum().item()

    # --- pieces of the block forward, each from its inputs and one threshold ---------------
    def _q(self, t):
        W, E, _ = self.xa_q.shape
        q = F.linear(_mask(self.xa_q, t), self.w["q"]).view(W, E, self.n_head, self.hd)
        return self._rope(q, self.freqs_q).transpose(1, 2)  # (W, nh, E, hs)

    def _k(self, t):
        W, L, _ = self.xa.shape
        k = F.linear(_mask(self.xa, t), self.w["k"]).view(W, L, self.n_kv, self.hd)
        return self._rope(k, self.freqs_all).transpose(1, 2)  # (W, n_kv, L, hs)

    def _v(self, t):
        W, L, _ = self.xa.shape
        return F.linear(_mask(self.xa, t), self.w["v"]).view(W, L, self.n_kv, self.hd).transpose(1, 2)

    def _attn(self, q, k, v):
        rep = self.n_head // self.n_kv
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1),
                                           v.repeat_interleave(rep, dim=1), attn_mask=self.amask)
        W, _, E, _ = y.shape
        return y.transpose(1, 2).reshape(W, E, self.n_head * self.hd)

    def _after_attn(self, y, t_o, c):
        c["y"] = y
        c["h"] = self.x_q + F.linear(_mask(y, t_o), self.w["o"])
        c["xm"] = self.b.ffn_norm(c["h"])
        return c

    def _mlp(self, c, t_gate, t_up, t_down, g=None, u=None):
        c["g"] = F.linear(_mask(c["xm"], t_gate), self.w["gate"]) if g is None else g
        c["u"] = F.linear(_mask(c["xm"], t_up), self.w["up"]) if u is None else u
        c["mid"] = F.silu(c["g"]) * c["u"]
        c["out"] = c["h"] + F.linear(_mask(c["mid"], t_down), self.w["down"])
        return c

    def _t(self, stage: str, s: float):
        return None if s <= 0.0 else self.threshold(PROJECTIONS[self.STAGES.index(stage)], s)

    def _full(self, override: dict) -> dict:
        s = {st: override.get(st, self.s[PROJECTIONS[i]]) for i, st in enumerate(self.STAGES)}
        t = {st: self._t(st, s[st]) for st in self.STAGES}
        c = dict(q=self._q(t["q"]), k=self._k(t["k"]), v=self._v(t["v"]))
        c = self._after_attn(self._attn(c["q"], c["k"], c["v"]), t["o"], c)
        return self._mlp(c, t["gate"], t["up"], t["down"])

    def candidate(self, proj: str, s_new: float) -> dict:
        """Intermediates of the block with `proj` at sparsity `s_new`, the rest as now;
        recomputes only what that projection feeds."""
        st = self.STAGES[PROJECTIONS.index(proj)]
        t_new = self._t(st, s_new)
        cur = self.cur
        ts = {x: self._t(x, self.s[PROJECTIONS[i]]) for i, x in enumerate(self.STAGES)}
        c = dict(cur)
        if st in ("q", "k", "v"):
            c[st] = getattr(self, "_" + st)(t_new)
            c = self._after_attn(self._attn(c["q"], c["k"], c["v"]), ts["o"], c)
            return self._mlp(c, ts["gate"], ts["up"], ts["down"])
        if st == "o":
            c = self._after_attn(cur["y"], t_new, c)
            return self._mlp(c, ts["gate"], ts["up"], ts["down"])
        if st == "gate":
            return self._mlp(c, t_new, None, ts["down"], u=cur["u"])
        if st == "up":
            return self._mlp(c, None, t_new, ts["down"], g=cur["g"])
        c["out"] = cur["h"] + F.linear(_mask(cur["mid"], t_new), self.w["down"])
        return c

    def error(self, c: dict) -> float:
        """Squared error of the block output vs dense, over the evaluated positions."""
        return (c["out"] - self.dense_out).double().pow(2).sum().item()

    def accept(self, proj: str, s_new: float, c: dict) -> None:
        self.s[proj] = s_new
        self.cur = c


def param_counts(block) -> dict:
    """Parameter count of each projection of a block (order `PROJECTIONS`)."""
    return {name: p.in_features * p.out_features for name, p in block_projections(block).items()}


@torch.no_grad()
def greedy_block(problem: BlockProblem, params: dict, step: float,
                 targets: Sequence[float] = TARGETS, max_sparsity: float = MAX_SPARSITY,
                 on_step=None) -> tuple[dict, dict]:
    """Run the greedy search on one block.

    Args:
        problem: the block's BlockProblem (modified: it ends at the last target).
        params: parameter count per projection.
        step: block parameter-weighted sparsity added per step (e.g. 0.01).
        targets: block-level sparsities at which to record the allocation.
        on_step: optional callback(proj chosen, errors dict) for tests / progress.

    Returns:
        ({target: [7 sparsities]}, {target: normalised error}).
    """
    total = sum(params.values())
    alloc, errs = {}, {}
    pending = sorted(targets)
    achieved = 0.0
    while pending:
        errors, cands = {}, {}
        for p in PROJECTIONS:
            s0 = problem.s[p]
            if s0 >= max_sparsity - 1e-12:
                continue
            s_new = min(s0 + step * total / params[p], max_sparsity)
            cands[p] = (s_new, problem.candidate(p, s_new))
            errors[p] = problem.error(cands[p][1])
        if not errors:
            break
        best = min(errors, key=errors.get)
        problem.accept(best, cands[best][0], cands[best][1])
        if on_step is not None:
            on_step(best, errors)
        achieved = sum(problem.s[p] * params[p] for p in PROJECTIONS) / total
        while pending and achieved >= pending[0] - 1e-9:
            t = pending.pop(0)
            alloc[t] = [problem.s[p] for p in PROJECTIONS]
            errs[t] = errors[best] / max(problem.dense_sq, 1e-300)
    for t in pending:  # every projection capped before reaching the target (huge targets)
        alloc[t] = [problem.s[p] for p in PROJECTIONS]
        errs[t] = problem.error(problem.cur) / max(problem.dense_sq, 1e-300)
    return alloc, errs


def threshold_fn(model, calib: Calibration, layer: int, scoring: str):
    """(proj, s) -> threshold for block `layer` under `scoring`, memoised."""
    cache = {}
    norms = {name: p.column_norms() for name, p in block_projections(model.layers[layer]).items()} \
        if scoring == "weight" else {}

    def get(proj, s):
        key = (proj, round(s, 9))
        if key not in cache:
            t = calib.projection_threshold(layer, proj, s, scoring, norms.get(proj))
            cache[key] = t.to(model.tok_embeddings.weight.device) if torch.is_tensor(t) else t
        return cache[key]
    return get


@torch.no_grad()
def greedy_search(model, calib: Calibration, token_ids: Tensor, *, n_tokens: int = 4096,
                  seq_len: int = 512, positions: int = 32, step: float = 0.01,
                  scorings: Sequence[str] = ("magnitude", "weight"),
                  targets: Sequence[float] = TARGETS, seed: int = 0, progress: bool = True,
                  source: Optional[dict] = None, device=None) -> GreedyAllocation:
    """Block-wise greedy allocation for every block and scoring method (see module doc).

    Args:
        model: a `model.Transformer` (run dense; its flags are untouched).
        calib: its Calibration (thresholds come from its histograms).
        token_ids: 1-D calibration token ids; the first `n_tokens` (whole windows of
            `seq_len`) are used.
        positions: positions per window at which block outputs are compared (sampled once,
            shared by all windows; all if >= seq_len).
        step: block parameter-weighted sparsity added per greedy step.
        scorings: "magnitude" and/or "weight".
        source: provenance stored in the metadata (e.g. thresholds path, text).

    Raises:
        ValueError: fewer tokens than one window.
    """
    from tqdm import tqdm

    calib.check_model(model.config.to_dict())
    device = device or model.tok_embeddings.weight.device
    seq_len = min(seq_len, model.config.block_size)
    n_win = min(n_tokens, token_ids.numel()) // seq_len
    if n_win < 1:
        raise ValueError(f"the greedy search needs at least {seq_len} tokens, "
                         f"got {token_ids.numel()}")
    ids = token_ids[:n_win * seq_len].view(n_win, seq_len).to(device)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(seq_len, generator=g)[:positions].sort().values.to(device)
    pos, freqs, mask = rope_and_mask(model, seq_len, device)
    n_layer = model.config.n_layer
    out = GreedyAllocation(dict(
        format=FORMAT, model=model.config.to_dict(), n_layer=n_layer,
        projections=list(PROJECTIONS), targets=list(targets), step=step,
        tokens=n_win * seq_len, seq_len=seq_len, positions=int(idx.numel()),
        seed=seed, scorings=list(scorings), error="sum of squared block-output error vs dense "
        "at the sampled positions / sum of squared dense block output",
        source=source or {}))
    for sc in scorings:
        out.allocations[sc] = {_key(t): [None] * n_layer for t in targets}
        out.errors[sc] = {_key(t): [None] * n_layer for t in targets}
    bar = tqdm(total=n_layer * len(scorings), desc="greedy", unit="block", disable=not progress)
    x = model.tok_embeddings(ids)  # (W, L, D) dense block input
    with configured(model, sparse=False, track=False):
        _search_blocks(model, calib, x, idx, pos, freqs, mask, step, targets, scorings, out, bar)
    bar.close()
    return out


def _search_blocks(model, calib, x, idx, pos, freqs, mask, step, targets, scorings, out, bar):
    for layer, block in enumerate(model.layers):
        params = param_counts(block)
        for sc in scorings:
            prob = BlockProblem(block, x, idx, freqs, threshold_fn(model, calib, layer, sc))
            alloc, errs = greedy_block(prob, params, step, targets)
            for t in targets:
                out.allocations[sc][_key(t)][layer] = [round(v, 6) for v in alloc[t]]
                out.errors[sc][_key(t)][layer] = errs[t]
            bar.update(1)
        kv, block.attention.kv_cache = block.attention.kv_cache, None
        try:
            x = block(x, pos, freqs, mask)  # dense propagation to the next block
        finally:
            block.attention.kv_cache = kv


__all__ = ["GreedyAllocation", "AllocationError", "greedy_search", "greedy_block",
           "BlockProblem", "param_counts", "TARGETS", "FORMAT"]
