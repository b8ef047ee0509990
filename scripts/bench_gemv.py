#!/usr/bin/env python
"""Benchmark the TEAL sparse GEMV kernels against cuBLAS dense (F.linear), one decode row.

    python scripts/bench_gemv.py --json gemv.json                 # the dispatch table's kernels
    python scripts/bench_gemv.py --compare --table-out table.json # candidates; winners -> rows
    python scripts/bench_gemv.py --table table.json --json b.json # time a tuned table
    python scripts/bench_gemv.py --wformat dense int8 int4-g128 --json q.json  # weight formats
    python scripts/bench_gemv.py --rows 1 2 4 8 16 --sparsities 0.5 0.8   # several rows per call

Shapes: the fused projections of Llama-3-8B and Llama-2-7B (q/k/v, o, gate/up, down).  For
every shape and sparsity the kernel the policy dispatches (its table row for this GPU and
the calibrated sparsity, else the generic rule) is first checked against the float64
reference, then timed: the median over replays of a CUDA graph that calls it many times,
cycling over rotating weight copies several times larger than the L2, so each call streams
its weights from HBM.  GB/s counts the bytes an ideal sparse kernel must read (kept rows x
N x 2 B, plus x and y), "% copy" is that over the device-to-device copy bandwidth measured
in the same run.

--wformat times every shape x sparsity in each weight format (teal.kernels.formats): the
random weight is quantized with teal.quant ("int8": per output channel; "int4-g<G>": min/max
per group of G input channels), the kernels are checked against the float64 reference of the
dequantized weight, and GB/s counts kept rows x stored bytes per row (int8: N, int4: N / 2)
plus all the scales, x and y.  Each format has its own torch baseline, timed the same way
(rotating copies, CUDA graph): "dense" cuBLAS `F.linear(x, W)`; "int8" gpt-fast's weight-only
path `F.linear(x, W_int8.to(x.dtype)) * s` (torch.compile'd with coordinate-descent tuning,
as gpt-fast runs it: inductor then fuses the int8 -> bf16 conversion into one M = 1 GEMV
reduction; --eager-baselines: eager, which materialises a bf16 copy of W every call); "int4"
torch's tinygemm `aten._weight_int4pack_mm` on the same codes (bf16 only).  Rows also carry
the bf16 cuBLAS time of the shape.

--compare times candidate configs of every algorithm (masked loop, tensor-core tiles,
kept-row lists) per shape at --compare-sparsities and picks, per shape, the best below and
above the 80% cut-off (score: t0 + 2 t50 for the low range, t90 for the high one); the
winners are written as table rows with their provenance (command, commit) by --table-out.
With a quantized --wformat the candidates are first fitted to it (`fit_format`; int4: the
masked loop only, tiles inside one scale group), candidates that become the same config are
timed once, and the rows (and --table-out's table rows) are keyed by that format.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from teal import quant
from teal.io import atomic_write_json
from teal.kernels import DEFAULT_TABLE, DispatchTable, GemvConfig, KernelPolicy, TableRow
from teal.kernels import reference as R
from teal.kernels.dispatch import ALGORITHMS, fit_format
from teal.kernels.torch_gemm import masked_rows
from teal.kernels.formats import FORMATS, get_format
from teal.provenance import environment

# (model, name, kind, K, segment widths (seg) or F (gated))
SHAPES = [
    ("llama3-8b", "qkv", "seg", 4096, (4096, 1024, 1024)),
    ("llama3-8b", "o", "seg", 4096, (4096,)),
    ("llama3-8b", "gate_up", "gated", 4096, 14336),
    ("llama3-8b", "down", "seg", 14336, (4096,)),
    ("llama2-7b", "qkv", "seg", 4096, (4096, 4096, 4096)),
    ("llama2-7b", "o", "seg", 4096, (4096,)),
    ("llama2-7b", "gate_up", "gated", 4096, 11008),
    ("llama2-7b", "down", "seg", 11008, (4096,)),
    # the default model (SmolLM2-135M-Instruct): launch- and latency-bound, where dispatch must
    # not pick a sparse kernel slower than cuBLAS (issue 13)
    ("smollm2-135m", "qkv", "seg", 576, (576, 192, 192)),
    ("smollm2-135m", "o", "seg", 576, (576,)),
    ("smollm2-135m", "gate_up", "gated", 576, 1536),
    ("smollm2-135m", "down", "seg", 1536, (576,)),
]
SPARSITIES = [0.0, 0.25, 0.40, 0.50, 0.65, 0.80, 0.90]
HIGH = 0.8  # the table's cut-off between the low and high sparsity rows


def _dot(bn, bk, nw, st, waves):
    return GemvConfig(algo="dot", block_n=bn, block_k=bk, num_warps=nw, num_stages=st, waves=waves, rchunk=0)


def _list(bn, bk, nw, st, ks, inline=False):
    return GemvConfig(algo="list", inline=inline, block_n=bn, block_k=bk, num_warps=nw, num_stages=st,
                      ksplit=ks, rchunk=0)


_MASK_SEG = GemvConfig(block_n=512, block_k=16, num_warps=4, acc2d=True, pipe=1, waves=4)
_MASK_GATED = GemvConfig(block_n=128, block_k=32, num_warps=4, acc2d=True, pipe=2, waves=4)
# --compare candidates per projection (rounds 1-5's finalists, notes/kernels.md).  With
# gathered (indirect) weight loads Triton keeps num_stages - 2 weight buffers in flight
# (offline sm_90 compile), hence 5-6 stages for the lists.
CANDIDATES = {
    "qkv": [_MASK_SEG, _dot(256, 64, 8, 3, 2), _dot(128, 128, 4, 3, 2), _dot(64, 64, 4, 4, 1),
            _list(128, 64, 4, 5, 512), _list(128, 64, 4, 5, 512, True), _list(64, 64, 4, 6, 512, True)],
    "o": [_MASK_SEG, _dot(128, 128, 4, 3, 2), _dot(64, 128, 4, 3, 4), _dot(64, 64, 4, 4, 2),
          _list(128, 64, 4, 5, 512), _list(128, 64, 4, 5, 512, True), _list(64, 64, 4, 6, 512, True)],
    "gate_up": [_MASK_GATED, _dot(128, 64, 4, 3, 2), _dot(128, 64, 4, 3, 1), _dot(64, 64, 4, 4, 1),
                _list(128, 32, 4, 6, 512), _list(64, 64, 4, 6, 1024), _list(128, 64, 4, 5, 1024, True)],
    "down": [_MASK_SEG, _dot(128, 128, 4, 3, 3), _dot(128, 128, 4, 3, 2), _dot(128, 64, 4, 4, 2),
             _list(128, 64, 4, 5, 1024), _list(128, 64, 4, 4, 2048), _list(128, 64, 4, 5, 1024, True)],
}


def _mask(bn, bk, pipe, waves, split=0, nw=4):
    return GemvConfig(block_n=bn, block_k=bk, num_warps=nw, acc2d=True, pipe=pipe, waves=waves, split=split)


# Small shapes (K or N under 2048, the default model's): the generic rule (masked loop) and
# fewer, shorter split-K ranges, down to one program per column tile (no partials, no
# arrival counter), and small tensor-core tiles.
_TORCH = GemvConfig(algo="torch")
SMALL_CANDIDATES = {
    "seg": [_TORCH, _MASK_SEG, _mask(128, 32, 1, 2), _mask(64, 64, 1, 1), _mask(128, 64, 2, 1, split=2),
            _mask(64, 32, 2, 1, split=1), _mask(32, 64, 2, 1, split=1), _dot(64, 64, 4, 3, 2),
            _dot(32, 64, 4, 3, 1)],
    "gated": [_TORCH, _MASK_GATED, _mask(128, 32, 2, 2), _mask(64, 64, 2, 1), _mask(64, 32, 2, 1, split=1),
              _mask(32, 64, 2, 1, split=1), _dot(64, 64, 4, 3, 2), _dot(32, 64, 4, 3, 1)],
}


def _words(bn, bk, nw, waves):
    return GemvConfig(algo="words", block_n=bn, block_k=bk, num_warps=nw, waves=waves, rchunk=0)


# words (int8 / int4 only; dropped for dense): 128 words a row (int8 512 columns, int4 1024),
# block_k rows a step over num_warps warps
_WORDS = [_words(512, 16, 4, 2), _words(512, 32, 4, 2), _words(512, 32, 8, 2), _words(512, 16, 4, 4),
          _words(1024, 16, 4, 2), _words(1024, 32, 8, 2), _words(1024, 16, 4, 4), _words(1024, 32, 4, 1)]
for _name in CANDIDATES:
    CANDIDATES[_name] = CANDIDATES[_name] + _WORDS


def _ballot(unroll, nw, waves=4.0, split=0):
    return GemvConfig(algo="ballot", block_n=256, num_warps=nw, num_stages=unroll, waves=waves,
                      split=split, rchunk=0)


# ballot (the CUDA C++ kernel; dense bf16/fp16 on CUDA, teal/kernels/ballot.py): rows in flight
# per warp x warps per block; splits of 2..16 are summed inside a thread-block cluster (H100 /
# H200), larger ones (from waves) by the global tail
_BALLOT = [_ballot(8, 8, split=16), _ballot(8, 8, split=8), _ballot(8, 4, split=16),
           _ballot(4, 8, split=16), _ballot(8, 8, split=4), _ballot(8, 8, waves=4),
           _ballot(8, 8, waves=8), _ballot(4, 8, waves=4)]
for _name in CANDIDATES:
    CANDIDATES[_name] = CANDIDATES[_name] + _BALLOT
_BALLOT_SMALL = [_ballot(8, 4, split=4), _ballot(8, 2, split=8), _ballot(4, 1, split=16),
                 _ballot(8, 4, waves=4)]


def n_cols(kind, arg):
    return sum(arg) if kind == "seg" else arg


def label(cfg: GemvConfig) -> str:
    if cfg.algo == "list":
        return f"{'i' if cfg.inline else 'l'}{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}k{cfg.ksplit}"
    if cfg.algo == "dot":
        return f"d{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}v{cfg.waves:g}"
    if cfg.algo == "words":
        return f"w{cfg.block_n}x{cfg.block_k}n{cfg.num_warps}v{cfg.waves:g}"
    if cfg.algo == "torch":
        return "torch"
    if cfg.algo == "ballot":
        return f"b{cfg.num_stages}w{cfg.num_warps}" + (f"s{cfg.split}" if cfg.split else f"v{cfg.waves:g}")
    return f"m{cfg.block_n}x{cfg.block_k}p{cfg.pipe}v{cfg.waves:g}"


# --------------------------------------------------------------------------- torch baselines
# The weight-only quantized paths of torch that the quantized formats are measured against
# (also used by scripts/bench_decode.py).  They take the codes and scales of teal.quant, so
# baseline and kernel read the same quantized weight.
WFORMATS = tuple(FORMATS)  # "dense", "int8", "int4-g32", "int4-g64", "int4-g128"


def int8_baseline_weight(codes: torch.Tensor, scales: torch.Tensor, dtype) -> tuple:
    """gpt-fast's WeightOnlyInt8Linear storage of a teal.quant int8 weight: the int8 codes
    (N, K) (nn.Linear layout) and the per-output-channel scales (N,) in the activation dtype."""
    return codes.t().contiguous(), scales.to(dtype).contiguous()


def int8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-fast's int8 weight-only product: ``F.linear(x, w_int8.to(x.dtype)) * scales``."""
    return F.linear(x, w.to(dtype=x.dtype)) * scales


