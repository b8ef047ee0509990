"""Which sparse-GEMV kernel runs a call: configs, the measured dispatch table, the policy.

Pure Python (no Triton), so it can be read and tested anywhere.

- `GemvConfig`: an algorithm and its block sizes (what a table row holds).
- `Launch`: a config resolved for one call (grid split, constexprs): plain ints, passed to
  the registered op, so a compiled decode step captures exactly one kernel per projection.
- `DispatchTable`: rows keyed by GPU, call kind ("seg": one or more column segments with
  their own thresholds; "gated": gate/up with the SwiGLU epilogue), K, N, activation dtype,
  weight format and a range of calibrated sparsity, each row with its provenance (command,
  commit). Calls no row matches take `generic_config` (a rule, also tuned on the H200).
- `KernelPolicy`: the explicit object a model, a benchmark or a test hands over to choose
  kernels: on/off for the GEMV and attention kernels, the CPU interpreter, the table, or one
  forced config. Nothing here reads environment variables or mutable module state.

No run-time autotuning: the first (eager) call already uses the final kernel, and CUDA-graph
capture never triggers benchmarking.
"""

from __future__ import annotations

import functools
import json
from math import gcd as _gcd
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch

from .formats import get_format

__all__ = ["ALGORITHMS", "GemvConfig", "Launch", "TableRow", "DispatchTable", "KernelPolicy",
           "DEFAULT_TABLE", "DEFAULT_POLICY", "generic_config", "resolve", "cdiv", "next_pow2",
           "device_key", "num_sms", "fit_format", "words_fit", "ballot_runs", "rows_config", "MAX_ROWS"]

ALGORITHMS = ("mask", "dot", "list", "words", "torch", "ballot")
_KSPLIT_MAX = 4096  # list: the x range a program loads at once (registers)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class GemvConfig:
    """An algorithm and its tunables.

    Attributes:
        algo: "mask" (masked slab loop on CUDA cores: a program walks its K range BLOCK_K rows
            at a time, loading only kept rows), "dot" (the same product as a 16-row tensor-core
            tile whose row 0 holds the masked x, so Triton pipelines the masked weight loads
            through cp.async), or "list" (kept-row lists: programs loop over gathered kept rows
            only, so instructions and bytes follow the kept rows), or "words" (int8 / int4
            only: 32-bit code words split into bit planes on CUDA cores, warps own rows,
            threads own words; block_k rows per step over num_warps warps), or "torch"
            (dense weights only: no Triton kernel; each segment's input masked, the S masked
            copies stacked, one cuBLAS GEMM over every weight row, `teal.kernels.torch_gemm`:
            for shapes where every kernel measured slower than cuBLAS), or "ballot" (dense
            bf16/fp16 on CUDA only: the CUDA C++ kernel of `teal.kernels.ballot`; each warp
            votes on 32 channels' keep flags and loads only the kept rows, num_stages (4 or
            8; other values round to them) rows in flight per warp; 256-column tiles;
            num_warps 1..8; split / waves as for the others, k_per_split a multiple of 32; a
            split of 2..16 is summed inside a thread-block cluster on compute capability
            9.0+; block_k unused).
        block_n: output columns per program (power of 2).
        block_k: input channels per loop step (power of 2).
        split: programs along K (0: from `waves`).
        num_warps, num_stages: Triton launch options (num_stages: cp.async ring depth of dot
            and list).
        acc2d: mask: 2-D fp32 accumulator reduced once at the end (else reduced per step).
        pipe: mask: 1 prefetches the next step's mask, 2 also its weight tile.
        waves: target programs per SM when split == 0.
        ksplit: list: channels per program (rounded up to a power of 2; 0: from waves).
        inline: list: every program builds its range's kept list itself (no pre-pass launch).
        rchunk: split-K partial rows the last program sums per step (0: all at once).
        warm: dot: the prologue reads the K range's x into L1 this many at a time (0: off).
    """

    algo: str = "mask"
    block_n: int = 256
    block_k: int = 32
    split: int = 0
    num_warps: int = 4
    num_stages: int = 3
    acc2d: bool = True
    pipe: int = 1
    waves: float = 4.0
    ksplit: int = 0
    inline: bool = False
    rchunk: int = 8
    warm: int = 2048

    def __post_init__(self):
        if self.algo not in ALGORITHMS:
            raise ValueError(f"unknown kernel algorithm {self.algo!r}; choose from {ALGORITHMS}")
        if not (_pow2(self.block_n) and _pow2(self.block_k) and self.block_n >= 16
                and self.block_k >= 8):
            raise ValueError(f"block_n ({self.block_n}) and block_k ({self.block_k}) must be "
                             f"powers of 2, block_n >= 16 and block_k >= 8")
        if self.pipe not in (1, 2):
            raise ValueError(f"pipe must be 1 or 2, got {self.pipe}")
        if not (_pow2(self.num_warps) and self.num_warps <= 32) or self.num_stages < 1:
            raise ValueError(f"num_warps must be a power of 2 up to 32 and num_stages >= 1, got "
                             f"{self.num_warps}, {self.num_stages}")
        if self.split < 0 or self.ksplit < 0 or self.rchunk < 0 or self.warm < 0 or self.waves <= 0:
            raise ValueError(f"split, ksplit, rchunk and warm must be >= 0 and waves > 0: {self}")


