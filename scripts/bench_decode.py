"""End-to-end decode tokens/s: dense vs TEAL sparsity, random weights at real model shapes.

    python scripts/bench_decode.py --models Meta-Llama-3-8B Llama-2-7b --json out.json
    python scripts/bench_decode.py --checkpoint checkpoints/X/model.pth --json out.json
    python scripts/bench_decode.py --models Meta-Llama-3-8B --quant bf16 int8 int4 --json q.json

For each model: random bf16 weights (N(0, 1/in_features)), thresholds calibrated on the
model's own activations for random token ids (the same histogram/inverse-CDF path as
calibrate.py), then in ONE process: a dense baseline (cuBLAS `F.linear`, sparsity off) and
sparsity 0/25/40/50/65% through the sparse path, each `torch.compile(mode="reduce-overhead",
fullgraph=True)` decode (CUDA graphs), tokens/s as the median of --runs runs of
--new_tokens tokens, achieved GB/s on the bytes actually read, and the measured effective
sparsity per projection type. Speed is measured here, never in tests.

--quant FORMAT ... (bf16, int8, int4; default bf16 alone) repeats this per weight format in
the same process: bf16 as above; int8 / int4 quantize a copy of the calibrated model with
teal.quant (`quantize_model`; int4 groups of --groupsize input channels; the output head too
with --quant_head; the thresholds are the bf16 model's), then time the format's torch
weight-only baseline on the same codes ("torch int8": gpt-fast's `F.linear(x, W_int8.to(x.dtype))
* scales` per fused projection, compiled with coordinate-descent tuning as gpt-fast is, so
inductor fuses the int8 -> bf16 conversion into its M = 1 GEMV; "torch int4": torch's tinygemm
`aten._weight_int4pack_mm`), then ours at every sparsity (the quantized kernels, also at 0%).
Rows "torch int8", "int8 0%", "int8 50%", ...; the table shows each row against the bf16
dense row and against its format's torch baseline.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import teal
from model import ModelArgs, Transformer
from teal.generation import (bytes_per_decode_step, decode_n_tokens, decode_one_token, generate,
                             generate_batch, measure_effective_sparsity)
from teal.io import atomic_write_json
from teal.kernels import DEFAULT_TABLE, DispatchTable, KernelPolicy
from teal.provenance import environment
from teal.calibration import collect_histograms
from teal.projections import PROJECTIONS
from teal.quant import QuantSpec, parse_format
from teal.sparse_linear import QuantizedSparseLinear, quantize_model
from teal.thresholds import Calibration, apply_uniform_sparsity

try:  # scripts/ on sys.path (python scripts/bench_decode.py, the tests)
    import bench_gemv as _gemv
except ImportError:  # python -m scripts.bench_decode
    from scripts import bench_gemv as _gemv

FORMATS = ("bf16", "int8", "int4")


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


# --------------------------------------------------------------------------- torch baselines
class _TorchQuantLinear(nn.Module):
    """A fused projection module (q/k/v, o, gate/up, down or the head) computed by one of
    torch's weight-only quantized paths, built from a QuantizedSparseLinear's codes: the
    same quantized weight, no TEAL mask. `sizes` and the SwiGLU epilogue as SparseLinear's."""

    def __init__(self, q: QuantizedSparseLinear):
        super().__init__()
        self.in_features, self.sizes, self.gated = q.in_features, tuple(q.sizes), q.gated
        self.n = sum(self.sizes)

    def _product(self, x):
        raise NotImplementedError

    def forward(self, x):
        y = self._product(x)
        if self.gated:
            g, u = y.split(self.sizes, dim=-1)
            return F.silu(g) * u
        return y

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))


class TorchInt8Linear(_TorchQuantLinear):
    """gpt-fast's WeightOnlyInt8Linear over the fused projections:
    ``F.linear(x, weight_int8.to(x.dtype)) * scales`` with int8 (N, K) codes and one scale
    per output channel in the activation dtype (bf16 in gpt-fast)."""

    def __init__(self, q: QuantizedSparseLinear):
        super().__init__(q)
        w, s = _gemv.int8_baseline_weight(q.qweight, q.scales, q.act_dtype)
        self.register_buffer("weight", w)
        self.register_buffer("scales", s)

    def _product(self, x):
        return _gemv.int8_linear(x, self.weight, self.scales)


