#!/usr/bin/env python
"""Benchmark the TEAL sparse GEMV kernels against cuBLAS dense (F.linear), batch 1.

Every timing is the median over replays of a CUDA graph that calls the op many times,
cycling over rotating weight copies whose total size is several times the L2, so each
call streams its weights from HBM.  GB/s is computed on bytes actually read: active rows
* N * 2 B (+ x + y), i.e. what an ideal sparse kernel must read.

    python scripts/bench_gemv.py [--quick] [--json out.json] [--sweep] [--compile-check]
    python scripts/bench_gemv.py --compare --table-out table.json --json out.json

--sweep: time a grid of block configs per shape (50% sparsity) and print/apply the best.
--compare: round 1 (masked slab loop) vs candidate "dot" configs (round 3: tensor-core tiles with
  pipelined masked loads) and "list" configs (round 4: kept-row lists) at the
  key Llama-3-8B shapes, 0/50/90% sparsity, each candidate first checked against the float64
  reference; the best per shape (score t0 + 2 t50 + t90) is applied to the table for the
  benchmark that follows (which then also times round 1: column r1_us) and written to
  --table-out (load it with TEAL_GEMV_TABLE=path for end-to-end runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    from functools import partial

    from tqdm import tqdm as _tqdm

    tqdm = partial(_tqdm, mininterval=5.0)
except Exception:  # pragma: no cover
    def tqdm(it=None, **kw):
        return it

# (model, name, kind, K, sizes-or-F)
SHAPES = [
    ("llama3-8b", "q", "seg", 4096, (4096,)),
    ("llama3-8b", "k|v", "seg", 4096, (1024,)),
    ("llama3-8b", "qkv", "seg", 4096, (4096, 1024, 1024)),
    ("llama3-8b", "o", "seg", 4096, (4096,)),
    ("llama3-8b", "up", "seg", 4096, (14336,)),
    ("llama3-8b", "gate_up", "gated", 4096, 14336),
    ("llama3-8b", "down", "seg", 14336, (4096,)),
    ("llama2-7b", "qkv", "seg", 4096, (4096, 4096, 4096)),
    ("llama2-7b", "o", "seg", 4096, (4096,)),
    ("llama2-7b", "gate_up", "gated", 4096, 11008),
    ("llama2-7b", "down", "seg", 11008, (4096,)),
]
SPARSITIES = [0.0, 0.25, 0.40, 0.50, 0.65, 0.80, 0.90]
DEV = "cuda"  # (a CPU dry run of the script logic sets "cpu" with the Triton interpreter)


def _dc(bn, bk, nw, st, waves):
    from teal.kernels.configs import GemvConfig

    return GemvConfig(algo="dot", block_n=bn, block_k=bk, num_warps=nw, num_stages=st, waves=waves, rchunk=0)


# compare: "dot" (round 3) candidates (block_n, block_k, num_warps, num_stages, waves) per key
# shape.  Round 2's compact candidates are in notes/kernels.md (measured, not adopted).
CANDIDATES = {
    "gate_up": [(128, 64, 4, 3, 2), (128, 64, 4, 3, 1), (64, 64, 4, 3, 1), (64, 64, 4, 4, 1),
                (64, 128, 4, 3, 1), (128, 32, 4, 4, 2)],
    "down": [(128, 128, 4, 3, 2), (128, 128, 4, 3, 3), (128, 128, 4, 3, 1), (64, 128, 4, 3, 2),
             (128, 64, 4, 4, 2), (256, 64, 4, 3, 2)],
    "qkv": [(256, 64, 8, 3, 2), (32, 128, 4, 3, 1), (64, 128, 4, 3, 1), (64, 64, 4, 4, 1),
            (128, 128, 4, 3, 2), (32, 256, 4, 3, 1)],
    "o": [(128, 128, 4, 3, 2), (32, 128, 4, 3, 1), (64, 128, 4, 3, 1), (32, 256, 4, 3, 1),
          (64, 64, 4, 4, 2), (64, 128, 4, 3, 4)],
}
# (round 3's other candidates were slower there; the round-5 one-wave grids (waves 1) lost
# everywhere: notes/kernels.md)
def _lc(bn, bk, nw, st, ks, algo="list"):
    from teal.kernels.configs import GemvConfig

    return GemvConfig(algo=algo, block_n=bn, block_k=bk, num_warps=nw, num_stages=st, ksplit=ks, rchunk=0)


# "list" (round 4, kept-row lists) candidates (block_n, block_k, num_warps, num_stages, ksplit).
# With gathered (indirect) weight loads Triton keeps num_stages - 2 weight buffers in flight
# (offline sm_90 compile), hence 5-6 stages.
LIST_CANDIDATES = {
    "gate_up": [(64, 64, 4, 4, 4096), (128, 32, 4, 6, 512)],
    "down": [(128, 64, 4, 4, 2048), (128, 64, 4, 5, 1024)],
    "qkv": [(64, 64, 4, 4, 4096), (128, 64, 4, 5, 512)],
    "o": [(64, 64, 4, 4, 4096), (128, 64, 4, 5, 512)],
}
# "ilist" (round 5: each program builds its range's list, no pre-pass launch) candidates
ILIST_CANDIDATES = {
    "gate_up": [(64, 64, 4, 4, 4096), (128, 64, 4, 5, 1024)],
    "down": [(128, 64, 4, 4, 2048), (128, 64, 4, 5, 1024)],
    "qkv": [(64, 64, 4, 4, 4096), (128, 64, 4, 5, 512)],
    "o": [(64, 64, 4, 4, 4096), (128, 64, 4, 5, 512)],
}
# un-swept shapes that take a swept shape's winner (same K-family), re-derived for their grid
ANALOG = {("llama2-7b", "gate_up"): "gate_up", ("llama2-7b", "down"): "down",
          ("llama2-7b", "qkv"): "qkv", ("llama3-8b", "up"): "qkv"}


def n_out(kind, arg):
    return sum(arg) if kind == "seg" else 2 * arg


class Bench:
    def __init__(self, kind, K, arg, dtype, l2_bytes, min_copies=2):
        self.kind, self.K, self.arg, self.dtype = kind, K, arg, dtype
        self.N = n_out(kind, arg)
        wbytes = K * self.N * 2
        self.ncopy = max(min_copies, math.ceil(4 * l2_bytes / wbytes))
        base = (torch.randn(K, self.N, device=DEV) / K**0.5).to(dtype)
        self.wt = [base.clone() for _ in range(self.ncopy)]
        self.wd = [w.t().contiguous() for w in self.wt[: max(2, math.ceil(4 * l2_bytes / wbytes))]]
        del base
        self.x = torch.randn(K, device=DEV).to(dtype)

    def thresholds(self, s):
        ax = self.x.float().abs()
        t = torch.quantile(ax.cpu(), s).item() if s > 0 else 0.0
        nseg = len(self.arg) if self.kind == "seg" else 2
        tt = torch.full((nseg,), t, dtype=torch.float32, device=DEV)
        act = int((ax > t).sum())
        return tt, act

    def active_bytes(self, act):
        out = self.arg if self.kind == "gated" else self.N
        return act * self.N * 2 + self.K * 2 + out * 2

    def ref(self, tt):
        from teal.kernels import reference as R

        if self.kind == "seg":
            bounds = [int(b) for b in torch.tensor(self.arg).cumsum(0)]
            return R.sparse_gemv_segments_ref(self.x, self.wt[0], tt, bounds)
        return R.sparse_gated_gemv_ref(self.x, self.wt[0], tt)

    def fns(self, tt, cfg=None):
        from teal.kernels import launch

        if self.kind == "seg":
            sizes = list(self.arg)
            return [lambda w=w: launch.launch_segments(self.x, w, tt, sizes, config=cfg) for w in self.wt]
        return [lambda w=w: launch.launch_gated(self.x, w, tt, config=cfg) for w in self.wt]

    def dense_fns(self):
        x2 = self.x.view(1, -1)
        return [lambda w=w: F.linear(x2, w) for w in self.wd]

    def free(self):
        self.wt = self.wd = None


def time_graph(fns, min_calls=48, reps=12):
    """Median microseconds per call: CUDA graph of >= min_calls calls cycling over fns."""
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


def sweep_configs():
    from teal.kernels.configs import GemvConfig

    out = []
    for bn in (128, 256, 512):
        for bk in (16, 32, 64):
            for pipe in (1, 2):
                for acc2d in (True, False):
                    if not acc2d and bk == 16:
                        continue
                    nw = 8 if bn * bk >= 16384 else 4
                    out.append(GemvConfig(block_n=bn, block_k=bk, num_warps=nw, pipe=pipe, acc2d=acc2d))
    return out


def fits(cfg, kind):
    """Rough register budget: accumulator + weight tile(s) fp32-equivalents per thread."""
    per = cfg.block_k * cfg.block_n / (32 * cfg.num_warps)
    tiles = 2 if kind == "gated" else 1
    acc = per if cfg.acc2d else cfg.block_n / (32 * cfg.num_warps)
    w = per / 2 * (2 if cfg.pipe == 2 else 1)
    return tiles * (acc + w) <= 144


def _precompile_worker(job):
    kind, K, arg, cfg, dtype_name = job
    import torch as _t
    from teal.kernels import launch as _l

    dt = getattr(_t, dtype_name)
    N = n_out(kind, arg)
    try:
        x = _t.randn(K, device="cuda").to(dt)
        w = _t.empty(K, N, device="cuda", dtype=dt)
        nseg = len(arg) if kind == "seg" else 2
        t = _t.full((nseg,), 1e9, device="cuda")
        for c in cfg:
            if kind == "seg":
                _l.launch_segments(x, w, t, list(arg), config=c)
            else:
                _l.launch_gated(x, w, t, config=c)
        _t.cuda.synchronize()
        return None
    except Exception as e:  # report, don't die
        return f"{kind} {K} {arg}: {e!r}"[:300]


def precompile(jobs, procs):
    import multiprocessing as mp

    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        errs = [e for e in tqdm(pool.imap_unordered(_precompile_worker, jobs), total=len(jobs), desc="precompile") if e]
    for e in errs[:10]:
        print("precompile error:", e)
    print(f"precompiled {len(jobs)} jobs in {time.time() - t0:.1f}s")


def run_sweep(args, l2, dtype, results):
    from dataclasses import asdict, replace

    from teal.kernels import configs as C

    shapes = [s for s in SHAPES if s[1] not in ("q",)]  # q == o shape
    if args.quick:
        shapes = [s for s in shapes if s[0] == "llama3-8b"]
    cfgs = sweep_configs()
    jobs = []
    for (_, _, kind, K, arg) in shapes:
        ok = [c for c in cfgs if fits(c, kind)]
        ext = []
        for c in ok:
            for wv in (1, 2, 3, 4, 6, 8, 12):
                ext.append(replace(c, waves=wv))
        jobs.append((kind, K, arg, ext, args.dtype))
    # split jobs for parallelism
    pj = []
    for kind, K, arg, ext, dn in jobs:
        for i in range(0, len(ext), 8):
            pj.append((kind, K, arg, ext[i : i + 8], dn))
    precompile(pj, args.procs)
    best = {}
    for (model, name, kind, K, arg) in tqdm(shapes, desc="sweep"):
        b = Bench(kind, K, arg, dtype, l2)
        t50, act = b.thresholds(0.5)
        t0, act0 = b.thresholds(0.0)
        rows = []
        for c in [c for c in cfgs if fits(c, kind)]:
            us = time_graph(b.fns(t50, c))
            rows.append((us, c))
        rows.sort(key=lambda r: r[0])
        # stage B: waves (split) and warps for the top 3
        rows2 = []
        for us, c in rows[:3]:
            for wv in (1, 2, 3, 4, 6, 8, 12):
                for nw in sorted({c.num_warps, 4, 8}):
                    c2 = replace(c, waves=wv, num_warps=nw)
                    if not fits(c2, kind):
                        continue
                    rows2.append((time_graph(b.fns(t50, c2)), c2))
        rows2.sort(key=lambda r: r[0])
        us, c = rows2[0]
        us0 = time_graph(b.fns(t0, c))
        dense = time_graph(b.dense_fns())
        gbs = b.active_bytes(act) / us / 1e3
        print(f"SWEEP {model:10s} {name:8s} best 50%: {us:8.2f} us {gbs:7.0f} GB/s | 0%: {us0:8.2f} us "
              f"(cuBLAS {dense:8.2f} us, x{dense / us0:.3f}) | {c}")
        for r in rows[:5]:
            print(f"      A {r[0]:8.2f} us {r[1]}")
        for r in rows2[:5]:
            print(f"      B {r[0]:8.2f} us {r[1]}")
        ncols = sum(arg) if kind == "seg" else arg
        key = (kind, K, ncols)
        best[key] = c
        results["sweep"].append(dict(model=model, name=name, kind=kind, K=K, arg=arg, best=asdict(c), us50=us, us0=us0,
                                     cublas=dense, gbs50=gbs, stageA=[(r[0], asdict(r[1])) for r in rows],
                                     stageB=[(r[0], asdict(r[1])) for r in rows2]))
        b.free()
        del b
        torch.cuda.empty_cache()
    if args.apply_sweep:
        C._TABLE.update(best)
        print("applied sweep table:", {k: v for k, v in best.items()})


def _num_sms():
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132


def _key(kind, K, arg):
    return (kind, K, sum(arg) if kind == "seg" else arg)


def compare_candidates(only=None):
    """Key shapes (or those named in `only`) and their (label, config) candidates: round 1 first."""
    from teal.kernels import configs as C

    shapes = [s for s in SHAPES if s[0] == "llama3-8b" and s[1] in CANDIDATES and (not only or s[1] in only)]
    cand = {}
    for (model, name, kind, K, arg) in shapes:
        cand[name] = [("r1", C.round1_config(*_key(kind, K, arg)))] + \
            [(f"d{bn}x{bk}w{nw}s{st}v{wv}", _dc(bn, bk, nw, st, wv)) for (bn, bk, nw, st, wv) in CANDIDATES[name]] + \
            [(f"l{bn}x{bk}w{nw}s{st}k{ks}", _lc(bn, bk, nw, st, ks))
             for (bn, bk, nw, st, ks) in LIST_CANDIDATES.get(name, [])] + \
            [(f"i{bn}x{bk}w{nw}s{st}k{ks}", _lc(bn, bk, nw, st, ks, "ilist"))
             for (bn, bk, nw, st, ks) in ILIST_CANDIDATES.get(name, [])]
    return shapes, cand


def precompile_compare(args, shapes=None, cand=None):
    if shapes is None:
        shapes, cand = compare_candidates(args.compare_shapes)
    jobs = []
    for (model, name, kind, K, arg) in shapes:
        cf = [c for _, c in cand[name]]
        for i in range(0, len(cf), 2):
            jobs.append((kind, K, arg, cf[i : i + 2], args.dtype))
    # round-1 configs of the other shapes (the benchmark's r1 column)
    from teal.kernels import configs as C

    for (model, name, kind, K, arg) in SHAPES:
        if name not in cand and not getattr(args, "no_bench", False):
            jobs.append((kind, K, arg, [C.round1_config(*_key(kind, K, arg))], args.dtype))
    precompile(jobs, args.procs)


def run_compare(args, l2, dtype, results, copy_bw):
    """Round 1 vs compact candidates at the key shapes; apply + return the winners."""
    from dataclasses import asdict, replace

    from teal.kernels import configs as C

    shapes, cand = compare_candidates(args.compare_shapes)
    if args.procs > 0:
        precompile_compare(args, shapes, cand)
    sps = sorted({0.0, 0.5, 0.9} | set(args.compare_sparsities or []))
    rows, winners = [], {}
    for (model, name, kind, K, arg) in shapes:
        b = Bench(kind, K, arg, dtype, l2)
        dense = time_graph(b.dense_fns())
        ths = {s: b.thresholds(s) for s in sps}
        ok = []
        for label, cfg in cand[name]:
            good = True
            for s in (0.0, 0.5):
                tt, _ = ths[s]
                y1 = b.fns(tt, cfg)[0]()
                y2 = b.fns(tt, cfg)[0]()
                ref = b.ref(tt)
                err = ((y1.double() - ref).norm() / ref.norm()).item()
                if not (err < 1e-2) or not torch.equal(y1, y2):
                    print(f"CHECK FAILED {name} {label} s={s}: rel err {err:.3g}, deterministic {torch.equal(y1, y2)}")
                    good = False
            if good:
                ok.append((label, cfg))
        res = {}
        for label, cfg in ok:
            res[label] = {s: time_graph(b.fns(ths[s][0], cfg)) for s in sps}
        # the "list" pre-pass alone (its share of the list candidates' time)
        from teal.kernels import launch as L

        rows_t = len(arg) if kind == "seg" else 2
        for ks in sorted({c.ksplit for _, c in ok if c.algo == "list"}):
            tt = ths[0.5][0]
            pre = time_graph([lambda: L._keep_lists(b.x, tt, rows_t, C.cdiv(K, ks), ks, False, 0, False)])
            print(f"PREPASS {name:8s} ksplit {ks}: {pre:.2f} us per call (50%)", flush=True)
            results.setdefault("prepass", []).append(dict(name=name, ksplit=ks, us=pre))
        score = {lab: r[0.0] + 2 * r[0.5] + r[0.9] for lab, r in res.items()}
        best = min(score, key=score.get)
        bcfg = dict(ok)[best]
        winners[_key(kind, K, arg)] = (bcfg, name)
        for label, _ in ok:
            for s in sps:
                tt, act = ths[s]
                us = res[label][s]
                gbs = b.active_bytes(act) / us / 1e3
                rows.append(dict(model=model, name=name, label=label, target_sparsity=s, sparsity=1 - act / K, us=us,
                                 cublas_us=dense, speedup=dense / us, gbs=gbs, frac_copy_bw=gbs / copy_bw,
                                 best=label == best, config=asdict(dict(ok)[label])))
        print(f"COMPARE {name:8s} cuBLAS {dense:7.2f} us | " + " | ".join(
            f"{lab}: " + "/".join(f"{res[lab][s]:.2f}" for s in sps) for lab in res) + f" || best {best}", flush=True)
        b.free()
        del b
        torch.cuda.empty_cache()
    results["compare"] = rows
    # apply: winners, and their analogs (grid re-derived from the winner's programs per SM)
    table = {}
    for key, (cfg, name) in winners.items():
        table[key] = cfg
    for (model, name, kind, K, arg) in SHAPES:
        src = ANALOG.get((model, name))
        if src is None:
            continue
        skey = next((k for k, (c, n) in winners.items() if n == src), None)
        if skey is None:  # --compare-shapes left the source shape out
            continue
        scfg = winners[skey][0]
        if scfg.algo == "dot":  # grid follows from waves: the config applies as is
            table[_key(kind, K, arg)] = scfg
            continue
        if scfg.algo not in ("compact", "list", "ilist"):
            continue
        sarg = next(s[4] for s in shapes if s[1] == src)
        stiles = C.cdiv(sarg, scfg.block_n) if skey[0] == "gated" else sum(C.cdiv(n, scfg.block_n) for n in sarg)
        programs = stiles * C.cdiv(skey[1], scfg.ksplit)
        waves = programs / _num_sms()
        table[_key(kind, K, arg)] = replace(scfg, ksplit=0, waves=round(waves, 2))
    C._TABLE.update(table)
    results["table"] = C.table_to_json(table)
    if args.table_out:
        with open(args.table_out, "w") as f:
            json.dump(C.table_to_json(table), f, indent=1)
    print("\nmodel      proj     config                    sp%      us   cuBLAS xcuBLAS   GB/s  %copy")
    for r in rows:
        if r["label"] == "r1" or r["best"]:
            print(f"{r['model']:10s} {r['name']:8s} {r['label'] + ('*' if r['best'] else ''):24s} {100 * r['sparsity']:5.1f} "
                  f"{r['us']:7.2f} {r['cublas_us']:7.2f} {r['speedup']:7.3f} {r['gbs']:6.0f} {100 * r['frac_copy_bw']:5.1f}%")
    return table


def run_bench(args, l2, dtype, results, copy_bw):
    shapes = SHAPES
    sps = SPARSITIES
    if args.quick:
        sps = [0.0, 0.5, 0.9]
    rows = []
    for (model, name, kind, K, arg) in tqdm(shapes, desc="bench"):
        b = Bench(kind, K, arg, dtype, l2)
        dense = time_graph(b.dense_fns())
        dense_bytes = K * b.N * 2 + K * 2 + b.N * 2
        from teal.kernels import configs as C

        key = _key(kind, K, arg)
        r1cfg = C.round1_config(*key)
        cur = C._TABLE.get(key)
        for s in sps:
            tt, act = b.thresholds(s)
            us = time_graph(b.fns(tt))
            r1_us = time_graph(b.fns(tt, r1cfg)) if args.baseline and cur is not None and cur != r1cfg else None
            gbs = b.active_bytes(act) / us / 1e3
            r = dict(model=model, name=name, kind=kind, K=K, N=b.N, target_sparsity=s, sparsity=1 - act / K,
                     us=us, cublas_us=dense, speedup=dense / us, gbs=gbs, cublas_gbs=dense_bytes / dense / 1e3,
                     frac_copy_bw=gbs / copy_bw, r1_us=r1_us, algo=(cur.algo if cur is not None else "mask"))
            rows.append(r)
        b.free()
        del b
        torch.cuda.empty_cache()
    results["bench"] = rows
    print(f"\n{'model':10s} {'proj':8s} {'K':>6s} {'N':>6s} {'sp%':>5s} {'us':>8s} {'r1 us':>8s} {'cuBLAS':>8s} {'xcuBLAS':>7s} "
          f"{'GB/s':>6s} {'%copy':>6s}")
    for r in rows:
        r1 = f"{r['r1_us']:8.2f}" if r.get("r1_us") else f"{'-':>8s}"
        print(f"{r['model']:10s} {r['name']:8s} {r['K']:6d} {r['N']:6d} {100 * r['sparsity']:5.1f} {r['us']:8.2f} {r1} "
              f"{r['cublas_us']:8.2f} {r['speedup']:7.3f} {r['gbs']:6.0f} {100 * r['frac_copy_bw']:5.1f}%")


def compile_check(dtype, results):
    """torch.compile(fullgraph, reduce-overhead) of a decode-like step using all three ops."""
    import teal.kernels as tk

    K, F_, sizes = 4096, 14336, (4096, 1024, 1024)
    wqkv = (torch.randn(K, sum(sizes), device="cuda") / 64).to(dtype)
    wgu = (torch.randn(K, 2 * F_, device="cuda") / 64).to(dtype)
    wdn = (torch.randn(F_, K, device="cuda") / 120).to(dtype)
    tq = torch.tensor([0.5, 0.7, 0.6], device="cuda")
    tg = torch.tensor([0.6, 0.6], device="cuda")
    td = torch.tensor(0.02, device="cuda")

    def step(x):
        qkv = tk.sparse_gemv_segments(x, wqkv, tq, (4096, 5120, 6144))
        h = tk.sparse_gated_gemv(x, wgu, tg)
        y = tk.sparse_gemv(h, wdn, td)
        return qkv, y + x

    x = torch.randn(1, 1, K, device="cuda").to(dtype)
    ref = step(x)
    t0 = time.time()
    cf = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(4):
        out = cf(x)
    torch.cuda.synchronize()
    ok = all(torch.equal(a, b) for a, b in zip(out, ref))
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        cf(x)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    msg = f"COMPILE-CHECK fullgraph reduce-overhead: bitwise equal to eager: {ok}; {statistics.median(ts):.1f} us/step (compile {time.time() - t0:.1f}s)"
    print(msg)
    results["compile_check"] = msg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sparsities / shapes")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--sweep", action="store_true", help="block-config sweep at 50%% sparsity")
    ap.add_argument("--apply-sweep", action="store_true", help="use sweep winners for the benchmark table")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--compare", action="store_true", help="round 1 vs dot candidates at key shapes; apply winners")
    ap.add_argument("--compare-shapes", nargs="+", default=None, choices=sorted(CANDIDATES),
                    help="--compare: only these projections (default: all four)")
    ap.add_argument("--compare-sparsities", nargs="+", type=float, default=None,
                    help="--compare: also time these sparsities (0, 0.5 and 0.9 always; the score "
                         "t0 + 2 t50 + t90 is unchanged), e.g. 0.6 0.7 0.8 for list/dot crossovers")
    ap.add_argument("--table-out", default=None, help="--compare: write the winners' table here (JSON)")
    ap.add_argument("--precompile-only", action="store_true", help="compile the --compare candidates, then exit")
    ap.add_argument("--baseline", action="store_true", help="bench: also time the round-1 config (r1_us)")
    ap.add_argument("--compile-check", action="store_true")
    ap.add_argument("--procs", type=int, default=12, help="processes for parallel Triton precompile (sweep)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("CUDA required")
    if args.precompile_only:  # fill Triton's on-disk cache (parallel), no timing
        precompile_compare(args)
        return
    import triton

    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    bw = copy_bandwidth()
    print(f"GPU {props.name} ({props.multi_processor_count} SMs, L2 {l2 >> 20} MB) torch {torch.__version__} "
          f"triton {triton.__version__} dtype {args.dtype}; device copy bandwidth {bw:.0f} GB/s")
    results = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
                   copy_gbs=bw, sweep=[])
    if args.sweep:
        run_sweep(args, l2, dtype, results)
    if args.compare:
        run_compare(args, l2, dtype, results, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.compile_check:
        try:
            compile_check(dtype, results)
        except Exception as e:
            print("COMPILE-CHECK FAILED:", repr(e)[:2000])
            results["compile_check"] = "failed: " + repr(e)[:2000]
    if not args.no_bench:
        run_bench(args, l2, dtype, results, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