@dataclass(frozen=True)
class Launch:
    """A `GemvConfig` resolved for one call: every field an int (see GemvConfig).

    split programs along K own k_per_split channels each (the last one may own fewer).
    """

    algo: int
    block_n: int
    block_k: int
    split: int
    k_per_split: int
    num_warps: int
    num_stages: int
    acc2d: int
    pipe: int
    inline: int
    rchunk: int
    warm: int

    def encode(self) -> list:
        return [int(getattr(self, f)) for f in self.__dataclass_fields__]

    @classmethod
    def decode(cls, values: Sequence[int]) -> "Launch":
        return cls(*[int(v) for v in values])

    @property
    def algo_name(self) -> str:
        return ALGORITHMS[self.algo]


def _split_for(K: int, n_tiles: int, cfg: GemvConfig, sms: int, align: int = 1) -> tuple[int, int]:
    """(split, k_per_split): k_per_split a multiple of block_k and of `align` (words: the
    int4 group), no empty range; list: a power of 2 (the x range the kernel loads as one
    arange)."""
    if cfg.algo == "list":
        if cfg.ksplit > 0:
            ks = next_pow2(cfg.ksplit)
        else:
            split = cfg.split if cfg.split > 0 else max(1, round(cfg.waves * sms / max(1, n_tiles)))
            ks = next_pow2(cdiv(K, max(1, split)))
        ks = max(16, cfg.block_k, min(ks, _KSPLIT_MAX, next_pow2(K)))
        return cdiv(K, ks), ks
    unit = cfg.block_k * align // _gcd(cfg.block_k, align)
    if cfg.algo == "ballot":
        unit = BALLOT_CHUNK
    slabs = cdiv(K, unit)
    split = cfg.split if cfg.split > 0 else max(1, round(cfg.waves * sms / max(1, n_tiles)))
    split = max(1, min(split, slabs, 256))
    kps = cdiv(slabs, split) * unit
    return cdiv(K, kps), kps


