"""Block-size heuristics for the sparse GEMV kernels (no runtime autotuning).

No ``triton.autotune``: configs are picked by a small deterministic rule so that the first
call (eager warm-up) already uses the final kernel and CUDA-graph capture never triggers
benchmarking.  The constants below were tuned on an H200 (132 SMs), see notes/kernels.md.
Pure Python: importable without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

__all__ = ["GemvConfig", "pick_config", "cdiv"]


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


# Overrides, keyed by (kind, K, N) where kind in {"seg", "gated"} and N is N_total (seg) or
# F (gated).  Filled from the H200 sweep; shapes not listed use the generic rule.
_SEG = GemvConfig(block_n=512, block_k=16, num_warps=4, acc2d=True, pipe=1, waves=4)
_GATED = GemvConfig(block_n=128, block_k=32, num_warps=4, acc2d=True, pipe=2, waves=4)

# H200 sweep, run 1 (bf16, 50% sparsity, CUDA graphs, rotating weights): notes/kernels.md
_TABLE: dict = {
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

_DEFAULT = GemvConfig()


def _split_for(K: int, n_tiles: int, cfg: GemvConfig, num_sms: int) -> tuple[int, int]:
    """Return (split, k_per_split) with k_per_split a multiple of block_k and no empty split."""
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
    kind: str, K: int, n_cols: int, n_tiles_fn, num_sms: int, override: Optional[GemvConfig] = None
) -> tuple[GemvConfig, int, int]:
    """Choose (config, split, k_per_split) for a launch.

    kind: "seg" or "gated"; n_cols: N_total (seg) or F (gated);
    n_tiles_fn(block_n) -> number of column tiles (programs along N) for that block_n.
    """
    cfg = override or _TABLE.get((kind, K, n_cols)) or _generic(kind, K, n_cols)
    # never use tiles much wider than the problem
    bn = cfg.block_n
    while bn > 16 and bn // 2 >= n_cols:
        bn //= 2
    if bn != cfg.block_n:
        cfg = replace(cfg, block_n=bn)
    split, kps = _split_for(K, n_tiles_fn(cfg.block_n), cfg, num_sms)
    return cfg, split, kps


def _generic(kind: str, K: int, n_cols: int) -> GemvConfig:
    """Shapes not in the table: the sweep winners' family (wide 1 KB rows for plain
    projections; 256 B gate + 256 B up rows with a register double buffer for gate/up)."""
    return _GATED if kind == "gated" else _SEG