class TorchInt4Linear(_TorchQuantLinear):
    """torch's int4 tinygemm (gpt-fast's WeightOnlyInt4Linear):
    ``aten._weight_int4pack_mm(x (M, K) bf16, packed, groupsize, scales_and_zeros (K/g, N, 2))``
    on the module's codes re-packed by ``aten._convert_weight_to_int4pack`` (see
    bench_gemv.tinygemm_pack); CPU: the ``*_for_cpu`` twins."""

    def __init__(self, q: QuantizedSparseLinear):
        super().__init__(q)
        self.group = parse_format(q.wformat)[1]
        packed, sz, _ = _gemv.tinygemm_pack(q.qweight, q.scales, self.group, q.act_dtype)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz)

    def _product(self, x):
        y = _gemv.tinygemm_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.group,
                              self.scales_and_zeros)
        if y.shape[-1] != self.n:
            y = y[:, :self.n]
        return y.reshape(*x.shape[:-1], self.n)


BASELINES = {"int8": TorchInt8Linear, "int4": TorchInt4Linear}


@torch.no_grad()
def torch_baseline(qmodel: Transformer, mode: str) -> Transformer:
    """A copy of a quantized model whose QuantizedSparseLinear modules (and a quantized head)
    are replaced by the torch baseline of `mode` ("int8" or "int4") on the same codes."""
    base = copy.deepcopy(qmodel)
    for name, m in list(base.named_modules()):
        if isinstance(m, QuantizedSparseLinear):
            parent_name, _, attr = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            try:
                setattr(parent, attr, BASELINES[mode](m))
            except ValueError as e:
                raise SystemExit(f"error: torch {mode} baseline of {name}: {e}") from None
    return base


def decode_bytes(model, eff: dict) -> int:
    """Bytes read per decode step: `bytes_per_decode_step` plus the torch baselines' stored
    codes and scales (buffers, which it does not count)."""
    extra = sum(m.stored_bytes() for m in model.modules() if isinstance(m, _TorchQuantLinear))
    return bytes_per_decode_step(model, eff) + extra


