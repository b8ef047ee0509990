"""Decode throughput of (tensor-parallel) TEAL at real model shapes with random weights.

Builds a random-weight model (default: Llama-3-8B shapes, bf16), shards it with `tp.apply_tp`
when run under torchrun, sets uniform-sparsity thresholds from a synthetic calibration (the
histograms of every projection input over a random-token forward, through the same
`teal.thresholds.apply_uniform_sparsity` as generate.py), and times greedy batch-1 decoding
for each requested sparsity in one process: median tokens/s over several runs, the effective
sparsity measured in an extra eager run (counts aggregated over ranks), memory and bytes.

    python scripts/bench_tp.py --json tp1.json                          # 1 GPU baseline
    torchrun --nproc_per_node 2 scripts/bench_tp.py --json tp2.json     # 2 GPUs, NCCL
    torchrun --nproc_per_node 2 scripts/bench_tp.py --tiny              # CPU smoke test, gloo

Rank 0 prints one JSON object per sparsity as it finishes and the full result at the end
(also written to --json after every sparsity level, so a crash keeps finished levels).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 unless set).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

import tp

tp.set_safe_nccl_env()  # before torch/NCCL initialise anything

import torch  # noqa: E402

from model import ModelArgs, Transformer  # noqa: E402
from teal.calibration import collect_histograms  # noqa: E402
from teal.io import atomic_write_json  # noqa: E402
from teal.projections import INPUTS  # noqa: E402
from teal.sparse_linear import configure, sparse_linears  # noqa: E402
from teal.thresholds import apply_uniform_sparsity  # noqa: E402

TINY = dict(block_size=512, vocab_size=512, n_layer=2, n_head=8, n_local_heads=4, dim=128,
            intermediate_size=384)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def log(*a) -> None:
    if tp.is_rank0():
        print(*a, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int):
    """Random full model in `dtype` on `device`, identical on every rank (same seed)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in dtype: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(old)
    for m in model.modules():  # thresholds/counters are fp32/fp64 whatever the weight dtype
        if hasattr(m, "counts"):
            m.counts = m.counts.double()
            m.threshold = m.threshold.float()
    with torch.no_grad():  # nn.Embedding's N(0, 1) rows; the lm_head like a trained one
        model.output.weight.normal_(std=cfg.dim ** -0.5)
    return model.eval()


@torch.no_grad()
def synthetic_calibration(model: Transformer, n_tokens: int, vocab: int, device, seed: int):
    """Histograms of the four projection inputs over one forward of random tokens."""
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (n_tokens,), generator=g)
    calib = collect_histograms(model, tokens, n_tokens, weighted=False, device=device, progress=False,
                               text_meta=f"random tokens (seed {seed}, {n_tokens} tokens)")
    if tp.world_size() > 1:
        # o/down see input shards: sum their histograms over ranks so every rank (and a
        # 1-GPU run) gets the threshold of the full input. q/k/v and gate/up see the full
        # input already (identical histograms on every rank).
        rows = [INPUTS.index("attn_out"), INPUTS.index("mlp_mid")]
        h = calib.hist[:, rows].contiguous().to(device)
        torch.distributed.all_reduce(h)
        calib.hist[:, rows] = h.cpu()
    return calib


def decode_one_token(model: Transformer, tok: torch.Tensor, input_pos: torch.Tensor):
    """One greedy decode step: (1, 1) token at position input_pos (1,) -> next (1, 1) token."""
    logits = model(tok, input_pos)
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def generate(model, step, prompt: torch.Tensor, n_new: int) -> tuple[torch.Tensor, float]:
    """Eager prefill + n_new timed decode steps; returns (last token, decode seconds)."""
    device = prompt.device
    t = prompt.shape[1]
    tok = model(prompt, torch.arange(t, device=device))[:, -1].argmax(-1, keepdim=True)
    sync(device)
    tp.barrier()
    t0 = time.perf_counter()
    pos = torch.tensor([t], device=device)
    for _ in range(n_new):
        tok = step(model, tok, pos).clone()  # clone: CUDA-graph outputs are overwritten
        pos += 1
    sync(device)
    return tok, time.perf_counter() - t0


def weight_bytes(model: Transformer) -> tuple[int, int]:
    """Bytes read per decode step on this rank: (block projections, lm_head + norms)."""
    proj = sum(m.weight.numel() * m.weight.element_size() for m in sparse_linears(model))
    other = model.output.weight.numel() * model.output.weight.element_size()
    other += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    return proj, other