def resolve(cfg: GemvConfig, kind: str, K: int, sizes: Sequence[int], sms: int,
            group: int = 0) -> Launch:
    """Resolve `cfg` for a call of `kind` ("seg": column segments `sizes`; "gated": sizes =
    (F, F)) over K input channels on a device with `sms` multiprocessors (group: the int4
    scale group, which a words launch's K ranges must hold whole)."""
    n_cols = sizes[0] if kind == "gated" else sum(sizes)
    bn = cfg.block_n
    align = group if cfg.algo == "words" and group else 1
    if cfg.algo == "ballot":  # the kernel's fixed tile; K ranges of whole 32-channel ballots
        bn, align = BALLOT_BLOCK_N, BALLOT_CHUNK
        cfg = replace(cfg, num_stages=8 if cfg.num_stages >= 8 else 4)  # rows in flight
    while cfg.algo != "ballot" and bn > 16 and bn // 2 >= n_cols:  # no tiles much wider than the problem
        bn //= 2
    cfg = replace(cfg, block_n=bn)
    n_tiles = cdiv(sizes[0], bn) if kind == "gated" else sum(cdiv(n, bn) for n in sizes)
    split, kps = _split_for(K, n_tiles, cfg, sms, align)
    rchunk = cfg.rchunk or max(1, min(next_pow2(split), max(1, 8192 // bn)))
    warm = max(16, min(next_pow2(cfg.warm), next_pow2(kps))) if cfg.warm > 0 else 0
    return Launch(ALGORITHMS.index(cfg.algo), bn, cfg.block_k, split, kps, cfg.num_warps,
                  cfg.num_stages, int(cfg.acc2d), cfg.pipe, int(cfg.inline), rchunk, warm)


@dataclass(frozen=True)
class TableRow:
    """One measured dispatch decision.

    Attributes:
        gpu: device name as torch reports it (e.g. "NVIDIA H200").
        kind: "seg" or "gated".
        K: input channels; N: output columns (seg: all segments together; gated: F).
        config: the kernel to run.
        dtypes: activation dtypes the row applies to.
        wformat: weight format ("dense": stored in the activation dtype).
        sparsity: [lo, hi) range of the call's calibrated sparsity (the lowest of a fused
            call's projections).
        source: how the row was chosen and measured (command, commit, raw data).
    """

    gpu: str
    kind: str
    K: int
    N: int
    config: GemvConfig
    dtypes: tuple = ("bfloat16", "float16")
    wformat: str = "dense"
    sparsity: tuple = (0.0, 1.0)
    source: str = ""

    def __post_init__(self):
        lo_hi = tuple(self.sparsity) if isinstance(self.sparsity, (list, tuple)) else ()
        problems = [
            (not isinstance(self.gpu, str), f"gpu {self.gpu!r} is not a device name"),
            (self.kind not in ("seg", "gated"), f"kind {self.kind!r} is not 'seg' or 'gated'"),
            (not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (self.K, self.N)),
             f"K and N must be positive integers, got {self.K!r}, {self.N!r}"),
            (not isinstance(self.config, GemvConfig), f"config {self.config!r} is not a GemvConfig"),
            (not isinstance(self.dtypes, tuple) or not self.dtypes
             or not all(d in ("bfloat16", "float16") for d in self.dtypes),
             f"dtypes {self.dtypes!r} must be a non-empty list of 'bfloat16' / 'float16'"),
            (not isinstance(self.wformat, str), f"wformat {self.wformat!r} is not a format name"),
            (len(lo_hi) != 2 or not all(isinstance(v, (int, float)) for v in lo_hi)
             or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0,
             f"sparsity {self.sparsity!r} must be [lo, hi] with 0 <= lo < hi <= 1"),
        ]
        bad = [why for failed, why in problems if failed]
        if bad:
            raise ValueError(f"bad dispatch table row ({'; '.join(bad)})")

    def matches(self, gpu: str, kind: str, K: int, N: int, dtype: str, wformat: str,
                sparsity: float) -> bool:
        lo, hi = self.sparsity
        return (self.gpu == gpu and self.kind == kind and self.K == K and self.N == N
                and dtype in self.dtypes and self.wformat == wformat and lo <= sparsity < hi)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtypes"], d["sparsity"] = list(self.dtypes), list(self.sparsity)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TableRow":
        """A row from its `to_dict` form. Raises ValueError for a malformed row."""
        if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
            raise ValueError(f"a table row must be an object with a 'config' object, got {d!r}")
        d = dict(d)
        d["config"] = GemvConfig(**d["config"])
        for key in ("dtypes", "sparsity"):
            if key in d:
                d[key] = tuple(d[key]) if isinstance(d[key], list) else d[key]
        return cls(**d)


@dataclass(frozen=True)
class DispatchTable:
    """Ordered rows; the first row that matches a call decides it (`lookup`)."""

    rows: tuple = ()

    def lookup(self, gpu: str, kind: str, K: int, N: int, dtype: str, wformat: str,
               sparsity: float) -> Optional[TableRow]:
        return next((r for r in self.rows if r.matches(gpu, kind, K, N, dtype, wformat, sparsity)),
                    None)

    def with_rows(self, rows: Sequence[TableRow]) -> "DispatchTable":
        """A table whose given rows take precedence over this one's."""
        return DispatchTable(tuple(rows) + self.rows)

    def to_json(self) -> list:
        return [r.to_dict() for r in self.rows]

    @classmethod
    def from_json(cls, rows: list) -> "DispatchTable":
        if not isinstance(rows, list):
            raise ValueError(f"a dispatch table is a JSON list of rows, got a {type(rows).__name__}")
        out = []
        for i, r in enumerate(rows):
            try:
                out.append(TableRow.from_dict(r))
            except (TypeError, ValueError) as e:
                raise ValueError(f"row {i}: {e}") from None
        return cls(tuple(out))

    @classmethod
    def load(cls, path) -> "DispatchTable":
        """Read a table written by `to_json` (e.g. `bench_gemv.py --compare --table-out`).

        Raises:
            ValueError: missing or malformed file.
        """
        try:
            with open(path) as f:
                return cls.from_json(json.load(f))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"cannot read the kernel table {path} ({e.__class__.__name__}: {e}); "
                             f"pass a file written by scripts/bench_gemv.py --table-out") from None


# --------------------------------------------------------------------------- the rules
# Masked slab loop: run 1's sweep winners (H200, bench_gemv --sweep at aa58eaa): wide rows
# for plain projections; 256 B gate + 256 B up rows with a register double buffer.
_MASK_SEG = GemvConfig(block_n=512, block_k=16, num_warps=4, acc2d=True, pipe=1, waves=4)
_MASK_GATED = GemvConfig(block_n=128, block_k=32, num_warps=4, acc2d=True, pipe=2, waves=4)
# Tensor-core tiles: round 3's compare winners (bench_gemv --compare at bb21dee).
_DOT_QKV = GemvConfig(algo="dot", block_n=256, block_k=64, num_warps=8, num_stages=3, waves=2, rchunk=0)
_DOT_O = GemvConfig(algo="dot", block_n=128, block_k=128, num_warps=4, num_stages=3, waves=2, rchunk=0)
_DOT_DOWN = replace(_DOT_O, waves=3)
_DOT_GATED = GemvConfig(algo="dot", block_n=128, block_k=64, num_warps=4, num_stages=3, waves=2, rchunk=0)
# Kept-row lists (bench_gemv.py --compare at 31216c8, H200): inline lists for q/k/v, o and down,
# pre-pass lists for gate/up.
_LIST_QKV_O = GemvConfig(algo="list", inline=True, block_n=128, block_k=64, num_warps=4, num_stages=5,
                         ksplit=512, rchunk=0)
_LIST_DOWN = GemvConfig(algo="list", inline=True, block_n=128, block_k=64, num_warps=4, num_stages=5,
                        ksplit=1024, rchunk=0)
_LIST_GATED = GemvConfig(algo="list", block_n=64, block_k=64, num_warps=4, num_stages=6, ksplit=1024, rchunk=0)


# Quantized weights (int8 / int4): the masked loop with 16-byte code loads, measured on the
# H200 at the Llama-3-8B shapes (scratch probe of 14 mask and 2 dot configs per shape at 0%
# and 50%, commit after 45bd935; numbers in notes/kernels.md "Quantized formats"): int8 wins
# with 128 x 64 tiles on q/k/v, o and down and 256 x 32 on gate/up; int4 with 256 x 32.
_MASK_Q8 = GemvConfig(block_n=128, block_k=64, num_warps=4, acc2d=True, pipe=2, waves=4)
_MASK_Q = GemvConfig(block_n=256, block_k=32, num_warps=4, acc2d=True, pipe=2, waves=4)


# The words kernel (int8 / int4 code words split into bit planes): one warp per program, 16
# rows per step; chosen from its offline sm_90 SASS (about 4.6 instructions per int8 code and
# 3.3 per int4 code in the loop, against 5.4 and 9.4 for the masked loop's configs above).
# Generic rule: the best words configs of the H200 compare at 73c4a95 (notes/quant_gemv_words_h200.json).
_WORDS_Q8 = GemvConfig(algo="words", block_n=512, block_k=16, num_warps=4, waves=4, rchunk=0)
_WORDS_Q4 = GemvConfig(algo="words", block_n=512, block_k=16, num_warps=4, waves=4, rchunk=0)
_WORDS_Q4_WIDE = GemvConfig(algo="words", block_n=512, block_k=32, num_warps=4, waves=2, rchunk=0)
_WORDS_Q8_GATED = GemvConfig(algo="words", block_n=1024, block_k=32, num_warps=4, waves=1, rchunk=0)


# Small shapes (K or N under 2048): the generic rule, and the config of several rows per
# call (batch decoding, speculative verification), which run on the dot algorithm only (its
# 16-row A operand holds up to 16 input rows).  Measured at one row on the default model's
# shapes (bench_gemv.py --compare, SMALL rows below).
_DOT_SMALL = GemvConfig(algo="dot", block_n=64, block_k=64, num_warps=4, num_stages=3, waves=2, rchunk=0)
MAX_ROWS = 16  # rows per call the dot kernel takes (its BLOCK_M)
# Rows per call sent to the sparse kernels by default (KernelPolicy.max_rows), measured by
# `bench_gemv.py --rows 1 2 3 4 8 16 --sparsities 0.25 0.5 0.8` at 7488b2d on the H200
# (notes/gemv_rows_h200.json): at 50% with independent masks per row, one Llama-3-8B layer's
# four GEMVs take 115.5 us on the kernel against 121.6 us on cuBLAS for 2 rows (q/k/v alone
# loses, 18.4 against 15.1 us), 149.1 against 122.7 us for 3 rows; more rows lose further.
DEFAULT_MAX_ROWS = 2


# The masked cuBLAS GEMM (no kernel): where cuBLAS beats every sparse kernel.
_TORCH = GemvConfig(algo="torch")
# The ballot CUDA kernel's fixed geometry (teal/kernels/ballot.py, cuda_gemv.cu)
BALLOT_BLOCK_N = 256
BALLOT_CHUNK = 32


def rows_config(cfg: GemvConfig, kind: str, K: int, n_cols: int) -> GemvConfig:
    """The config of a call with several rows: `cfg` if it is a dot or torch config, else the dot
    config of the shape's family (large shapes: `generic_config`'s dense rule; small ones
    `_DOT_SMALL`).  The weight tiles are the same as one row's; only the A operand holds M
    rows instead of one."""
    if cfg.algo in ("dot", "torch"):
        return cfg
    if K >= 2048 and n_cols >= 2048:
        return generic_config(kind, K, n_cols)
    return _DOT_SMALL


def generic_config(kind: str, K: int, n_cols: int, wformat: str = "dense") -> GemvConfig:
    """Calls no table row matches: quantized weights the words kernel (`_WORDS_Q8`,
    `_WORDS_Q4`; calls whose segments are not whole code words fall back to the masked loop's
    `_MASK_Q8` / `_MASK_Q`, see `_launch`);
    dense large shapes (K and N >= 2048) the tensor-core family of the Llama shapes'
    winners, small ones `_DOT_SMALL` (the best kernel on all four of the default model's
    shapes on the H200, 1.5-1.9x faster there than the masked loop the rule gave before)."""
    if wformat != "dense":
        return _WORDS_Q8 if wformat == "int8" else _WORDS_Q4
    if K >= 2048 and n_cols >= 2048:
        if kind == "gated":
            return _DOT_GATED
        return _DOT_DOWN if K > n_cols else (_DOT_O if n_cols <= 4096 else _DOT_QKV)
    return _DOT_SMALL


_H200 = "NVIDIA H200"
# The low-sparsity configs were chosen in rounds 1 and 3 (bench_gemv --sweep at aa58eaa,
# --compare at bb21dee, 3e626ef) and won again in the v2 compare below; the kept-row lists
# take over where they measured faster.  Both ranges were timed by
# `bench_gemv.py --compare --compare-sparsities 0 0.5 0.8 0.9` and `... 0.55 0.6 0.65 0.7 0.75 0.8`
# at 31216c8 (notes/gemv_v2_compare.json): each cut-off is the first measured sparsity where the
# best list beats the best masked/dot config by >= 2% (ties kept on the masked side).
_V2 = "bench_gemv.py --compare at 31216c8 (notes/gemv_v2_compare.json)"


def _rows(K: int, N: int, kind: str, low: GemvConfig, high: GemvConfig, cut: float, why: str) -> tuple:
    return (TableRow(_H200, kind, K, N, low, sparsity=(0.0, cut), source=f"{_V2}; {why}"),
            TableRow(_H200, kind, K, N, high, sparsity=(cut, 1.0),
                     source=f"{_V2}; lists from {cut:.0%}: {why}"))


H200_ROWS = (
    # Llama-3-8B: fused q/k/v, o (also Llama-2-7B's), fused gate/up, down
    *_rows(4096, 6144, "seg", _DOT_QKV, _LIST_QKV_O, 0.70, "at 70% 11.2 vs 11.8 us (dot), tie at 65%"),
    *_rows(4096, 4096, "seg", _DOT_O, _LIST_QKV_O, 0.80, "at 80% 8.0 vs 9.0 us (dot), tie at 75%"),
    *_rows(4096, 14336, "gated", _DOT_GATED, _LIST_GATED, 0.70, "at 70% 33.8 vs 36.6 us (dot), tie at 65%"),
    *_rows(14336, 4096, "seg", _DOT_DOWN, _LIST_DOWN, 0.70, "at 70% 18.4 vs 19.5 us (dot), tie at 65%"),
    # Llama-2-7B: q/k/v on the masked loop below 75% (dot measured slower there: 21.6 vs 20.0
    # us at 50%); gate/up and down take their family's dot configs
    *_rows(4096, 12288, "seg", _MASK_SEG, _LIST_QKV_O, 0.75, "at 75% 15.2 vs 16.6 us (mask), mask at 70%"),
    *_rows(4096, 11008, "gated", _DOT_GATED, _LIST_GATED, 0.70, "at 70% 26.0 vs 27.2 us (mask), tie at 65%"),
    *_rows(11008, 4096, "seg", _DOT_DOWN, _LIST_DOWN, 0.65, "at 65% 15.8 vs 17.0 us (dot), tie at 60%"),
)
# The ballot CUDA kernel (teal/kernels/ballot.py) in each sparsity range where its best
# candidate measured >= 2% faster than the rows below it (the default dispatch of `b74c29b`),
# timed in one process at a66e812: `bench_gemv.py --compare --algos ballot --vs-default
# --no-bench --compare-sparsities 0 0.25 0.4 0.5 0.65 --shapes llama3-8b:* llama2-7b:*`
# (notes/ballot_gemv_h200.json; ranges split halfway between the measured sparsities, none
# above 70%, where the kept-row lists take over; Llama-2-7B's o_proj is Llama-3-8B's shape and
# took that shape's rows).  The cluster configs' times moved by up to 8% between two H200
# calls (o at 50%: 8.6 and 9.4 us; Triton's within 1%), so a range won by less than that may
# flip.  Where the kernel cannot run (no nvcc, another GPU), the next matching row decides
# (`_next_to_ballot`).
_BALLOT_SRC = "bench_gemv.py --compare --algos ballot --vs-default (notes/ballot_gemv_h200.json)"
_BALLOT_CFGS = {f"b{u}w{w}s{s}": GemvConfig(algo="ballot", block_n=256, num_warps=w, num_stages=u,
                                             split=s, rchunk=0)
                for u in (4, 8) for w in (4, 8) for s in (4, 8, 16)}
_BALLOT_CFGS.update({f"b{u}w8v4": GemvConfig(algo="ballot", block_n=256, num_warps=8, num_stages=u,
                                               waves=4, rchunk=0) for u in (4, 8)})


def _brow(kind: str, K: int, N: int, label: str, sparsity: tuple, why: str) -> TableRow:
    return TableRow(_H200, kind, K, N, _BALLOT_CFGS[label], sparsity=sparsity,
                    source=f"{_BALLOT_SRC}; {label}: {why} (ballot vs default)")


H200_BALLOT_ROWS = (
    _brow("seg", 4096, 6144, "b8w8s8", (0.0, 0.7), "0% 15.8 vs 17.8, 25% 14.0 vs 14.7, 40% 12.3 vs 13.2, 50% 11.4 vs 12.6, 65% 9.4 vs 12.1 us"),
    _brow("seg", 4096, 4096, "b8w8s16", (0.0, 0.125), "0% 12.5 vs 13.0 us"),
    _brow("seg", 4096, 4096, "b8w8s16", (0.325, 0.7), "40% 9.9 vs 10.4, 50% 9.4 vs 10.0, 65% 7.9 vs 9.6 us"),
    _brow("gated", 4096, 14336, "b8w8s4", (0.0, 0.125), "0% 58.4 vs 59.9 us"),
    _brow("gated", 4096, 14336, "b8w8s4", (0.45, 0.7), "50% 35.1 vs 37.4, 65% 27.0 vs 36.5 us"),
    _brow("seg", 14336, 4096, "b4w8v4", (0.0, 0.125), "0% 30.9 vs 32.6 us"),
    _brow("seg", 14336, 4096, "b8w8v4", (0.125, 0.7), "25% 25.5 vs 26.8, 40% 21.5 vs 22.3, 50% 19.1 vs 20.5, 65% 15.3 vs 19.7 us"),
    _brow("seg", 4096, 12288, "b8w8s4", (0.0, 0.125), "0% 27.6 vs 29.6 us"),
    _brow("seg", 4096, 12288, "b8w8s8", (0.125, 0.7), "25% 22.4 vs 24.4, 40% 18.9 vs 21.6, 50% 16.6 vs 20.1, 65% 13.4 vs 17.9 us"),
    _brow("gated", 4096, 11008, "b8w8s8", (0.325, 0.7), "40% 31.2 vs 32.1, 50% 26.8 vs 29.5, 65% 20.0 vs 28.1 us"),
    _brow("seg", 11008, 4096, "b8w8v4", (0.0, 0.575), "0% 25.4 vs 27.0, 25% 21.7 vs 22.7, 40% 18.6 vs 19.0, 50% 16.7 vs 17.6 us"),
    _brow("seg", 11008, 4096, "b8w8s16", (0.575, 0.7), "65% 13.4 vs 15.7 us"),
)
# Quantized weights on the Llama-3-8B shapes: the winners of `bench_gemv.py --compare --wformat
# int8 int4-g32 int4-g128 --compare-sparsities 0 0.5` at 73c4a95 (score t0 + 2 t50; raw:
# notes/quant_gemv_words_h200.json).  int8: the tensor-core kept-row lists except on gate/up;
# int4 (g64 takes g128's rows): the words kernel.
_Q = "bench_gemv.py --compare --wformat int8 int4-g32 int4-g128 at 73c4a95 (notes/quant_gemv_words_h200.json)"


def _qrow(kind, K, N, wformat, cfg, why):
    return TableRow(_H200, kind, K, N, cfg, dtypes=("bfloat16",), wformat=wformat, source=f"{_Q}; {why}")


_LIST_QKV_PRE = replace(_LIST_QKV_O, inline=False)
H200_QUANT_ROWS = (
    _qrow("seg", 4096, 6144, "int8", _LIST_QKV_PRE, "18.3/13.4 us at 0/50% (torch int8 10.8)"),
    _qrow("seg", 4096, 4096, "int8", _LIST_QKV_O, "13.3/11.0 us"),
    _qrow("gated", 4096, 14336, "int8", _WORDS_Q8_GATED, "45.6/40.5 us (torch int8 37.3)"),
    _qrow("seg", 14336, 4096, "int8", _LIST_DOWN, "37.4/25.4 us"),
    *(_qrow("seg", 4096, 4096, f, _WORDS_Q4_WIDE, "o: 512x32 (g128 11.9/11.4 us, tinygemm 7.0)")
      for f in ("int4-g32", "int4-g64", "int4-g128")),
    _qrow("gated", 4096, 14336, "int4-g32", _WORDS_Q4_WIDE, "51.0/50.7 us (tinygemm 40.2)"),
)
# The default model (SmolLM2-135M-Instruct), dense: `bench_gemv.py --compare --no-bench
# --shapes smollm2-135m:... --compare-sparsities 0 0.5` (session 13, notes/gemv_small_h200.json):
# no kernel beats cuBLAS on q/k/v (best d64x64 4.46 us at 50% against 4.03) or on gate/up
# (m64x64 6.07 against 4.11 + the 1.0 us SwiGLU kernel the dense path runs), so those take
# the masked cuBLAS GEMM (its masks fuse into the RMSNorm when compiled); o and down keep the
# kernel (4.32 against 3.62 + a mask kernel; 4.70 against 5.03).
_SMALL = "bench_gemv.py --compare --shapes smollm2-135m:* (notes/gemv_small_h200.json)"
H200_SMALL_ROWS = (
    TableRow(_H200, "seg", 576, 960, _TORCH, source=f"{_SMALL}; cuBLAS 4.03 us, best kernel 4.46 us at 50%"),
    TableRow(_H200, "gated", 576, 1536, _TORCH, source=f"{_SMALL}; cuBLAS 4.11 us + SwiGLU, best kernel 6.07 us"),
    TableRow(_H200, "seg", 576, 576, _DOT_SMALL, source=f"{_SMALL}; 4.32 us at 50%, cuBLAS 3.62 + mask"),
    TableRow(_H200, "seg", 1536, 576, _DOT_SMALL, source=f"{_SMALL}; 4.70 us at 50%, cuBLAS 5.03"),
)
DEFAULT_TABLE = DispatchTable(H200_QUANT_ROWS + H200_BALLOT_ROWS + H200_ROWS + H200_SMALL_ROWS)


# --------------------------------------------------------------------------- devices
@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> tuple[str, int]:
    p = torch.cuda.get_device_properties(index)
    return p.name, p.multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_key(device) -> str:
    """The table's GPU key of a device: its CUDA name, or "cpu" (the Triton interpreter)."""
    device = torch.device(device)
    return _cuda_props(_cuda_index(device))[0] if device.type == "cuda" else device.type


def num_sms(device) -> int:
    """Multiprocessors of a CUDA device; 4 for the CPU interpreter (enough programs along K
    to exercise the split-K paths)."""
    device = torch.device(device)
    return _cuda_props(_cuda_index(device))[1] if device.type == "cuda" else 4


# --------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class KernelPolicy:
    """How a model (or a benchmark, or a test) chooses its decode kernels.

    Attributes:
        gemv: run TEAL decode projections through the sparse GEMV kernels where they apply
            (CUDA, fp16/bf16, one token); False: the exact torch path (mask, then matmul).
        attention: run single-query decode attention through the fused Triton kernel where it
            applies; False: the torch path.
        interpreter: also run the kernels on CPU tensors through Triton's interpreter (tests;
            slow; Triton must have been imported with TRITON_INTERPRET=1).
        table: the dispatch table (default: the H200 measurements).
        config: force this config for every GEMV call (benchmarks, tests); None: the table.
        cpu: on the CPU (without the interpreter), the implementation that reads only kept
            weight rows (`teal.kernels.cpu`): "compiled" (the C++ kernel, built on first use;
            "gather" where it cannot be built), "gather" (pure torch, one token), or None (the
            exact torch path: mask, then a matmul over every row).  Needs `gemv`.
        max_rows: the most rows (tokens: batch decoding, speculative verification) one call
            sends to the sparse kernels (dense and int8 weights, 1..16); a call with more rows
            takes the torch path (mask, then one GEMM over every weight row), where the union
            of the rows' masks leaves too little to skip.  Default `DEFAULT_MAX_ROWS`.

    `set_kernel_policy(model, policy)` (teal.sparse_linear) hands one to every module.
    """

    gemv: bool = True
    attention: bool = True
    interpreter: bool = False
    table: DispatchTable = field(default=DEFAULT_TABLE, repr=False)
    config: Optional[GemvConfig] = None
    cpu: Optional[str] = "compiled"
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self):
        if self.cpu not in (None, "compiled", "gather"):
            raise ValueError(f"KernelPolicy.cpu must be 'compiled', 'gather' or None, got {self.cpu!r}")
        if not (isinstance(self.max_rows, int) and 1 <= self.max_rows <= MAX_ROWS):
            raise ValueError(f"KernelPolicy.max_rows must be an int in [1, {MAX_ROWS}], got "
                             f"{self.max_rows!r}")

    def allows(self, device) -> bool:
        """Kernels may run on this device under this policy (availability aside)."""
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and self.interpreter)

    def choose(self, kind: str, K: int, sizes: Sequence[int], dtype: torch.dtype,
               wformat: str, sparsity: float, device) -> tuple[GemvConfig, Optional[TableRow]]:
        """(config, the table row it came from or None) for a call; see `launch`."""
        if self.config is not None:
            return self.config, None
        n_cols = sizes[0] if kind == "gated" else sum(sizes)
        dname = str(dtype).removeprefix("torch.")
        row = self.table.lookup(device_key(device), kind, K, n_cols, dname, wformat, sparsity)
        return (row.config if row is not None else generic_config(kind, K, n_cols, wformat)), row

    def launch(self, kind: str, K: int, sizes: Sequence[int], dtype: torch.dtype,
               wformat: str, sparsity: float, device, rows: int = 1) -> Launch:
        """The resolved launch of a call.

        Args:
            kind: "seg" (column segments `sizes`, one threshold each) or "gated" (gate/up,
                sizes = (F, F)).
            K: input channels. dtype: activation dtype. wformat: weight format ("dense").
            sparsity: the calibrated sparsity of the call (the lowest of its projections').
            device: where it runs.
            rows: input rows per call, 1..16; more than one runs the dot algorithm
                (`rows_config`), whose launch serves any row count up to 16.
        Raises:
            ValueError: rows outside [1, 16], or several rows of int4 weights (one row only).
        """
        rows = int(rows)
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"the sparse kernels take 1 to {MAX_ROWS} rows per call, got {rows}")
        if rows > 1 and get_format(wformat).wfmt == 2:
            raise ValueError(f"{wformat} weights run one row per call; several rows take the "
                             f"torch path (KernelPolicy.max_rows=1 for this module)")
        return _launch(self, kind, int(K), tuple(int(s) for s in sizes), dtype, wformat,
                       round(float(sparsity), 6), str(torch.device(device)), rows > 1)

    def takes_rows(self, wformat: str) -> bool:
        """Several rows of a `wformat` weight can run on the sparse kernels under this policy
        (max_rows > 1, dense or int8 weights)."""
        return self.max_rows > 1 and get_format(wformat).wfmt != 2


