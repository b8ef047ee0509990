#!/usr/bin/env python
"""Benchmark the TEAL sparse GEMV kernels against cuBLAS dense (F.linear), one decode row.

    python scripts/bench_gemv.py --json gemv.json                 # the dispatch table's kernels
    python scripts/bench_gemv.py --compare --table-out table.json # candidates; winners -> rows
    python scripts/bench_gemv.py --table table.json --json b.json # time a tuned table

Shapes: the fused projections of Llama-3-8B and Llama-2-7B (q/k/v, o, gate/up, down).  For
every shape and sparsity the kernel the policy dispatches (its table row for this GPU and
the calibrated sparsity, else the generic rule) is first checked against the float64
reference, then timed: the median over replays of a CUDA graph that calls it many times,
cycling over rotating weight copies several times larger than the L2, so each call streams
its weights from HBM.  GB/s counts the bytes an ideal sparse kernel must read (kept rows x
N x 2 B, plus x and y), "% copy" is that over the device-to-device copy bandwidth measured
in the same run.

--compare times candidate configs of every algorithm (masked loop, tensor-core tiles,
kept-row lists) per shape at --compare-sparsities and picks, per shape, the best below and
above the 80% cut-off (score: t0 + 2 t50 for the low range, t90 for the high one); the
winners are written as table rows with their provenance (command, commit) by --table-out.
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

from teal.io import atomic_write_json
from teal.kernels import DEFAULT_TABLE, DispatchTable, GemvConfig, KernelPolicy, TableRow
from teal.kernels import reference as R
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


def n_cols(kind, arg):
    return sum(arg) if kind == "seg" else arg


def label(cfg: GemvConfig) -> str:
    if cfg.algo == "list":
        return f"{'i' if cfg.inline else 'l'}{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}k{cfg.ksplit}"
    if cfg.algo == "dot":
        return f"d{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}v{cfg.waves:g}"
    return f"m{cfg.block_n}x{cfg.block_k}p{cfg.pipe}v{cfg.waves:g}"


class Bench:
    """One shape: rotating weight copies (> 4x L2), an activation, thresholds per sparsity."""

    def __init__(self, kind, K, arg, dtype, l2_bytes, device):
        self.kind, self.K, self.arg, self.dtype, self.device = kind, K, arg, dtype, device
        self.N = sum(arg) if kind == "seg" else 2 * arg
        copies = max(2, math.ceil(4 * l2_bytes / (K * self.N * 2)))
        base = (torch.randn(K, self.N, device=device) / K ** 0.5).to(dtype)
        self.wt = [base.clone() for _ in range(copies)]
        self.wd = [w.t().contiguous() for w in self.wt]
        del base
        self.x = torch.randn(1, K, device=device).to(dtype)

    def thresholds(self, s):
        """(thresholds (rows,), kept channels) for target sparsity s (quantile of |x|)."""
        ax = self.x.float().abs().reshape(-1)
        t = torch.quantile(ax.cpu(), s).item() if s > 0 else 0.0
        rows = len(self.arg) if self.kind == "seg" else 2
        return torch.full((rows,), t, dtype=torch.float32, device=self.device), int((ax > t).sum())

    def active_bytes(self, kept):
        out = self.arg if self.kind == "gated" else self.N
        return kept * self.N * 2 + self.K * 2 + out * 2

    def call(self, w, t, s, policy):
        from teal import kernels
        if self.kind == "seg":
            ends = [int(b) for b in torch.tensor(self.arg).cumsum(0)]
            return kernels.sparse_gemv(self.x, w, t, ends, sparsity=s, policy=policy)
        return kernels.sparse_gated_gemv(self.x, w, t, sparsity=s, policy=policy)

    def ref(self, t):
        if self.kind == "seg":
            ends = [int(b) for b in torch.tensor(self.arg).cumsum(0)]
            return R.sparse_gemv_ref(self.x[0], self.wt[0], t, ends)
        return R.sparse_gated_gemv_ref(self.x[0], self.wt[0], t)

    def check(self, t, s, policy) -> str:
        """'' if the kernel matches the float64 reference and is bitwise repeatable, else why."""
        y1, y2 = self.call(self.wt[0], t, s, policy), self.call(self.wt[0], t, s, policy)
        ref = self.ref(t)
        err = ((y1[0].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if not err < 1e-2 or not torch.equal(y1, y2):
            return f"rel err {err:.3g}, repeatable {torch.equal(y1, y2)}"
        return ""

    def sparse_fns(self, t, s, policy):
        return [lambda w=w: self.call(w, t, s, policy) for w in self.wt]

    def dense_fns(self):
        return [lambda w=w: F.linear(self.x, w) for w in self.wd]


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


def run_bench(shapes, sparsities, policy, l2, dtype, copy_bw, tqdm):
    """Time the dispatched kernel of every (shape, sparsity); rows for the JSON and table."""
    rows = []
    for model, name, kind, K, arg in tqdm(shapes, desc="bench", unit="shape"):
        b = Bench(kind, K, arg, dtype, l2, "cuda")
        dense = time_graph(b.dense_fns())
        dense_bytes = K * b.N * 2 + K * 2 + b.N * 2
        sizes = arg if kind == "seg" else (arg, arg)
        for s in sparsities:
            t, kept = b.thresholds(s)
            cfg, row = policy.choose(kind, K, sizes, dtype, "dense", s, "cuda")
            bad = b.check(t, s, policy)
            if bad:
                raise SystemExit(f"error: {model} {name} at {s:.0%} ({label(cfg)}): {bad}")
            us = time_graph(b.sparse_fns(t, s, policy))
            gbs = b.active_bytes(kept) / us / 1e3
            rows.append(dict(model=model, name=name, kind=kind, K=K, N=b.N, target_sparsity=s,
                             sparsity=1 - kept / K, us=us, cublas_us=dense, speedup=dense / us,
                             gbs=gbs, cublas_gbs=dense_bytes / dense / 1e3, frac_copy_bw=gbs / copy_bw,
                             config=label(cfg), algo=cfg.algo, table_row=row is not None))
        del b
        torch.cuda.empty_cache()
    return rows


def run_compare(shapes, sparsities, l2, dtype, tqdm, commit):
    """Time every candidate at every sparsity; return (rows, winner TableRows)."""
    rows, winners = [], []
    gpu = torch.cuda.get_device_name()
    dname = str(dtype).removeprefix("torch.")
    for model, name, kind, K, arg in tqdm(shapes, desc="compare", unit="shape"):
        b = Bench(kind, K, arg, dtype, l2, "cuda")
        dense = time_graph(b.dense_fns())
        ths = {s: b.thresholds(s)[0] for s in sparsities}
        res = {}
        for cfg in CANDIDATES[name]:
            policy = KernelPolicy(config=cfg)
            bad = next((f"{s:.0%}: {e}" for s in sparsities if (e := b.check(ths[s], s, policy))), "")
            if bad:
                print(f"CHECK FAILED {model} {name} {label(cfg)} {bad}", flush=True)
                continue
            res[label(cfg)] = (cfg, {s: time_graph(b.sparse_fns(ths[s], s, policy)) for s in sparsities})
            rows += [dict(model=model, name=name, config=label(cfg), target_sparsity=s, us=us,
                          cublas_us=dense, spec=asdict(cfg)) for s, us in res[label(cfg)][1].items()]
        low = [s for s in sparsities if s < HIGH]
        high = [s for s in sparsities if s >= HIGH]
        score_low = {k: sum(v[1][s] * (2 if s == 0.5 else 1) for s in low) for k, v in res.items()}
        best_low = min(score_low, key=score_low.get)
        src = f"scripts/bench_gemv.py --compare at {commit} (score {' + '.join(f'{s:g}' for s in low)}; 50% twice)"
        N = n_cols(kind, arg)
        winners.append(TableRow(gpu, kind, K, N, res[best_low][0], (dname,), "dense", (0.0, HIGH) if high else (0.0, 1.0), src))
        if high:
            best_high = min(res, key=lambda k: sum(res[k][1][s] for s in high))
            winners.append(TableRow(gpu, kind, K, N, res[best_high][0], (dname,), "dense", (HIGH, 1.0),
                                    f"scripts/bench_gemv.py --compare at {commit} (time at {high})"))
        print(f"COMPARE {model} {name}: cuBLAS {dense:.2f} us | " + " | ".join(
            f"{k}: " + "/".join(f"{v[1][s]:.2f}" for s in sparsities) for k, v in res.items())
            + f" || low {best_low}" + (f", high {best_high}" if high else ""), flush=True)
        del b
        torch.cuda.empty_cache()
    return rows, winners


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="only these shapes, as model:name (e.g. llama3-8b:down)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES)
    ap.add_argument("--table", type=Path, default=None,
                    help="dispatch table JSON (--table-out) whose rows take precedence")
    ap.add_argument("--compare", action="store_true", help="time the candidates, pick winners")
    ap.add_argument("--compare-sparsities", dest="compare_sparsities", nargs="+", type=float,
                    default=[0.0, 0.5, 0.9])
    ap.add_argument("--table-out", dest="table_out", type=Path, default=None,
                    help="--compare: write the winners as table rows (JSON)")
    ap.add_argument("--no-bench", dest="bench", action="store_false", help="only --compare")
    args = ap.parse_args(argv)
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
    results = dict(env, dtype=args.dtype, copy_gbs=bw, argv=sys.argv[1:])
    t0 = time.time()
    if args.compare:
        results["compare"], winners = run_compare(shapes, sorted(set(args.compare_sparsities)), l2,
                                                  dtype, tqdm, commit)
        results["table"] = DispatchTable(tuple(winners)).to_json()
        if args.table_out:
            atomic_write_json(args.table_out, results["table"])
        table = table.with_rows(winners)
    if args.bench:
        rows = run_bench(shapes, args.sparsities, KernelPolicy(table=table), l2, dtype, bw, tqdm)
        results["bench"] = rows
        print(f"\n{'model':10s} {'proj':8s} {'K':>6s} {'N':>6s} {'sp%':>5s} {'kernel':>20s} {'us':>8s} "
              f"{'cuBLAS':>8s} {'x':>6s} {'GB/s':>6s} {'%copy':>6s}")
        for r in rows:
            print(f"{r['model']:10s} {r['name']:8s} {r['K']:6d} {r['N']:6d} {100 * r['sparsity']:5.1f} "
                  f"{r['config'] + ('' if r['table_row'] else '*'):>20s} {r['us']:8.2f} {r['cublas_us']:8.2f} "
                  f"{r['speedup']:6.3f} {r['gbs']:6.0f} {100 * r['frac_copy_bw']:5.1f}%")
        print("(* = generic rule, no table row)")
    results["seconds"] = time.time() - t0
    if args.json:
        atomic_write_json(args.json, results, make_parents=True)


if __name__ == "__main__":
    main()