def compile_decode(args, tuned: bool = False):
    """The decode step as benchmarked: `torch.compile(mode="reduce-overhead", fullgraph=True)`
    (eager with --no-compile); `tuned`: the same plus inductor's coordinate-descent tuning,
    gpt-fast's setting for its int8 path (returns (fn, options or None))."""
    if not args.compile:
        return decode_one_token, None
    if not tuned:
        return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True), None
    import torch._inductor as inductor
    opts = dict(inductor.list_mode_options("reduce-overhead"))
    opts["coordinate_descent_tuning"] = True
    return torch.compile(decode_one_token, options=opts, fullgraph=True), opts


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
    if n.startswith("triton_"):  # inductor's own kernels (their names list the fused ops)
        if n.startswith(("triton_red", "triton_per")) and "_mm" in n:
            return "inductor GEMV (torch int8 path)"  # an M = 1 mm decomposed to a reduction
        return "other (norm, RoPE, KV cache, attention, residual, sampling)"
    if "gemv_kernel" in n or "keep_list" in n or "sparse_g" in n:
        return "TEAL sparse GEMV"
    if "decode_attention" in n:
        return "decode attention kernel"
    if "tinygemm" in n or "int4pack" in n:
        return "torch int4 tinygemm"
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
    from teal.checkpoint import CheckpointError, default_thresholds
    from teal.thresholds import ThresholdsError

    path = Path(thresholds) if thresholds else default_thresholds(checkpoint)
    try:
        model, meta = load_model(checkpoint, device=device, dtype=dtype)
        calib = Calibration.load(path, model.config.to_dict())
    except (CheckpointError, ThresholdsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    model = teal.set_kernel_policy(model.eval(), policy)
    return model, calib, str(meta.get("name") or Path(checkpoint).parent.name)


def real_prompt(checkpoint, text: str, new_tokens: int, model, device) -> torch.Tensor:
    """Token ids (int32, on device) of `text` with the checkpoint's tokenizer, wrapped in its
    chat format when it has one; SystemExit with a one-line message when the tokenizer cannot
    be loaded, the prompt is empty or prompt + new tokens exceed the context."""
    from teal.checkpoint import CheckpointError, load_checkpoint
    from teal.tokenizer import load_tokenizer
    try:
        meta = load_checkpoint(checkpoint).get("meta", {})
        tok = load_tokenizer(Path(checkpoint).parent, meta)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: --prompt: cannot load the tokenizer next to {checkpoint} ({e})")
    if not text.strip():
        raise SystemExit("error: --prompt is empty; pass some text")
    if tok.chat_template:
        text = tok.apply_chat_template(text)
    ids = tok.encode(text, special=True)
    if not ids:
        raise SystemExit("error: --prompt is empty; pass some text")
    if len(ids) + new_tokens > model.config.block_size:
        raise SystemExit(f"error: --prompt ({len(ids)} tokens) + --new_tokens ({new_tokens}) "
                         f"exceed the context length {model.config.block_size}; shorten one")
    return torch.tensor(ids, dtype=torch.int, device=device)


def bench_model(name, args, device, dtype, policy, progress, rows: list, save) -> None:
    """Time every format of one model (a config name: random weights; a path: a real
    checkpoint): bf16 dense and every sparsity, then per quantized format its torch baseline
    and every sparsity; appends a dict per configuration to `rows`, calls `save()` after each."""
    real = isinstance(name, Path)
    if real:
        model, calib, name = load_real(name, args.thresholds, device, dtype, policy)
        if any(isinstance(m, QuantizedSparseLinear) for m in model.modules()) and args.quant != ["bf16"]:
            raise SystemExit(f"error: {name} is already a quantized checkpoint; pass its bf16 "
                             f"checkpoint to --checkpoint (--quant quantizes it here)")
    else:
        model = random_model(name, device, dtype, args.n_layer, policy)
        calib = calibrate_random(model, args.calib_tokens, device)
    if args.prompt is not None and real:
        prompt = real_prompt(args.checkpoint, args.prompt, args.new_tokens, model, device)
    else:
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,), device=device,
                               dtype=torch.int)
    compiled, _ = compile_decode(args)

    def run(m, fmt, wformat, label, s, decode_fn, baseline, options=None):
        if s is None:
            teal.configure(m, sparse=False)
        else:
            apply_uniform_sparsity(m, calib, s)
            teal.configure(m, sparse=True)  # 0% still runs through the sparse path
        tps = time_decode(m, decode_fn, prompt, args.new_tokens, args.runs)
        med = statistics.median(tps)
        eff = {}
        if s is not None:
            seq, _ = generate(m, prompt, args.new_tokens, decode_one_token, temperature=0.0)
            eff = measure_effective_sparsity(m, seq, prompt.numel())
        gb = decode_bytes(m, eff) / 1e9
        prof = None
        if args.profile is not None and (baseline or s in args.profile):
            try:
                prof = profile_decode(m, decode_fn, prompt)
            except Exception as e:  # a profiler problem must not lose the timings
                progress.write(f"profile {name} {label} failed: {e!r}"[:300])
                prof = dict(groups={}, kernels=[], error=repr(e)[:300])
            progress.write(f"profile {name} {label}: " + ", ".join(
                f"{g} {us:.0f} us" for g, us in prof["groups"].items()))
            for k, us, n in prof["kernels"][:12]:
                progress.write(f"    {us:8.1f} us/token  {n:5.1f}/token  {k}")
        row = dict(model=name, format=fmt, wformat=wformat, config=label, target=s,
                   baseline=baseline, tokens_per_s=med, runs=tps, gb_per_token=gb,
                   gb_per_s=gb * med, effective_sparsity=eff, profile=prof)
        if options:
            row["compile_options"] = options
        rows.append(row)
        save()
        progress.update(1)
        progress.write(f"{name:18s} {label:>6s}  {med:8.1f} tok/s  {gb * med:7.0f} GB/s")

    # a quantized --checkpoint is timed as it is, labelled with its own format
    own = next((m.wformat for m in model.modules() if isinstance(m, QuantizedSparseLinear)), "dense")
    for fmt in args.quant:
        if fmt == "bf16":
            label = "bf16" if own == "dense" else parse_format(own)[0]
            run(model, label, own, "dense", None, compiled, True)
            for s in args.sparsities:
                run(model, label, own, f"{s:.0%}", s, compiled, False)
            if args.batch_sizes:
                bench_batch(model, name, calib, args, progress, rows, save)
            if args.speculate:
                bench_verify(model, name, calib, args, progress, rows, save)
            continue
        spec = QuantSpec(fmt, args.groupsize if fmt == "int4" else 0, args.quant_head)
        qmodel = copy.deepcopy(model)
        try:
            quantize_model(qmodel, spec)
        except ValueError as e:
            raise SystemExit(f"error: {name} --quant {fmt}: {e}") from None
        teal.set_kernel_policy(qmodel, policy)  # the head's new module too
        _free()
        base = torch_baseline(qmodel, fmt)
        base_fn, options = compile_decode(args, tuned=fmt == "int8" and args.baseline_tuning)
        run(base, fmt, spec.wformat, f"torch {fmt}", None, base_fn, True, options)
        del base, base_fn
        _free()
        for s in args.sparsities:
            run(qmodel, fmt, spec.wformat, f"{fmt} {s:.0%}", s, compiled, False)
        del qmodel
        _free()
    del model
    _free()