def tinygemm_inner_k_tiles(K: int) -> int:
    """The largest innerKTiles (8, 4, 2) tinygemm's packing allows for K input channels."""
    for tiles in (8, 4, 2):
        if K % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"torch's int4 tinygemm needs K a multiple of 32, got K = {K}")


def tinygemm_pack(codes: torch.Tensor, scales: torch.Tensor, group: int, dtype) -> tuple:
    """A teal.quant int4 weight in torch's tinygemm layout: (packed weight, scales_and_zeros,
    N).

    teal stores ``W = q * s + b`` (q in [0, 15], uint8 (K, N / 2) two columns per byte; bf16
    scales, read through `teal.quant.int4_scale_bias`); tinygemm computes
    ``W = (q - 8) * s + z`` per (group, column), so ``z = b + 8 s`` (rounded to the activation dtype: the baseline's only difference from the
    teal weight).  The codes are re-packed along K as `_convert_weight_to_int4pack` takes them
    (torch >= 2.5: uint8 (N, K / 2), element 2j in the high nibble, 2j + 1 in the low one; on
    CPU `_convert_weight_to_int4pack_for_cpu` takes int32 (N, K)).  N is padded to a multiple
    of 16 (zero weights) where it is not one (CPU packing needs it; outputs are sliced).

    Raises:
        ValueError: K not a multiple of the group size or of 32 (tinygemm's constraints).
    """
    q = quant.unpack_int4(codes)                      # (K, N) uint8 in [0, 15]
    K, N = q.shape
    if K % group:
        raise ValueError(f"torch's int4 tinygemm needs K a multiple of the group size {group}, "
                         f"got K = {K}")
    tiles = tinygemm_inner_k_tiles(K)
    s, b = quant.int4_scale_bias(scales)              # fp32 (G, N) each, column order
    sz = torch.stack((s, b + 8.0 * s), dim=-1)        # (G, N, 2)
    pad = -N % 16
    if pad:
        q = torch.cat([q, q.new_zeros(K, pad)], dim=1)
        sz = torch.cat([sz, sz.new_zeros(sz.shape[0], pad, 2)], dim=1)
    w = q.t().contiguous()                            # (Np, K)
    if w.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack(
            ((w[:, 0::2] << 4) | w[:, 1::2]).contiguous(), tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.to(torch.int32), tiles)
    return packed, sz.to(dtype).contiguous(), N


