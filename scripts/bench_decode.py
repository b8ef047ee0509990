"""End-to-end decode tokens/s: dense vs TEAL sparsity, random weights at real model shapes.

    python scripts/bench_decode.py --models Meta-Llama-3-8B Llama-2-7b --json out.json
    python scripts/bench_decode.py --checkpoint checkpoints/X/model.pth --json out.json

For each model: random bf16 weights (N(0, 1/in_features)), thresholds calibrated on the
model's own activations for random token ids (the same histogram/inverse-CDF path as
calibrate.py), then in ONE process: a dense baseline (cuBLAS `F.linear`, sparsity off) and
sparsity 0/25/40/50/65% through the sparse path, each `torch.compile(mode="reduce-overhead",
fullgraph=True)` decode (CUDA graphs), tokens/s as the median of --runs runs of
--new_tokens tokens, achieved GB/s on the bytes actually read, and the measured effective
sparsity per projection type. Speed is measured here, never in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import teal
from model import ModelArgs, Transformer
from teal.generation import (bytes_per_decode_step, decode_n_tokens, decode_one_token, generate,
                             measure_effective_sparsity)
from teal.io import atomic_write_json
from teal.kernels import DEFAULT_TABLE, DispatchTable, KernelPolicy
from teal.provenance import environment
from teal.calibration import collect_histograms
from teal.projections import PROJECTIONS
from teal.thresholds import Calibration, apply_uniform_sparsity


def random_model(name: str, device, dtype, n_layer: int | None = None,
                 policy: KernelPolicy = KernelPolicy()) -> Transformer:
    """Transformer with the named config and random N(0, 1/in) weights, built on `device`."""
    args = ModelArgs.from_name(name)
    if n_layer:
        args.n_layer = n_layer
    args.block_size = min(args.block_size, 4096)
    with torch.device("meta"):
        model = Transformer(args)
    gen = torch.Generator(device=device).manual_seed(0)
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if pname == "weight" and p.dim() == 2:
                fan_in = p.shape[1]
                w = torch.empty(p.shape[1], p.shape[0], device=device, dtype=dtype) \
                    if isinstance(mod, teal.SparseLinear) else \
                    torch.empty(p.shape, device=device, dtype=dtype)
                w.normal_(0.0, fan_in ** -0.5, generator=gen)
                new = w.t() if isinstance(mod, teal.SparseLinear) else w
            else:
                new = torch.ones(p.shape, device=device, dtype=dtype)
            setattr(mod, pname, torch.nn.Parameter(new, requires_grad=False))
        for bname, b in list(mod.named_buffers(recurse=False)):
            mod._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return teal.set_kernel_policy(model.eval(), policy)


@torch.no_grad()
def calibrate_random(model: Transformer, tokens: int, device) -> Calibration:
    """Histograms of the four projection inputs for `tokens` random ids (dense forward)."""
    ids = torch.randint(0, model.config.vocab_size, (tokens,))
    return collect_histograms(model, ids, tokens, weighted=False, device=device, progress=False,
                              text_meta="random token ids")


def time_decode(model, decode_fn, prompt, new_tokens: int, runs: int) -> list[float]:
    """Tokens/s of `runs` greedy generations (after one warm-up that compiles/captures)."""
    generate(model, prompt, new_tokens, decode_fn, temperature=0.0)
    out = []
    for _ in range(runs):
        _, tm = generate(model, prompt, new_tokens, decode_fn, temperature=0.0)
        out.append(tm["decode_tokens"] / tm["decode_s"])
    return out


def _kernel_group(name: str) -> str:
    n = name.lower()
    if "sparse_g" in n or "keep_list" in n:
        return "TEAL sparse GEMV"
    if "decode_attention" in n:
        return "decode attention kernel"
    if any(k in n for k in ("gemv", "gemm", "xmma", "cutlass", "cublas", "splitk", "nvjet")):
        return "cuBLAS GEMV/GEMM"
    return "other (norm, RoPE, KV cache, attention, residual, sampling)"


@torch.no_grad()
def profile_decode(model, decode_fn, prompt, steps: int = 16) -> dict:
    """Per-token GPU time by kernel (torch.profiler over `steps` compiled decode steps).

    Kernels replayed from CUDA graphs are reported by CUPTI like eager ones.  Returns
    {"groups": {group: us/token}, "kernels": [(name, us/token, launches/token), ...]}.
    """
    from torch.profiler import ProfilerActivity, profile

    seq, _ = generate(model, prompt, 2, decode_fn, temperature=0.0)  # caches stay allocated
    cur = seq[-1].view(1, 1).clone()
    pos = torch.tensor([seq.numel() - 1], device=prompt.device, dtype=torch.int)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_n_tokens(model, cur, pos, steps, decode_fn, 0.0, None)
        torch.cuda.synchronize()
    kernels, groups = [], {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if not us or e.key.startswith(("cudaGraph", "cuda")):
            continue
        kernels.append((e.key[:90], us / steps, e.count / steps))
        g = _kernel_group(e.key)
        groups[g] = groups.get(g, 0.0) + us / steps
    kernels.sort(key=lambda r: -r[1])
    return dict(groups=groups, kernels=kernels[:30], steps=steps)


def load_real(checkpoint, thresholds, device, dtype, policy: KernelPolicy):
    """(model, calibration, name) of a converted checkpoint and its calibration file;
    SystemExit with a one-line message when either is missing, corrupt or mismatched."""
    from model import load_model
    from teal.checkpoint import CheckpointError
    from teal.thresholds import ThresholdsError

    path = Path(thresholds) if thresholds else Path(checkpoint).parent / "thresholds.safetensors"
    try:
        model, meta = load_model(checkpoint, device=device, dtype=dtype)
        calib = Calibration.load(path, model.config.to_dict())
    except (CheckpointError, ThresholdsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    model = teal.set_kernel_policy(model.eval(), policy)
    return model, calib, str(meta.get("name") or Path(checkpoint).parent.name)


def bench_model(name, args, device, dtype, policy, progress, rows: list, save) -> None:
    """Time dense and every sparsity of one model (a config name: random weights; a path:
    a real checkpoint); appends a dict per configuration to `rows`, calls `save()` after each."""
    if isinstance(name, Path):
        model, calib, name = load_real(name, args.thresholds, device, dtype, policy)
    else:
        model = random_model(name, device, dtype, args.n_layer, policy)
        calib = calibrate_random(model, args.calib_tokens, device)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,), device=device,
                           dtype=torch.int)
    compiled = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) \
        if args.compile else decode_one_token
    configs = [("dense", None)] + [(f"{s:.0%}", s) for s in args.sparsities]
    for label, s in configs:
        if s is None:
            teal.configure(model, sparse=False)
        else:
            apply_uniform_sparsity(model, calib, s)
            teal.configure(model, sparse=True)  # 0% still runs through the sparse path
        tps = time_decode(model, compiled, prompt, args.new_tokens, args.runs)
        med = statistics.median(tps)
        eff = {}
        if s is not None:
            seq, _ = generate(model, prompt, args.new_tokens, decode_one_token, temperature=0.0)
            eff = measure_effective_sparsity(model, seq, prompt.numel())
        gb = bytes_per_decode_step(model, eff) / 1e9
        prof = None
        if args.profile is not None and (label == "dense" or s in args.profile):
            try:
                prof = profile_decode(model, compiled, prompt)
            except Exception as e:  # a profiler problem must not lose the timings
                progress.write(f"profile {name} {label} failed: {e!r}"[:300])
                prof = dict(groups={}, kernels=[], error=repr(e)[:300])
            progress.write(f"profile {name} {label}: " + ", ".join(
                f"{g} {us:.0f} us" for g, us in prof["groups"].items()))
            for k, us, n in prof["kernels"][:12]:
                progress.write(f"    {us:8.1f} us/token  {n:5.1f}/token  {k}")
        rows.append(dict(model=name, config=label, target=s, tokens_per_s=med,
                         runs=tps, gb_per_token=gb, gb_per_s=gb * med,
                         effective_sparsity=eff, profile=prof))
        save()
        progress.update(1)
        progress.write(f"{name:18s} {label:>6s}  {med:8.1f} tok/s  {gb * med:7.0f} GB/s")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="model configs to build with random weights (default: Meta-Llama-3-8B "
                         "Llama-2-7b, or none with --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="also (or only) benchmark this converted model.pth with its calibration")
    ap.add_argument("--thresholds", type=Path, default=None,
                    help="calibration file for --checkpoint (default: beside the checkpoint)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.25, 0.4, 0.5, 0.65])
    ap.add_argument("--n_layer", type=int, default=None, help="override layer count (smoke tests)")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_tokens", type=int, default=16)
    ap.add_argument("--calib_tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--attention", choices=["kernel", "torch"], default="kernel",
                    help="decode attention: the fused Triton kernel (default) or the torch ops")
    ap.add_argument("--gemv", choices=["kernel", "torch"], default="kernel",
                    help="sparse projections: the Triton GEMV kernels (default) or the torch path")
    ap.add_argument("--kernel-table", dest="kernel_table", type=Path, default=None,
                    help="dispatch table JSON (scripts/bench_gemv.py --table-out) in front of the "
                         "built-in one")
    ap.add_argument("--profile", nargs="*", type=float, default=None,
                    help="also profile the dense step and these sparsities (kernel time per token)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    table = DEFAULT_TABLE
    if args.kernel_table is not None:
        try:
            table = DEFAULT_TABLE.with_rows(DispatchTable.load(args.kernel_table).rows)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    policy = KernelPolicy(gemv=args.gemv == "kernel", attention=args.attention == "kernel", table=table)
    dtype = getattr(torch, args.dtype)
    env = environment(Path(__file__).resolve().parent, os.environ.get("TEAL_COMMIT"))
    print(json.dumps(env))
    rows = []

    def save():  # after every configuration, so a run cut short keeps what it measured
        if args.json:
            cli = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            atomic_write_json(args.json, dict(env=env, args=cli, rows=rows), make_parents=True)

    if args.models is None:
        args.models = [] if args.checkpoint else ["Meta-Llama-3-8B", "Llama-2-7b"]
    targets = list(args.models) + ([args.checkpoint] if args.checkpoint else [])
    with tqdm(total=len(targets) * (1 + len(args.sparsities)), desc="decode bench") as bar:
        for name in targets:
            bench_model(name, args, args.device, dtype, policy, bar, rows, save)
    print(f"\n{'model':18s} {'config':>6s} {'tok/s':>8s} {'x dense':>8s} {'GB/s':>7s}  eff. sparsity")
    for r in rows:
        dense = next(x for x in rows if x["model"] == r["model"] and x["config"] == "dense")
        eff = r["effective_sparsity"]
        es = " ".join(f"{p[:-5]}={eff[p]:.2f}" for p in PROJECTIONS if p in eff)
        print(f"{r['model']:18s} {r['config']:>6s} {r['tokens_per_s']:8.1f} "
              f"{r['tokens_per_s'] / dense['tokens_per_s']:8.2f} {r['gb_per_s']:7.0f}  {es}")
    save()


if __name__ == "__main__":
    main()