def bench_batch(model, name, calib, args, progress, rows: list, save) -> None:
    """Batched decoding (teal.generation.generate_batch) of B random prompts, dense and at
    each sparsity: per-sequence and aggregate tokens/s (median of runs), one compiled graph
    per batch size. Rows have kind="batch"."""
    decode_fn, _ = compile_decode(args)
    for B in args.batch_sizes:
        prompts = [torch.randint(0, model.config.vocab_size, (args.prompt_tokens,),
                                 device=args.device, dtype=torch.int) for _ in range(B)]
        for s in [None] + list(args.batch_sparsities):
            if s is None:
                teal.configure(model, sparse=False)
            else:
                apply_uniform_sparsity(model, calib, s)
                teal.configure(model, sparse=True)
            generate_batch(model, prompts, args.new_tokens, decode_fn, temperature=0.0)
            per_seq = []
            for _ in range(args.runs):
                _, tm = generate_batch(model, prompts, args.new_tokens, decode_fn, temperature=0.0)
                per_seq.append(tm["steps"] / tm["decode_s"])
            med = statistics.median(per_seq)
            label = "dense" if s is None else f"{s:.0%}"
            rows.append(dict(kind="batch", model=name, batch_size=B, config=label, target=s,
                             tokens_per_s_per_sequence=med, tokens_per_s=med * B, runs=per_seq))
            save()
            progress.write(f"{name:18s} batch {B:2d} {label:>6s}  {med:8.1f} tok/s per sequence, "
                           f"{med * B:8.1f} aggregate")
    teal.configure(model, sparse=False)


def bench_verify(model, name, calib, args, progress, rows: list, save) -> None:
    """The verify step of speculative decoding: one forward of k + 1 tokens against the KV
    cache (compiled like the decode step), for each k of --speculate_k, dense and at each
    --verify_sparsities (a sparse verifier: every token masked by its own |x| > t, the
    several-row kernels); median ms of --runs x 20 calls. Rows have kind="verify"."""
    from teal.speculative import verify_step
    fn = verify_step
    if args.compile:
        fn = torch.compile(verify_step, mode="reduce-overhead", fullgraph=True)
    ctx = args.prompt_tokens + args.new_tokens
    with torch.device(args.device):
        model.setup_caches(1, ctx + max(args.speculate_k) + 1)
    for s in args.verify_sparsities:
        if s > 0:
            apply_uniform_sparsity(model, calib, s)
        teal.configure(model, sparse=s > 0, sparsify_prefill=s > 0)
        label = "dense" if s == 0 else f"{s:.0%}"
        for k in args.speculate_k:
            toks = torch.randint(0, model.config.vocab_size, (1, k + 1), device=args.device,
                                 dtype=torch.int)
            pos = torch.arange(ctx, ctx + k + 1, device=args.device)
            with torch.no_grad():
                for _ in range(3):
                    fn(model, toks, pos)
                times = []
                for _ in range(args.runs):
                    _sync_dev(args.device)
                    t0 = time.perf_counter()
                    for _ in range(20):
                        fn(model, toks, pos)
                    _sync_dev(args.device)
                    times.append((time.perf_counter() - t0) / 20 * 1e3)
            med = statistics.median(times)
            rows.append(dict(kind="verify", model=name, k=k, verify_ms=med, runs=times,
                             verify_sparsity=s, config=label))
            save()
            progress.write(f"{name:18s} verify k={k}: {med:.3f} ms ({k + 1} tokens, {label})")
    teal.configure(model, sparse=False, sparsify_prefill=False)