def kernel_status(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu (torch path)"
    try:
        from teal import kernels
        return "triton" if kernels.kernels_available(device) else "unavailable"
    except Exception as e:  # noqa: BLE001 - report, do not fail: dense runs still work
        return f"import failed: {e.__class__.__name__}: {e}"


def parse_args(argv=None):
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="Meta-Llama-3-8B", help="key of model.transformer_configs")
    p.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke test)")
    p.add_argument("--sparsities", default="0,0.4,0.5", help="comma-separated, in [0, 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length (prefill)")
    p.add_argument("--tokens", type=int, default=128, help="decode steps per timed run")
    p.add_argument("--runs", type=int, default=5, help="timed runs per sparsity (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs (compile, CUDA graphs)")
    p.add_argument("--calib-tokens", type=int, default=256,
                   help="tokens the thresholds are calibrated on")
    p.add_argument("--track-tokens", type=int, default=32,
                   help="eager decode steps that measure the effective sparsity")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the decode step (default: on for CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="time the eager decode step")
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode")
    p.add_argument("--compile-backend", default="inductor",
                   help="e.g. aot_eager to check tracing quickly on CPU")
    p.add_argument("--no-shard-output", action="store_true", help="replicate the lm_head")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights and prompt")
    p.add_argument("--json", default=None,
                   help="write the results here (rank 0) (default: printed only)")
    args = p.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    bad = [s for s in args.sparsities if not 0.0 <= s < 1.0]
    if bad:
        p.error(f"sparsities must be in [0, 1), got {bad}")
    if min(args.tokens, args.runs, args.prompt_len) < 1:
        p.error("--tokens, --runs and --prompt-len must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tp.maybe_init_dist()
    ws, rank = tp.world_size(), tp.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    cfg = ModelArgs(**TINY) if args.tiny else ModelArgs.from_name(args.model)
    max_seq = args.prompt_len + max(args.tokens, args.track_tokens) + 1
    cfg.block_size = max(max_seq, args.calib_tokens)  # RoPE table only as long as needed

    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype, args.seed)
    if ws > 1:
        tp.apply_tp(model, shard_output=not args.no_shard_output)
    sync(device)
    build_s = time.perf_counter() - t0
    proj_bytes, other_bytes = weight_bytes(model)
    log(f"built {'tiny' if args.tiny else args.model} ({dtype}) on {ws} x {device.type} in "
        f"{build_s:.1f} s; per rank: projections {proj_bytes / 1e9:.3f} GB, "
        f"lm_head+norms {other_bytes / 1e9:.3f} GB; kernels: {kernel_status(device)}")

    calib = synthetic_calibration(model, args.calib_tokens, cfg.vocab_size, device, args.seed)
    model.setup_caches(1, max_seq)
    g = torch.Generator().manual_seed(args.seed + 2)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(device)
    step = decode_one_token
    if use_compile:
        step = torch.compile(decode_one_token, mode=args.compile_mode, fullgraph=True,
                             backend=args.compile_backend)

    result = dict(
        model="tiny" if args.tiny else args.model, world_size=ws, dtype=str(dtype).split(".")[-1],
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or "cpu", torch=torch.__version__, compile=use_compile,
        compile_mode=args.compile_mode if use_compile else None,
        kernels=kernel_status(device), sharded_output=bool(getattr(model, "tp_info", None)
                                                            and model.tp_info.sharded_output),
        prompt_len=args.prompt_len, tokens=args.tokens, runs=args.runs,
        proj_bytes_per_rank=proj_bytes, other_bytes_per_rank=other_bytes, results=[])
    for s in args.sparsities:
        apply_uniform_sparsity(model, calib, s)
        configure(model, track=False)
        t_start = time.perf_counter()
        for _ in range(args.warmup):
            generate(model, step, prompt, args.tokens)
        warm_s = time.perf_counter() - t_start
        times = [generate(model, step, prompt, args.tokens)[1] for _ in range(args.runs)]
        rates = [args.tokens / t for t in times]

        configure(model, track=True)  # eager: counters are skipped on the kernel path
        generate(model, decode_one_token, prompt, args.track_tokens)
        zeroed, seen = tp.aggregate_counts(model)
        configure(model, track=False)
        eff = zeroed / seen if seen else 0.0

        tps = statistics.median(rates)
        active = proj_bytes * (1.0 - eff) + other_bytes
        entry = dict(sparsity=s, tokens_per_s=round(tps, 2),
                     tokens_per_s_runs=[round(r, 2) for r in rates],
                     ms_per_token=round(1e3 / tps, 4), effective_sparsity=round(eff, 4),
                     active_gb_per_s_per_rank=round(active * tps / 1e9, 1),
                     warmup_s=round(warm_s, 1))
        if device.type == "cuda":
            entry["max_memory_gb_rank0"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        result["results"].append(entry)
        log(json.dumps(entry))
        if args.json and tp.is_rank0():
            atomic_write_json(args.json, result, indent=2)
    dense = [r for r in result["results"] if r["sparsity"] == 0.0]
    if dense:
        for r in result["results"]:
            r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense[0]["tokens_per_s"], 3)
    log(json.dumps(result, indent=2))
    if args.json and tp.is_rank0():
        atomic_write_json(args.json, result, indent=2)
    return result


if __name__ == "__main__":
    try:
        main()
    except Exception:
        print(f"[rank {tp.get_rank()}] bench_tp failed:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        raise
    finally:
        tp.destroy()