def tinygemm_mm(x2: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """``x2 @ W.t()`` for x2 (M, K) contiguous through torch's int4 tinygemm (CUDA: bf16 only;
    CPU: `_weight_int4pack_mm_for_cpu`); (M, Np) in x2's dtype."""
    if x2.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x2, packed, group, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, sz)


def _set_recompile_limit(n: int) -> None:
    """Let torch.compile keep at least `n` graphs per function (one per shape / config)."""
    import torch._dynamo as dynamo
    cfg = dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * n)


_COMPILED_INT8 = {}


def compiled_int8_linear():
    """`int8_linear` under torch.compile with coordinate-descent tuning (gpt-fast's setting,
    which makes inductor decompose the M = 1 product into a reduction with the int8 -> bf16
    conversion and the scales fused); one compiled function, a graph per shape."""
    if "fn" not in _COMPILED_INT8:
        _set_recompile_limit(64)
        _COMPILED_INT8["fn"] = torch.compile(int8_linear, dynamic=False, fullgraph=True,
                                             options={"coordinate_descent_tuning": True})
    return _COMPILED_INT8["fn"]


BASELINE_NAME = {"dense": "cuBLAS", "int8": "torch int8", "int4": "torch int4"}


class Bench:
    """One shape in one weight format: rotating weight copies (> 4x L2), an activation,
    thresholds per sparsity, the format's torch baseline.

    `base`: the (K, N) weight in the activation dtype to use (quantized for a quantized
    format); None draws one (N(0, 1/K))."""

    def __init__(self, kind, K, arg, dtype, l2_bytes, device, wformat="dense", base=None,
                 eager_baselines=False):
        self.kind, self.K, self.arg, self.dtype, self.device = kind, K, arg, dtype, device
        self.fmt = get_format(wformat)
        self.mode, self.group = quant.parse_format(wformat)
        self.N = N = sum(arg) if kind == "seg" else 2 * arg
        if base is None:
            base = (torch.randn(K, N, device=device) / K ** 0.5).to(dtype)
        if not self.fmt.quantized:
            codes, scales = base, None
            self.ref_wt = base
        else:
            codes, scales = quant.quantize(base.t(), quant.QuantSpec(self.mode, self.group))
            self.ref_wt = quant.dequantize(wformat, codes, scales)   # fp32 (K, N)
        self.row_bytes = codes.shape[1] * codes.element_size()     # stored bytes per input channel
        self.scale_bytes = 0 if scales is None else scales.numel() * scales.element_size()
        copies = max(2, math.ceil(4 * l2_bytes / (K * self.row_bytes + self.scale_bytes)))
        self.wt = [codes.clone() for _ in range(copies)]
        self.sc = [None if scales is None else scales.clone() for _ in range(copies)]
        # the torch baseline's own storage of the same weight
        if self.mode == "dense":
            self.base_w = [w.t().contiguous() for w in self.wt]
            self.base_fn = F.linear
        elif self.mode == "int8":
            self.base_w = [int8_baseline_weight(c, s, dtype) for c, s in zip(self.wt, self.sc)]
            self.base_fn = int8_linear if eager_baselines else compiled_int8_linear()
        else:
            if dtype != torch.bfloat16:
                raise ValueError(f"torch's int4 tinygemm baseline runs bf16 only, not {dtype}")
            self.base_w = [tinygemm_pack(c, s, self.group, dtype)[:2] for c, s in zip(self.wt, self.sc)]
        self.baseline = BASELINE_NAME[self.mode] + (" (eager)" if eager_baselines and self.mode == "int8" else "")
        del base, codes, scales
        self.x = torch.randn(1, K, device=device).to(dtype)

    @property
    def wformat(self) -> str:
        return self.fmt.name

    def thresholds(self, s):
        """(thresholds (rows,), kept channels) for target sparsity s (quantile of |x|)."""
        ax = self.x.float().abs().reshape(-1)
        t = torch.quantile(ax.cpu(), s).item() if s > 0 else 0.0
        rows = len(self.arg) if self.kind == "seg" else 2
        return torch.full((rows,), t, dtype=torch.float32, device=self.device), int((ax > t).sum())

    def active_bytes(self, kept):
        """Bytes an ideal kernel reads and writes: kept rows of the stored weight, all the
        scales (int4: every group, an upper bound), x and y."""
        out = self.arg if self.kind == "gated" else self.N
        el = self.x.element_size()
        return kept * self.row_bytes + self.scale_bytes + self.K * el + out * el

    def full_bytes(self):
        """Bytes of a dense product in this format (the torch baseline's ideal): every row."""
        return self.K * self.row_bytes + self.scale_bytes + (self.K + self.N) * self.x.element_size()

    def call(self, i, t, s, policy):
        from teal import kernels
        w, sc = self.wt[i], self.sc[i]
        if self.kind == "seg":
            ends = [int(b) for b in torch.tensor(self.arg).cumsum(0)]
            return kernels.sparse_gemv(self.x, w, t, ends, sparsity=s, policy=policy,
                                       wformat=self.wformat, scales=sc)
        return kernels.sparse_gated_gemv(self.x, w, t, sparsity=s, policy=policy,
                                         wformat=self.wformat, scales=sc)

    def ref(self, t, row: int = 0):
        """float64 masked product of input row `row` (its own mask)."""
        if self.kind == "seg":
            ends = [int(b) for b in torch.tensor(self.arg).cumsum(0)]
            return R.sparse_gemv_ref(self.x[row], self.ref_wt, t, ends)
        return R.sparse_gated_gemv_ref(self.x[row], self.ref_wt, t)

    def check(self, t, s, policy) -> str:
        """'' if every input row's output matches its float64 reference and the call is
        bitwise repeatable, else why."""
        y1, y2 = self.call(0, t, s, policy), self.call(0, t, s, policy)
        if not torch.equal(y1, y2):
            return "not bitwise repeatable"
        for m in range(self.x.shape[0]):
            ref = self.ref(t, m)
            err = ((y1[m].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if not err < 1e-2:
                return f"row {m}: rel err {err:.3g}"
        return ""

    def baseline_call(self, i):
        """The format's torch baseline: the plain product x W^T over all N columns (no mask,
        no SwiGLU epilogue, like the cuBLAS row)."""
        if self.mode == "dense":
            return F.linear(self.x, self.base_w[i])
        if self.mode == "int8":
            return self.base_fn(self.x, *self.base_w[i])
        packed, sz = self.base_w[i]
        y = tinygemm_mm(self.x, packed, self.group, sz)
        return y[:, :self.N] if y.shape[1] != self.N else y

    def check_baseline(self) -> str:
        """'' if the baseline matches x @ W (float64, the dequantized weight), else why."""
        y = self.baseline_call(0)
        ref = self.x[0].double() @ self.ref_wt.double()
        err = ((y[0].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        tol = 2e-2 if self.mode == "int4" else 1e-2  # tinygemm: z = b + 8 s rounded to bf16
        return "" if err < tol else f"{self.baseline} rel err {err:.3g} against the dequantized weight"

    def sparse_fns(self, t, s, policy):
        """One call per weight copy.  A call the policy sends to the masked cuBLAS GEMM
        (algorithm "torch") is timed as that GEMM over the S masked rows made beforehand,
        as a compiled decode step runs it: the masks fuse into the kernel producing x."""
        kind = self.kind
        sizes = list(self.arg) if kind == "seg" else [self.arg, self.arg]
        lc = policy.launch(kind, self.K, sizes, self.dtype, self.wformat, s, self.device)
        if lc.algo_name == "torch":
            xs = masked_rows(self.x, t, len(sizes))
            return [lambda i=i: xs @ self.wt[i] for i in range(len(self.wt))]
        return [lambda i=i: self.call(i, t, s, policy) for i in range(len(self.wt))]

    def baseline_fns(self):
        return [lambda i=i: self.baseline_call(i) for i in range(len(self.wt))]



def time_graph(fns, min_calls=48, reps=12):
    """Median microseconds per call: a CUDA graph of >= min_calls calls cycling over fns."""
    calls = [fns[i % len(fns)] for i in range(max(min_calls, len(fns)))]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls[: len(fns)]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / len(calls))
    del g
    return statistics.median(ts)


def copy_bandwidth():
    """Device-to-device copy GB/s (bytes read + written), median of 10 copies of 1 GiB."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return 2 * n / statistics.median(ts) / 1e9


def _benches(kind, K, arg, dtype, l2, wformats, eager_baselines):
    """(bf16 cuBLAS us of the shape, [(wformat, Bench) made one at a time]) : the formats
    share one random weight, so every format quantizes the same values."""
    dense = Bench(kind, K, arg, dtype, l2, "cuda")
    cublas = time_graph(dense.baseline_fns())
    base = dense.wt[0]
    wformats = list(wformats)

    def gen():
        nonlocal dense
        for i, wf in enumerate(wformats):
            b = dense if wf == "dense" else Bench(kind, K, arg, dtype, l2, "cuda", wf, base,
                                                  eager_baselines)
            if "dense" not in wformats[i + 1:]:
                dense = None  # its copies go once its rows are done
            yield wf, b
            del b
            torch.cuda.empty_cache()
    return cublas, gen()


def _baseline_us(b: Bench, cublas: float, model, name) -> float:
    if b.mode == "dense":
        return cublas
    bad = b.check_baseline()
    if bad:
        raise SystemExit(f"error: {model} {name} {b.wformat}: {bad}")
    return time_graph(b.baseline_fns())


def run_bench(shapes, sparsities, policy, l2, dtype, copy_bw, tqdm, wformats=("dense",),
              eager_baselines=False):
    """Time the dispatched kernel of every (shape, format, sparsity); rows for the JSON and
    table."""
    rows = []
    for model, name, kind, K, arg in tqdm(shapes, desc="bench", unit="shape"):
        cublas, benches = _benches(kind, K, arg, dtype, l2, wformats, eager_baselines)
        sizes = arg if kind == "seg" else (arg, arg)
        for wf, b in benches:
            base_us = _baseline_us(b, cublas, model, name)
            dense_bytes = K * b.N * 2 + K * 2 + b.N * 2
            for s in sparsities:
                t, kept = b.thresholds(s)
                cfg, row = policy.choose(kind, K, sizes, dtype, wf, s, "cuda")
                cfg = fit_format(cfg, kind, K, n_cols(kind, arg), wf)
                bad = b.check(t, s, policy)
                if bad:
                    raise SystemExit(f"error: {model} {name} {wf} at {s:.0%} ({label(cfg)}): {bad}")
                us = time_graph(b.sparse_fns(t, s, policy))
                gbs = b.active_bytes(kept) / us / 1e3
                rows.append(dict(model=model, name=name, kind=kind, K=K, N=b.N, wformat=wf,
                                 target_sparsity=s, sparsity=1 - kept / K, us=us,
                                 cublas_us=cublas, speedup=base_us / us, speedup_vs_bf16=cublas / us,
                                 baseline=b.baseline, baseline_us=base_us,
                                 baseline_gbs=b.full_bytes() / base_us / 1e3,
                                 gbs=gbs, cublas_gbs=dense_bytes / cublas / 1e3,
                                 frac_copy_bw=gbs / copy_bw, bytes=b.active_bytes(kept),
                                 config=label(cfg), algo=cfg.algo, table_row=row is not None))
            del b
        torch.cuda.empty_cache()
    return rows


def _rows_x(pattern: str, M: int, K: int, device) -> torch.Tensor:
    """fp32 (M, K) inputs: "independent" draws (every row its own mask: the union of M masks
    at sparsity s keeps about 1 - s^M of the rows, the worst case), or "shared" (one |x| with
    random signs per row: every row keeps the same channels, the best case)."""
    if pattern == "independent":
        return torch.randn(M, K, device=device)
    base = torch.randn(1, K, device=device).abs()
    return base * torch.where(torch.rand(M, K, device=device) < 0.5, -1.0, 1.0)


def run_rows(shapes, rows_list, sparsities, policy, l2, dtype, copy_bw, tqdm) -> list:
    """--rows: the several-row kernel (M rows per call, each with its own mask) against cuBLAS
    on the same M rows and against M one-row calls, per shape, M, mask pattern and sparsity.
    Every call is first checked row by row against the float64 reference (and for bitwise
    repeatability); GB/s counts the rows the union of the M masks keeps."""
    out = []
    for model, name, kind, K, arg in tqdm(shapes, desc="rows", unit="shape"):
        b = Bench(kind, K, arg, dtype, l2, "cuda")
        one_us = {}
        for M in rows_list:
            for pattern in ("independent", "shared"):
                x = _rows_x(pattern, M, K, "cuda")
                b.x = x.to(dtype)
                cublas = time_graph(b.baseline_fns())
                for s in sparsities:
                    ax = b.x.float().abs()
                    t0 = torch.quantile(ax.reshape(-1).cpu(), s).item() if s > 0 else 0.0
                    n_t = len(arg) if kind == "seg" else 2
                    t = torch.full((n_t,), t0, dtype=torch.float32, device="cuda")
                    kept = int((ax > t0).any(0).sum())
                    bad = b.check(t, s, policy)
                    if bad:
                        raise SystemExit(f"error: {model} {name} M={M} at {s:.0%}: {bad}")
                    us = time_graph(b.sparse_fns(t, s, policy))
                    if M == 1:
                        one_us[(pattern, s)] = us
                    gbs = b.active_bytes(kept) / us / 1e3
                    sizes = arg if kind == "seg" else (arg, arg)
                    lc = policy.launch(kind, K, sizes, dtype, "dense", s, "cuda", rows=M)
                    out.append(dict(model=model, name=name, kind=kind, K=K, N=b.N, rows=M,
                                    pattern=pattern, target_sparsity=s,
                                    union_sparsity=1 - kept / K, us=us, cublas_us=cublas,
                                    speedup=cublas / us, gbs=gbs, frac_copy_bw=gbs / copy_bw,
                                    one_row_us=one_us.get((pattern, s)),
                                    config=f"{lc.algo_name} bn{lc.block_n} bk{lc.block_k} s{lc.split}"))
        del b
        torch.cuda.empty_cache()
    return out


def print_rows_table(rows) -> None:
    print(f"\n{'model':10s} {'proj':8s} {'M':>3s} {'masks':>11s} {'sp%':>4s} {'union%':>6s} {'us':>7s} "
          f"{'cuBLAS':>7s} {'x':>6s} {'M x 1row':>8s} {'GB/s':>6s} {'%copy':>6s}")
    for r in rows:
        m1 = "" if r["one_row_us"] is None else f"{r['rows'] * r['one_row_us']:8.2f}"
        print(f"{r['model']:10s} {r['name']:8s} {r['rows']:3d} {r['pattern']:>11s} "
              f"{100 * r['target_sparsity']:4.0f} {100 * r['union_sparsity']:6.1f} {r['us']:7.2f} "
              f"{r['cublas_us']:7.2f} {r['speedup']:6.3f} {m1:>8s} {r['gbs']:6.0f} "
              f"{100 * r['frac_copy_bw']:5.1f}%")
    print("(union% = channels no row keeps; x = cuBLAS on the same M rows / the kernel; M x 1row "
          "= M one-row kernel calls; GB/s on the union's rows)")


def candidates(name, kind, K, arg, wformat) -> list:
    """The --compare candidates of a projection fitted to the weight format, duplicates (two
    candidates `fit_format` maps to one config, e.g. lists under int4) dropped."""
    out, seen = [], set()
    small = K < 2048 or n_cols(kind, arg) < 2048
    for cfg in (SMALL_CANDIDATES[kind] + _WORDS + _BALLOT_SMALL if small else CANDIDATES[name]):
        if (cfg.algo == "words" and wformat == "dense") or (cfg.algo == "ballot" and wformat != "dense"):
            continue
        cfg = fit_format(cfg, kind, K, n_cols(kind, arg), wformat)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def bucket_edges(sparsities) -> list:
    """[lo, hi) sparsity ranges, one per measured sparsity: split halfway between neighbours,
    the first from 0, the last to 0.05 past it (at most HIGH)."""
    s = sorted(sparsities)
    mids = [(a + b) / 2 for a, b in zip(s, s[1:])]
    return [(round(lo, 6), round(hi, 6)) for lo, hi in zip([0.0] + mids, mids + [min(HIGH, s[-1] + 0.05)])]


def rows_over_default(res, dflt, sparsities, make_row, margin=0.98) -> list:
    """Table rows for the sparsity ranges (`bucket_edges`) where the fastest candidate of `res`
    ({label: (cfg, {s: us})}) beats the default dispatch's time `dflt[s]` by the margin;
    neighbouring ranges with the same winner merge.  make_row(cfg, (lo, hi), why)."""
    spans = []
    for s, (lo, hi) in zip(sorted(sparsities), bucket_edges(sparsities)):
        best = min(res, key=lambda k: res[k][1][s])
        us = res[best][1][s]
        if us > margin * dflt[s]:
            continue
        why = f"{s:.0%} {us:.1f} vs {dflt[s]:.1f} us"
        if spans and spans[-1][0] == best and spans[-1][2] == lo:
            spans[-1][2], spans[-1][3] = hi, spans[-1][3] + [why]
        else:
            spans.append([best, lo, hi, [why]])
    return [make_row(res[b][0], (lo, hi), f"{b}: {', '.join(w)} (vs the default)")
            for b, lo, hi, w in spans]


def run_compare(shapes, sparsities, l2, dtype, tqdm, commit, wformats=("dense",),
                eager_baselines=False, algos=None, default_policy=None):
    """Time every candidate (of `algos`, default all) at every sparsity in every format;
    return (rows, winner TableRows).  With `default_policy`, that policy's dispatch is timed
    too (before and after the candidates, the faster kept) and the winners are rows only for
    the sparsity ranges where a candidate beats it (`rows_over_default`), to be put in
    front of its table."""
    rows, winners = [], []
    gpu = torch.cuda.get_device_name()
    dname = str(dtype).removeprefix("torch.")
    for model, name, kind, K, arg in tqdm(shapes, desc="compare", unit="shape"):
        dense, benches = _benches(kind, K, arg, dtype, l2, wformats, eager_baselines)
        for wf, b in benches:
            base_us = _baseline_us(b, dense, model, name)
            ths = {s: b.thresholds(s)[0] for s in sparsities}
            res = {}
            if default_policy is not None:
                d1 = {s: time_graph(b.sparse_fns(ths[s], s, default_policy)) for s in sparsities}
            for cfg in candidates(name, kind, K, arg, wf):
                if algos and cfg.algo not in algos:
                    continue
                policy = KernelPolicy(config=cfg)
                bad = next((f"{s:.0%}: {e}" for s in sparsities if (e := b.check(ths[s], s, policy))), "")
                if bad:
                    print(f"CHECK FAILED {model} {name} {wf} {label(cfg)} {bad}", flush=True)
                    continue
                res[label(cfg)] = (cfg, {s: time_graph(b.sparse_fns(ths[s], s, policy)) for s in sparsities})
                rows += [dict(model=model, name=name, wformat=wf, config=label(cfg), target_sparsity=s,
                              us=us, cublas_us=dense, baseline=b.baseline, baseline_us=base_us,
                              spec=asdict(cfg)) for s, us in res[label(cfg)][1].items()]
            if not res:
                print(f"COMPARE {model} {name} {wf}: every candidate failed its check; no rows", flush=True)
                continue
            fmt = "" if wf == "dense" else f" --wformat {wf}"
            N = n_cols(kind, arg)
            if default_policy is not None:
                d2 = {s: time_graph(b.sparse_fns(ths[s], s, default_policy)) for s in sparsities}
                dflt = {s: min(d1[s], d2[s]) for s in sparsities}
                rows += [dict(model=model, name=name, wformat=wf, config="default", target_sparsity=s,
                              us=dflt[s], us_runs=[d1[s], d2[s]], cublas_us=dense, baseline=b.baseline,
                              baseline_us=base_us) for s in sparsities]
                src = f"scripts/bench_gemv.py --compare{fmt} --vs-default at {commit}"
                found = rows_over_default(res, dflt, sparsities, lambda cfg, rng, why: TableRow(
                    gpu, kind, K, N, cfg, (dname,), wf, rng, f"{src}; {why}"))
                winners += found
                print(f"COMPARE {model} {name} {wf}: default " + "/".join(f"{dflt[s]:.2f}" for s in sparsities)
                      + " | " + " | ".join(f"{k}: " + "/".join(f"{v[1][s]:.2f}" for s in sparsities)
                                           for k, v in res.items())
                      + f" || {len(found)} row(s) over the default", flush=True)
                del b
                continue
            low = [s for s in sparsities if s < HIGH]
            high = [s for s in sparsities if s >= HIGH]
            score_low = {k: sum(v[1][s] * (2 if s == 0.5 else 1) for s in low) for k, v in res.items()}
            best_low = min(score_low, key=score_low.get) if low else None
            src = f"scripts/bench_gemv.py --compare{fmt} at {commit} (score {' + '.join(f'{s:g}' for s in low)}; 50% twice)"
            if low:
                winners.append(TableRow(gpu, kind, K, N, res[best_low][0], (dname,), wf,
                                        (0.0, HIGH) if high else (0.0, 1.0), src))
            if high:
                best_high = min(res, key=lambda k: sum(res[k][1][s] for s in high))
                winners.append(TableRow(gpu, kind, K, N, res[best_high][0], (dname,), wf,
                                        (HIGH, 1.0) if low else (0.0, 1.0),
                                        f"scripts/bench_gemv.py --compare{fmt} at {commit} (time at {high})"))
            print(f"COMPARE {model} {name} {wf}: cuBLAS {dense:.2f} us, {b.baseline} {base_us:.2f} us | "
                  + " | ".join(f"{k}: " + "/".join(f"{v[1][s]:.2f}" for s in sparsities) for k, v in res.items())
                  + (f" || low {best_low}" if low else "") + (f", high {best_high}" if high else ""), flush=True)
            del b
        torch.cuda.empty_cache()
    return rows, winners


def print_rows(rows, wformats) -> None:
    """The bench table; with quantized formats also the format, its torch baseline and x."""
    if list(wformats) == ["dense"]:
        print(f"\n{'model':10s} {'proj':8s} {'K':>6s} {'N':>6s} {'sp%':>5s} {'kernel':>20s} {'us':>8s} "
              f"{'cuBLAS':>8s} {'x':>6s} {'GB/s':>6s} {'%copy':>6s}")
        for r in rows:
            print(f"{r['model']:10s} {r['name']:8s} {r['K']:6d} {r['N']:6d} {100 * r['sparsity']:5.1f} "
                  f"{r['config'] + ('' if r['table_row'] else '*'):>20s} {r['us']:8.2f} {r['cublas_us']:8.2f} "
                  f"{r['speedup']:6.3f} {r['gbs']:6.0f} {100 * r['frac_copy_bw']:5.1f}%")
        print("(* = generic rule, no table row)")
        return
    print(f"\n{'model':10s} {'proj':8s} {'format':>9s} {'K':>6s} {'N':>6s} {'sp%':>5s} {'kernel':>20s} "
          f"{'us':>8s} {'bf16':>7s} {'x bf16':>6s} {'torch':>7s} {'x torch':>7s} {'GB/s':>6s} {'%copy':>6s} "
          f"{'torch GB/s':>10s}")
    for r in rows:
        print(f"{r['model']:10s} {r['name']:8s} {r['wformat']:>9s} {r['K']:6d} {r['N']:6d} "
              f"{100 * r['sparsity']:5.1f} {r['config'] + ('' if r['table_row'] else '*'):>20s} "
              f"{r['us']:8.2f} {r['cublas_us']:7.2f} {r['speedup_vs_bf16']:6.3f} {r['baseline_us']:7.2f} "
              f"{r['speedup']:7.3f} {r['gbs']:6.0f} {100 * r['frac_copy_bw']:5.1f}% {r['baseline_gbs']:10.0f}")
    print("(* = generic rule, no table row; bf16 = cuBLAS on the bf16 weight; torch = the format's "
          "torch baseline: cuBLAS, gpt-fast's int8 weight-only product, int4 tinygemm; GB/s on the "
          "bytes an ideal kernel reads in that format)")


def main(argv=None) -> None:
    from teal.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--json", type=Path, default=None,
                    help="write results here (default: printed only)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="activation and weight dtype")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="only these shapes, as model:name (e.g. llama3-8b:down) "
                         "(default: every shape)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES,
                    help="sparsities to time")
    ap.add_argument("--table", type=Path, default=None,
                    help="dispatch table JSON (--table-out) whose rows take precedence "
                         "(default: the built-in table only)")
    ap.add_argument("--compare", action="store_true", help="time the candidates, pick winners")
    ap.add_argument("--compare-sparsities", dest="compare_sparsities", nargs="+", type=float,
                    default=[0.0, 0.5, 0.9], help="--compare: sparsities the candidates run at")
    ap.add_argument("--table-out", dest="table_out", type=Path, default=None,
                    help="--compare: write the winners as table rows (JSON) (default: not written)")
    ap.add_argument("--algos", nargs="+", default=None, choices=list(ALGORITHMS),
                    help="--compare: only the candidates of these algorithms (default: all)")
    ap.add_argument("--vs-default", dest="vs_default", action="store_true",
                    help="--compare: time the dispatch table's choice too (without the rows of "
                         "--algos; twice, the faster kept) and make rows only for the sparsity "
                         "ranges where a candidate beats it by 2%% (ranges split halfway "
                         "between --compare-sparsities)")
    ap.add_argument("--no-bench", dest="bench", action="store_false", help="only --compare")
    ap.add_argument("--wformat", nargs="+", default=["dense"], choices=WFORMATS,
                    help="weight formats to time (each with its torch baseline)")
    ap.add_argument("--rows", nargs="+", type=int, default=None,
                    help="time the several-row kernel (M rows per call, batch decoding and "
                         "speculative verification) for these M (1..16) at --sparsities, "
                         "against cuBLAS on the same rows; dense weights, instead of the bench")
    ap.add_argument("--eager-baselines", dest="eager_baselines", action="store_true",
                    help="run the torch int8 baseline eagerly (default: torch.compile'd as gpt-fast)")
    args = ap.parse_args(argv)
    wformats = list(dict.fromkeys(args.wformat))
    if args.dtype != "bfloat16" and any(w.startswith("int4") for w in wformats):
        ap.error("the int4 formats' torch baseline (tinygemm) runs bfloat16 only; use --dtype bfloat16")
    if not torch.cuda.is_available():
        sys.exit("error: bench_gemv.py needs a CUDA GPU")
    from tqdm import tqdm

    shapes = [s for s in SHAPES if not args.shapes or f"{s[0]}:{s[1]}" in args.shapes]
    if not shapes:
        sys.exit(f"error: no shape matches {args.shapes}; choose from "
                 f"{', '.join(f'{s[0]}:{s[1]}' for s in SHAPES)}")
    table = DEFAULT_TABLE
    if args.table is not None:
        try:
            table = DEFAULT_TABLE.with_rows(DispatchTable.load(args.table).rows)
        except ValueError as e:
            sys.exit(f"error: {e}")
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    bw = copy_bandwidth()
    env = environment(Path(__file__).resolve().parent, os.environ.get("TEAL_COMMIT"))
    commit = env["commit"]
    print(f"GPU {props.name} ({props.multi_processor_count} SMs, L2 {l2 >> 20} MB) torch {torch.__version__} "
          f"triton {env.get('triton')} {args.dtype} commit {commit}; device copy {bw:.0f} GB/s", flush=True)
    results = dict(env, dtype=args.dtype, copy_gbs=bw, argv=sys.argv[1:] if argv is None else list(argv),
                   wformats=wformats)
    t0 = time.time()
    default_policy = None
    if args.vs_default:  # the table's choice without the compared algorithms' own rows
        default_policy = KernelPolicy(table=DispatchTable(tuple(
            r for r in table.rows if not args.algos or r.config.algo not in args.algos)))
    if args.compare:
        results["compare"], winners = run_compare(
            shapes, sorted(set(args.compare_sparsities)), l2, dtype, tqdm, commit, wformats,
            args.eager_baselines, args.algos, default_policy)
        results["table"] = DispatchTable(tuple(winners)).to_json()
        if args.table_out:
            atomic_write_json(args.table_out, results["table"])
        table = table.with_rows(winners)
    if args.rows:
        if not all(1 <= m <= 16 for m in args.rows):
            sys.exit(f"error: --rows takes M in 1..16, got {args.rows}")
        rows = run_rows(shapes, sorted(set(args.rows)), args.sparsities, KernelPolicy(table=table),
                        l2, dtype, bw, tqdm)
        results["rows"] = rows
        print_rows_table(rows)
    elif args.bench:
        rows = run_bench(shapes, args.sparsities, KernelPolicy(table=table), l2, dtype, bw, tqdm,
                         wformats, args.eager_baselines)
        results["bench"] = rows
        print_rows(rows, wformats)
    results["seconds"] = time.time() - t0
    if args.json:
        atomic_write_json(args.json, results, make_parents=True)


if __name__ == "__main__":
    main()