def _sync_dev(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def speculative_model(rows: list, acceptance: dict, groupsize: int) -> list:
    """Modelled tokens/s of lossless speculative decoding with a dense verifier: for each
    timed draft (a sparse bf16 / quantized decode row) and k, tokens_per_step / (k t_draft +
    t_verify(k) + all_kept t_draft) with the tokens per verify step and the fraction of steps
    that kept all k proposals measured on the real model (scripts/speculative_acceptance.py),
    t_draft = 1 / its decode tokens/s, t_verify the measured verify step; speedup against the
    bf16 dense decode row of the same run."""
    out = []
    for v in (r for r in rows if r.get("kind") == "verify" and not r.get("verify_sparsity")):
        dense = next((r for r in rows if r.get("kind") is None and r["model"] == v["model"]
                      and r["format"] == "bf16" and r["config"] == "dense"), None)
        if dense is None:
            continue
        for d in (r for r in rows if r.get("kind") is None and r["model"] == v["model"]
                  and not r["baseline"]):
            label = {"bf16": "bf16", "int8": "int8", "int4": f"int4-g{groupsize}"}[d["format"]]
            acc = acceptance.get((label, round(d["target"], 4), v["k"]))
            if acc is None:
                continue
            t_draft = 1.0 / d["tokens_per_s"]
            t_step = v["k"] * t_draft + v["verify_ms"] / 1e3 + acc["all_kept_fraction"] * t_draft
            tps = acc["tokens_per_step"] / t_step
            out.append(dict(kind="speculative_model", model=v["model"], draft=label,
                            draft_sparsity=d["target"], k=v["k"], draft_ms=t_draft * 1e3,
                            verify_ms=v["verify_ms"], tokens_per_step=acc["tokens_per_step"],
                            acceptance_rate=acc["acceptance_rate"], modelled_tokens_per_s=tps,
                            speedup_vs_dense=tps / dense["tokens_per_s"]))
    return out


def load_acceptance(path: Path) -> dict:
    """{(draft label, sparsity, k): row} from scripts/speculative_acceptance.py's JSON."""
    try:
        data = json.loads(Path(path).read_text())
        return {(r["draft"], round(r["sparsity"], 4), r["k"]): r
                for r in data["rows"] if "draft" in r}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --acceptance {path}: not a speculative_acceptance.py JSON "
                         f"({e})") from None


def _free() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(rows: list, formats: list) -> None:
    """bf16 alone: the table as before; with quantized formats: grouped by model and format,
    each row against the bf16 dense row and against its format's torch baseline."""
    rows = [r for r in rows if r.get("kind") is None]

    def eff_of(r):
        eff = r["effective_sparsity"]
        return " ".join(f"{p[:-5]}={eff[p]:.2f}" for p in PROJECTIONS if p in eff)

    if formats == ["bf16"]:
        print(f"\n{'model':18s} {'config':>6s} {'tok/s':>8s} {'x dense':>8s} {'GB/s':>7s}  eff. sparsity")
        for r in rows:
            dense = next(x for x in rows if x["model"] == r["model"] and x["config"] == "dense")
            print(f"{r['model']:18s} {r['config']:>6s} {r['tokens_per_s']:8.1f} "
                  f"{r['tokens_per_s'] / dense['tokens_per_s']:8.2f} {r['gb_per_s']:7.0f}  {eff_of(r)}")
        return
    print(f"\n{'model':18s} {'format':>9s} {'config':>10s} {'tok/s':>8s} {'x bf16':>7s} {'x torch':>7s} "
          f"{'GB/s':>7s}  eff. sparsity")
    last = None
    for r in rows:
        fmt = r.get("format", "bf16")
        if last is not None and (r["model"], fmt) != last:
            print()
        last = (r["model"], fmt)
        dense = next((x for x in rows if x["model"] == r["model"] and x.get("format", "bf16") == "bf16"
                      and x.get("baseline", x["config"] == "dense")), None)
        base = next((x for x in rows if x["model"] == r["model"] and x.get("format", "bf16") == fmt
                     and x.get("baseline", x["config"] == "dense")), None)
        xd = f"{r['tokens_per_s'] / dense['tokens_per_s']:7.2f}" if dense else f"{'-':>7s}"
        xb = f"{r['tokens_per_s'] / base['tokens_per_s']:7.2f}" if base else f"{'-':>7s}"
        shown = fmt if fmt == "bf16" else r.get("wformat", fmt)
        print(f"{r['model']:18s} {shown:>9s} {r['config']:>10s} {r['tokens_per_s']:8.1f} "
              f"{xd} {xb} {r['gb_per_s']:7.0f}  {eff_of(r)}")
    print("(x bf16: against the bf16 cuBLAS dense row; x torch: against the format's torch baseline "
          "(bf16: cuBLAS dense, int8: gpt-fast's weight-only int8, int4: tinygemm); GB/s on the "
          "bytes read per token)")