def fit_format(cfg: GemvConfig, kind: str, K: int, n_cols: int, wformat: str) -> GemvConfig:
    """`cfg` made valid for a weight format: int4 runs on the masked loop only (its tiles on
    the tensor cores or in kept-row lists would need the nibbles interleaved in the loop,
    which compiles to byte loads), with tiles inside one scale group (block_k at most the
    group size); a config of another algorithm becomes the masked loop's generic one."""
    fmt = get_format(wformat)
    if cfg.algo in ("torch", "ballot"):
        return cfg if not fmt.quantized else generic_config(kind, K, n_cols, wformat)
    if cfg.algo == "words":
        if not fmt.quantized:
            return generic_config(kind, K, n_cols, wformat)
        return replace(cfg, block_k=max(cfg.num_warps, min(cfg.block_k, fmt.group or cfg.block_k)))
    group = fmt.group
    if not group:
        return cfg
    if cfg.algo != "mask":
        cfg = generic_config(kind, K, n_cols, wformat)
    return replace(cfg, block_k=min(cfg.block_k, group))


@functools.lru_cache(maxsize=4096)
def _launch(policy, kind, K, sizes, dtype, wformat, sparsity, device, multi=False) -> Launch:
    cfg, _ = policy.choose(kind, K, sizes, dtype, wformat, sparsity, device)
    n_cols = sizes[0] if kind == "gated" else sum(sizes)
    if multi:
        return resolve(rows_config(cfg, kind, K, n_cols), kind, K, sizes, num_sms(device))
    cfg = fit_format(cfg, kind, K, n_cols, wformat)
    if cfg.algo == "ballot" and not ballot_runs(sizes, dtype, wformat, device):
        cfg = _next_to_ballot(policy, kind, K, n_cols, dtype, wformat, sparsity, device)
    if cfg.algo == "words" and not words_fit(wformat, sizes):
        cfg = fit_format(_masked_for(kind, wformat), kind, K, n_cols, wformat)
    return resolve(cfg, kind, K, sizes, num_sms(device), get_format(wformat).group)


