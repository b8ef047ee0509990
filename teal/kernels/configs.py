"""Block-size heuristics for the sparse GEMV kernels (no runtime autotuning).

No ``triton.autotune``: configs are picked by a small deterministic rule so that the first
call (eager warm-up) already uses the final kernel and CUDA-graph capture never triggers
benchmarking.  The constants below were tuned on an H200 (132 SMs), see notes/kernels.md.
Pure Python: importable without Triton.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

__all__ = ["GemvConfig", "pick_config", "cdiv", "next_pow2", "rchunk_for", "warm_for"]

_KSPLIT_MAX = 4096  # compact: x vector per program (registers in the prologue)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 256      # output columns per program (bf16: 512 B contiguous per row)
    block_k: int = 32       # input channels per loop step
    split: int = 0          # programs along K (0: derive from waves)
    num_warps: int = 4
    num_stages: int = 3
    acc2d: bool = True      # 2-D fp32 accumulator, reduced once at the end
    pipe: int = 1           # 0 plain, 1 prefetch next mask, 2 also next weight tile
    waves: float = 4.0      # target programs per SM when split == 0
    algo: str = "mask"      # "mask": masked slab loop (round 1); "compact": kept-row lists;
                            # "dot": tensor-core tiles with pipelined masked loads (round 3);
                            # "list": kept-row lists built by a pre-pass, gathered rows (round 4);
                            # "ilist": the same, each program building its range's list
    ksplit: int = 0         # compact/list/ilist: channels per program (rounded up to a power of 2; 0: from waves)
    rchunk: int = 8         # split-K partial rows summed per step by the last program (0: auto)
    warm: int = 2048        # dot: prologue reads the K range's x into L1 this many at a time (0: off)


# Overrides, keyed by (kind, K, N) where kind in {"seg", "gated"} and N is N_total (seg) or
# F (gated).  Filled from the H200 sweep; shapes not listed use the generic rule.
_SEG = GemvConfig(block_n=512, block_k=16, num_warps=4, acc2d=True, pipe=1, waves=4)
_GATED = GemvConfig(block_n=128, block_k=32, num_warps=4, acc2d=True, pipe=2, waves=4)

# H200 sweep, run 1 (bf16, 50% sparsity, CUDA graphs, rotating weights): notes/kernels.md
_TABLE_R1: dict = {
    ("seg", 4096, 1024): GemvConfig(block_n=512, block_k=64, num_warps=4, acc2d=False, pipe=1, waves=3),
    ("seg", 4096, 4096): replace(_SEG, waves=2),
    ("seg", 4096, 6144): replace(_SEG, waves=3),
    ("seg", 4096, 12288): _SEG,
    ("seg", 4096, 14336): _SEG,
    ("seg", 14336, 4096): _SEG,
    ("seg", 11008, 4096): _SEG,
    ("gated", 4096, 14336): replace(_GATED, waves=3),
    ("gated", 4096, 11008): _GATED,
}

# Round 3 (H200, "dot": tensor-core tiles, cp.async-pipelined masked loads; notes/kernels.md):
# bench_gemv.py --compare winners (score t0 + 2 t50 + t90) at the Llama-3-8B shapes, the
# Llama-2-7B shapes taking their family's winner.  Round 1 stays for shapes not listed.
_DOT_QKV = GemvConfig(algo="dot", block_n=256, block_k=64, num_warps=8, num_stages=3, waves=2, rchunk=0)
_DOT_O = GemvConfig(algo="dot", block_n=128, block_k=128, num_warps=4, num_stages=3, waves=2, rchunk=0)
_DOT_DOWN = replace(_DOT_O, waves=3)
_DOT_GATED = GemvConfig(algo="dot", block_n=128, block_k=64, num_warps=4, num_stages=3, waves=2, rchunk=0)
_TABLE_R3: dict = {
    ("seg", 4096, 4096): _DOT_O,
    ("seg", 4096, 6144): _DOT_QKV,
    ("seg", 14336, 4096): _DOT_DOWN,
    ("seg", 11008, 4096): _DOT_DOWN,
    ("gated", 4096, 14336): _DOT_GATED,
    ("gated", 4096, 11008): _DOT_GATED,
}

_TABLE: dict = {**_TABLE_R1, **_TABLE_R3}

# High sparsity (session 3, H200, bench_gemv.py --compare; notes/kernels.md rounds 4-5): the
# kept-row-list kernels' time follows the kept rows while "dot" keeps a floor, so at 90% they
# are 1.5-2x faster (us at 90%: q/k/v 7.0 vs 11.3, o 6.1 vs 8.5, gate/up 18.5 vs 35.9, down
# 10.3 vs 19.0) and slower at 50% (a fixed ~6-8 us per call). Linear in density between the
# two measured points they cross at ~60-66%; projections whose thresholds are calibrated for
# LIST_FROM or more (interpolated: 1.25-1.45x faster at 80%) take these configs.
# TEAL_LIST_FROM=<fraction> overrides the cut-off (e.g. 1.01: never).
LIST_FROM = float(os.environ.get("TEAL_LIST_FROM", "0.8"))
_ILIST_QKV_O = GemvConfig(algo="ilist", block_n=128, block_k=64, num_warps=4, num_stages=5, ksplit=512, rchunk=0)
_LIST_DOWN = GemvConfig(algo="list", block_n=128, block_k=64, num_warps=4, num_stages=5, ksplit=1024, rchunk=0)
_LIST_GATED = GemvConfig(algo="list", block_n=128, block_k=32, num_warps=4, num_stages=6, ksplit=512, rchunk=0)
_TABLE_HIGH: dict = {
    ("seg", 4096, 4096): _ILIST_QKV_O,
    ("seg", 4096, 6144): _ILIST_QKV_O,
    ("seg", 4096, 12288): _ILIST_QKV_O,     # Llama-2 q/k/v: the Llama-3 q/k/v winner (unmeasured)
    ("seg", 14336, 4096): _LIST_DOWN,
    ("seg", 11008, 4096): _LIST_DOWN,       # Llama-2 down (unmeasured shape, same family)
    ("gated", 4096, 14336): _LIST_GATED,
    ("gated", 4096, 11008): _LIST_GATED,    # Llama-2 gate/up (unmeasured shape, same family)
}

_DEFAULT = GemvConfig()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _split_for(K: int, n_tiles: int, cfg: GemvConfig, num_sms: int) -> tuple[int, int]:
    """Return (split, k_per_split) with k_per_split a multiple of block_k and no empty split.

    algo "compact": k_per_split is the power of two KSPLIT (the x vector a program loads).
    """
    if cfg.algo in ("compact", "list", "ilist"):
        if cfg.ksplit > 0:
            ks = next_pow2(cfg.ksplit)  # the kernels' x range is a power-of-2 arange
        else:
            split = cfg.split if cfg.split > 0 else max(1, round(cfg.waves * num_sms / max(1, n_tiles)))
            ks = next_pow2(cdiv(K, max(1, split)))
        ks = max(16, cfg.block_k, min(ks, _KSPLIT_MAX, next_pow2(K)))
        return cdiv(K, ks), ks
    slabs = cdiv(K, cfg.block_k)
    if cfg.split > 0:
        split = cfg.split
    else:
        split = max(1, round(cfg.waves * num_sms / max(1, n_tiles)))
    split = max(1, min(split, slabs, 256))
    kps = cdiv(slabs, split) * cfg.block_k
    split = cdiv(K, kps)
    return split, kps


def pick_config(
    kind: str, K: int, n_cols: int, n_tiles_fn, num_sms: int, override: Optional[GemvConfig] = None,
    sparsity: float = 0.0,
) -> tuple[GemvConfig, int, int]:
    """Choose (config, split, k_per_split) for a launch.

    kind: "seg" or "gated"; n_cols: N_total (seg) or F (gated);
    n_tiles_fn(block_n) -> number of column tiles (programs along N) for that block_n;
    sparsity: the expected fraction of dropped channels (>= LIST_FROM: the kept-row-list
    config of _TABLE_HIGH where the shape has one).
    """
    cfg = override
    if cfg is None and sparsity >= LIST_FROM:
        cfg = _TABLE_HIGH.get((kind, K, n_cols))
    cfg = cfg or _TABLE.get((kind, K, n_cols)) or _generic(kind, K, n_cols)
    # never use tiles much wider than the problem
    bn = cfg.block_n
    while bn > 16 and bn // 2 >= n_cols:
        bn //= 2
    if bn != cfg.block_n:
        cfg = replace(cfg, block_n=bn)
    split, kps = _split_for(K, n_tiles_fn(cfg.block_n), cfg, num_sms)
    return cfg, split, kps


def round1_config(kind: str, K: int, n_cols: int) -> GemvConfig:
    """The round-1 (masked slab loop) config of a shape: for before/after benchmarks."""
    return _TABLE_R1.get((kind, K, n_cols)) or (_GATED if kind == "gated" else _SEG)


def table_to_json(table: dict) -> list:
    return [dict(kind=k[0], K=k[1], n=k[2], config=asdict(v)) for k, v in sorted(table.items())]


def load_table(path: str) -> dict:
    """Read table entries written by table_to_json (e.g. by scripts/bench_gemv.py --compare)."""
    with open(path) as f:
        rows = json.load(f)
    return {(r["kind"], int(r["K"]), int(r["n"])): GemvConfig(**r["config"]) for r in rows}


def _generic(kind: str, K: int, n_cols: int) -> GemvConfig:
    """Shapes not in the table: large ones (K and N >= 2048) take the round-3 winners'
    family ("dot"); small ones the round-1 masked loop (wide rows for plain projections,
    256 B gate + 256 B up rows with a register double buffer for gate/up)."""
    if K >= 2048 and n_cols >= 2048:
        if kind == "gated":
            return _DOT_GATED
        return _DOT_DOWN if K > n_cols else (_DOT_O if n_cols <= 4096 else _DOT_QKV)
    return _GATED if kind == "gated" else _SEG


def warm_for(cfg: GemvConfig, k_per_split: int) -> int:
    """dot: WARM constexpr (power of 2, <= cfg.warm, no wider than the K range); 0 = off."""
    if cfg.warm <= 0:
        return 0
    return max(16, min(next_pow2(cfg.warm), next_pow2(k_per_split)))


def rchunk_for(cfg: GemvConfig, split: int) -> int:
    """Partial rows per step of the split-K tail: cfg.rchunk, or (0) all of them at once up
    to ~8K fp32 values per step (a single L2 round trip for the usual splits)."""
    if cfg.rchunk > 0:
        return cfg.rchunk
    return max(1, min(next_pow2(split), max(1, 8192 // cfg.block_n)))


# Tuning hook: TEAL_GEMV_TABLE=path.json (table_to_json format) overrides table entries, so a
# freshly tuned table can be benchmarked end to end before it is written into _TABLE.
if os.environ.get("TEAL_GEMV_TABLE"):
    _TABLE.update(load_table(os.environ["TEAL_GEMV_TABLE"]))