def main(argv=None):
    from teal.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help="model configs to build with random weights (default: Meta-Llama-3-8B "
                         "Llama-2-7b, or none with --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="also (or only) benchmark this converted model.pth with its calibration "
                         "(default: none)")
    ap.add_argument("--thresholds", type=Path, default=None,
                    help="calibration file for --checkpoint (default: beside the checkpoint)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.25, 0.4, 0.5, 0.65],
                    help="sparsities to time (0 = dense)")
    ap.add_argument("--n_layer", type=int, default=None,
                    help="override layer count (smoke tests) (default: the config's)")
    ap.add_argument("--new_tokens", type=int, default=128, help="decode steps per timed run")
    ap.add_argument("--prompt_tokens", type=int, default=16, help="prompt length (prefill)")
    ap.add_argument("--prompt", default=None,
                    help="with --checkpoint: this text (chat-wrapped for an instruct model) as the "
                         "prompt instead of --prompt_tokens random tokens, so the decoded tokens "
                         "and their measured sparsity are those of real text")
    ap.add_argument("--calib_tokens", type=int, default=512,
                    help="tokens the random models' thresholds are calibrated on")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="time the eager decode step (no torch.compile / CUDA graphs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="activation (and dense weight) dtype")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the results here (default: printed only)")
    ap.add_argument("--attention", choices=["kernel", "torch"], default="kernel",
                    help="decode attention: the fused Triton kernel (default) or the torch ops")
    ap.add_argument("--gemv", choices=["kernel", "torch"], default="kernel",
                    help="sparse projections: the Triton GEMV kernels (default) or the torch path")
    ap.add_argument("--kernel-table", dest="kernel_table", type=Path, default=None,
                    help="dispatch table JSON (scripts/bench_gemv.py --table-out) in front of the "
                         "built-in one (default: the built-in one only)")
    ap.add_argument("--profile", nargs="*", type=float, default=None,
                    help="also profile the dense step (and each format's torch baseline) and these "
                         "sparsities (kernel time per token) (default: no profile)")
    ap.add_argument("--quant", nargs="+", choices=FORMATS, default=["bf16"],
                    help="weight formats, each timed as its torch baseline then ours at every "
                         "sparsity (default: bf16 alone)")
    ap.add_argument("--groupsize", type=int, default=128, choices=(32, 64, 128),
                    help="int4: input channels per scale group")
    ap.add_argument("--quant_head", action="store_true",
                    help="also quantize the output head (ours and the torch baselines)")
    ap.add_argument("--no-baseline-tuning", dest="baseline_tuning", action="store_false",
                    help="compile the torch int8 baseline without gpt-fast's coordinate-descent "
                         "tuning (then inductor materialises a bf16 copy of every weight per step)")
    ap.add_argument("--batch_sizes", nargs="+", type=int, default=None,
                    help="also time batched decoding of B random prompts (bf16, dense and each "
                         "sparsity): tokens/s per sequence and aggregate")
    ap.add_argument("--batch_sparsities", nargs="+", type=float, default=[0.5],
                    help="sparsities timed with --batch_sizes (besides dense)")
    ap.add_argument("--replay", type=Path, default=None,
                    help="print the tables of an earlier run's --json (and, with --acceptance, "
                         "its modelled speculative decoding) without timing anything")
    ap.add_argument("--speculate", action="store_true",
                    help="also time the verify step (k + 1 tokens, dense) for each "
                         "--speculate_k and model speculative tokens/s per timed draft row "
                         "with the acceptance measured on the real model (--acceptance)")
    ap.add_argument("--speculate_k", nargs="+", type=int, default=[2, 3, 4, 5, 6],
                    help="proposals per verify step for --speculate")
    ap.add_argument("--verify_sparsities", nargs="+", type=float, default=[0.0],
                    help="--speculate: verifier sparsities timed (0: dense, the lossless "
                         "verifier of the dense model)")
    ap.add_argument("--acceptance", type=Path, default=None,
                    help="scripts/speculative_acceptance.py JSON (tokens per verify step per "
                         "draft, sparsity and k) for --speculate's modelled tokens/s")
    args = ap.parse_args(argv)
    if args.prompt is not None and args.checkpoint is None:
        raise SystemExit("error: --prompt needs --checkpoint (the real model whose tokenizer "
                         "encodes it)")
    if (args.batch_sizes and min(args.batch_sizes) < 1) or min(args.speculate_k) < 1:
        ap.error("--batch_sizes and --speculate_k must be >= 1")
    if not all(0.0 <= s < 1.0 for s in args.verify_sparsities):
        ap.error("--verify_sparsities must be in [0, 1)")
    acceptance = load_acceptance(args.acceptance) if args.acceptance else {}
    if args.replay is not None:
        try:
            data = json.loads(args.replay.read_text())
            rows = [r for r in data["rows"] if r.get("kind") != "speculative_model"]
            quant = data["args"]["quant"]
            groupsize = data["args"].get("groupsize", 128)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --replay {args.replay}: not a bench_decode.py JSON ({e})")
        print_table(rows, quant)
        print_extra(rows)
        if acceptance:
            print_speculative(rows + speculative_model(rows, acceptance, groupsize))
        return
    from teal.cli import check_device
    try:
        check_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    args.quant = list(dict.fromkeys(args.quant))
    on_cuda = torch.device(args.device).type == "cuda"
    if "int4" in args.quant and on_cuda and args.dtype != "bfloat16":
        ap.error("--quant int4: torch's int4 baseline (tinygemm) runs bfloat16 only; use --dtype bfloat16")
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
    per_target = len(args.quant) * (1 + len(args.sparsities))
    if args.compile:  # one compiled graph per configuration (and model); never fall back
        _gemv._set_recompile_limit(max(8, 2 * per_target * len(targets)))
    with tqdm(total=len(targets) * per_target, desc="decode bench") as bar:
        for name in targets:
            bench_model(name, args, args.device, dtype, policy, bar, rows, save)
    print_table(rows, args.quant)
    print_extra(rows)
    if args.speculate and acceptance:
        rows.extend(speculative_model(rows, acceptance, args.groupsize))
        print_speculative(rows)
    save()