def _next_to_ballot(policy, kind, K, n_cols, dtype, wformat, sparsity, device) -> GemvConfig:
    """Where a ballot config cannot run: the first matching table row of another algorithm
    (a forced config or no such row: the shape's generic config)."""
    if policy.config is None:
        dname = str(dtype).removeprefix("torch.")
        key = device_key(device)
        row = next((r for r in policy.table.rows if r.config.algo != "ballot"
                    and r.matches(key, kind, K, n_cols, dname, wformat, sparsity)), None)
        if row is not None:
            return fit_format(row.config, kind, K, n_cols, wformat)
    return generic_config(kind, K, n_cols, wformat)


def ballot_runs(sizes, dtype, wformat: str, device) -> bool:
    """The ballot CUDA kernel takes this call here: a CUDA device where it builds, dense
    bf16/fp16 weights, segments of multiples of 8 columns (else dispatch takes the next
    table row of another algorithm, `_next_to_ballot`)."""
    from . import ballot  # (torch and ctypes only)
    return (torch.device(device).type == "cuda" and ballot.fits(sizes, dtype, wformat)
            and ballot.available(device))


def _masked_for(kind: str, wformat: str) -> GemvConfig:
    """The masked loop's config for a quantized call the words kernel cannot take."""
    return _MASK_Q8 if wformat == "int8" and kind != "gated" else _MASK_Q


def words_fit(wformat: str, sizes) -> bool:
    """Every segment a whole number of 32-bit code words (int8: 4 columns, int4: 8)."""
    cpw = {1: 4, 2: 8}.get(get_format(wformat).wfmt)
    return cpw is not None and all(int(s) % cpw == 0 for s in sizes)


DEFAULT_POLICY = KernelPolicy()