def print_extra(rows: list) -> None:
    """The batch and verify rows, if any."""
    batch = [r for r in rows if r.get("kind") == "batch"]
    if batch:
        print(f"\n{'model':18s} {'batch':>5s} {'config':>6s} {'tok/s/seq':>10s} {'aggregate':>10s}")
        for r in batch:
            print(f"{r['model']:18s} {r['batch_size']:5d} {r['config']:>6s} "
                  f"{r['tokens_per_s_per_sequence']:10.1f} {r['tokens_per_s']:10.1f}")
    for r in (r for r in rows if r.get("kind") == "verify"):
        print(f"{r['model']:18s} verify step k={r['k']} ({r['k'] + 1} tokens, "
              f"{r.get('config', 'dense')}): {r['verify_ms']:.3f} ms")


def print_speculative(rows: list) -> None:
    """Modelled speculative decoding: best k per draft, and the best overall."""
    spec = [r for r in rows if r.get("kind") == "speculative_model"]
    if not spec:
        print("\n(no draft row matches the --acceptance file's drafts and sparsities)")
        return
    print(f"\n{'model':18s} {'draft':>10s} {'sparsity':>8s} {'k':>2s} {'draft ms':>8s} "
          f"{'verify ms':>9s} {'tok/step':>8s} {'model tok/s':>11s} {'x dense':>7s}")
    for r in spec:
        print(f"{r['model']:18s} {r['draft']:>10s} {r['draft_sparsity']:>8.0%} {r['k']:>2d} "
              f"{r['draft_ms']:8.3f} {r['verify_ms']:9.3f} {r['tokens_per_step']:8.2f} "
              f"{r['modelled_tokens_per_s']:11.1f} {r['speedup_vs_dense']:7.2f}")
    best = max(spec, key=lambda r: r["speedup_vs_dense"])
    print(f"best: {best['model']} draft {best['draft']} at {best['draft_sparsity']:.0%}, "
          f"k={best['k']}: {best['modelled_tokens_per_s']:.1f} tokens/s modelled, "
          f"{best['speedup_vs_dense']:.2f}x dense (acceptance measured on the real default "
          f"model, step times on these random weights)")


if __name__ == "__main__":
    main()
