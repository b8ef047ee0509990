"""Calibrate TEAL thresholds: histograms of every projection input over a calibration text.

    python calibrate.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth \
        --text ../shared/data/wikitext-2-valid-tokenized.txt [--max_tokens 32768] [--greedy]

Writes `thresholds.safetensors` next to the checkpoint (or `--output`): histograms of |x| of
the four distinct projection inputs per block plus the weight-informed score histograms
(see `teal.calibration`), with metadata (model config, layer count, token count, text path +
sha256). One file serves every sparsity level. `--greedy` then runs TEAL's block-wise greedy
allocation (`teal.greedy`) and writes `greedy.json` next to the thresholds; `--greedy-only`
runs just that step from an existing thresholds file. Every output is written atomically at
the end, so an interrupted run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"
# fp16 is not offered: calibration and scoring statistics need the fp32/bf16 range
DTYPE_CHOICES = ("bfloat16", "float32")
# Greedy search size (tokens, window length, compared positions per window).  On a GPU the
# larger search costs ~1 min for SmolLM2-135M and gave the better allocation at 50% (README:
# 30.43 vs 31.50 perplexity); on a CPU it would take hours, so CPU runs default to the smaller
# one (~20 min).
GREEDY_CUDA = (16384, 2048, 256)
GREEDY_CPU = (4096, 512, 32)


def parse_args(argv=None) -> argparse.Namespace:
    from teal.checkpoint import DEFAULT_CHECKPOINT, default_thresholds, greedy_beside
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="model.pth to calibrate")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                   help="calibration text (never the evaluation text)")
    p.add_argument("--max_tokens", type=int, default=32768, help="tokens to calibrate on")
    p.add_argument("--min_tokens", type=int, default=None,
                   help="fail if the text has fewer tokens (default: one window, seq_len)")
    p.add_argument("--seq_len", type=int, default=2048, help="window length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="dtype the model runs in while its activations are measured")
    p.add_argument("--output", type=Path, default=None,
                   help="thresholds file (default: thresholds.safetensors next to the checkpoint, "
                        "thresholds.<format>.safetensors for a quantized one)")
    p.add_argument("--no-weighted", dest="weighted", action="store_false",
                   help="skip the weight-informed (WINA) score histograms (default: they are "
                        "collected)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true",
                   help="also run the block-wise greedy allocation (writes greedy.json)")
    g.add_argument("--greedy-only", dest="greedy_only", action="store_true",
                   help="only run the greedy allocation from an existing thresholds file")
    p.add_argument("--greedy-tokens", dest="greedy_tokens", type=int, default=None,
                   help="calibration tokens whose block outputs the greedy search compares "
                        f"(default: {GREEDY_CUDA[0]} on CUDA, {GREEDY_CPU[0]} on CPU)")
    p.add_argument("--greedy-seq-len", dest="greedy_seq_len", type=int, default=None,
                   help="window length of the greedy search's token windows "
                        f"(default: {GREEDY_CUDA[1]} on CUDA, {GREEDY_CPU[1]} on CPU)")
    p.add_argument("--greedy-positions", dest="greedy_positions", type=int, default=None,
                   help="positions per window at which block outputs are compared "
                        f"(default: {GREEDY_CUDA[2]} on CUDA, {GREEDY_CPU[2]} on CPU)")
    p.add_argument("--greedy-step", dest="greedy_step", type=float, default=0.01,
                   help="block sparsity (parameter-weighted) added per greedy step")
    p.add_argument("--greedy-scoring", dest="greedy_scoring", nargs="+",
                   choices=["magnitude", "weight"], default=["magnitude", "weight"],
                   help="scorings the greedy search allocates for")
    p.add_argument("--greedy-output", dest="greedy_output", type=Path, default=None,
                   help="greedy allocation file (default: greedy.json next to the thresholds)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--tune", action="store_true",
                   help="also tune per-block sparsity budgets end to end on validation text "
                        "after the calibration tokens (teal.budgets; writes tuned.json; mixes in "
                        "greedy.json's within-block split when it exists)")
    t.add_argument("--tune-only", dest="tune_only", action="store_true",
                   help="only tune the budgets from existing thresholds (and greedy.json)")
    p.add_argument("--tune-targets", dest="tune_targets", type=float, nargs="+",
                   default=[0.25, 0.4, 0.5], help="model-level sparsities to tune budgets for")
    p.add_argument("--tune-objective", dest="tune_objective", choices=["nll", "kl"],
                   default="nll", help="what the tuning minimises: log perplexity (nll) or the "
                   "KL divergence to the dense model (kl)")
    p.add_argument("--tune-tokens", dest="tune_tokens", type=int, default=16384,
                   help="validation tokens the tuning objective is measured on, taken after the "
                        "calibration tokens")
    p.add_argument("--tune-rounds", dest="tune_rounds", type=int, default=3,
                   help="improvement rounds per target")
    p.add_argument("--tune-output", dest="tune_output", type=Path, default=None,
                   help="tuned allocation file (default: tuned.json next to the thresholds)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.greedy_only and args.tune_only:
        p.error("--greedy-only and --tune-only exclude each other; pass --greedy-only --tune "
                "to run both from an existing thresholds file")
    for target in args.tune_targets:
        if not 0.0 < target < 1.0:
            p.error(f"--tune-targets must be in (0, 1), got {target}")
    if args.tune_rounds < 1:
        p.error(f"--tune-rounds must be >= 1, got {args.tune_rounds}")
    sizes = GREEDY_CUDA if str(args.device).startswith("cuda") else GREEDY_CPU
    seq_len_given = args.greedy_seq_len is not None
    for name, default in zip(("greedy_tokens", "greedy_seq_len", "greedy_positions"), sizes):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if (args.greedy_tokens is not None and args.greedy_tokens >= 1
            and args.greedy_seq_len > args.greedy_tokens):
        if seq_len_given:
            p.error(f"--greedy-tokens ({args.greedy_tokens}) must be at least --greedy-seq-len "
                    f"({args.greedy_seq_len}): the search compares whole windows")
        args.greedy_seq_len = args.greedy_tokens  # fewer tokens than one default window
    for flag, value in (("--max_tokens", args.max_tokens), ("--seq_len", args.seq_len),
                        ("--min_tokens", args.min_tokens), ("--greedy-tokens", args.greedy_tokens),
                        ("--greedy-seq-len", args.greedy_seq_len),
                        ("--greedy-positions", args.greedy_positions),
                        ("--tune-tokens", args.tune_tokens)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if not 0.0 < args.greedy_step < 1.0:
        p.error(f"--greedy-step must be in (0, 1), got {args.greedy_step}")
    if args.output is None:
        args.output = default_thresholds(args.checkpoint_path, for_writing=True)
    if args.greedy_output is None:
        args.greedy_output = greedy_beside(args.output, for_writing=True)
    if args.tune_output is None:
        args.tune_output = greedy_beside(args.output, for_writing=True, kind="tuned")
    if args.min_tokens is None:
        args.min_tokens = min(args.seq_len, args.max_tokens)
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Cheap checks of the device and of the input/output paths, before the model is loaded
    (one-line errors)."""
    from teal.cli import check_device
    check_device(args.device)
    from teal.calibration import check_text_file
    from teal.paths import check_output_file
    check_text_file(args.text)
    if not (args.greedy_only or args.tune_only):
        check_output_file(args.output, "--output")
    if args.greedy or args.greedy_only:
        check_output_file(args.greedy_output, "--greedy-output")
    if args.tune or args.tune_only:
        check_output_file(args.tune_output, "--tune-output")


def run(args: argparse.Namespace) -> None:
    from teal.calibration import check_enough_tokens, collect_histograms, load_token_ids, source_meta
    from model import load_model
    from teal.dtypes import DTYPES
    from teal.thresholds import Calibration

    model, meta = load_model(args.checkpoint_path, device=args.device, dtype=DTYPES[args.dtype])
    model.eval()
    block = model.config.block_size
    for flag, value in (("--seq_len", args.seq_len), ("--greedy-seq-len", args.greedy_seq_len)):
        if value > block and (flag == "--seq_len" or args.greedy or args.greedy_only):
            raise ValueError(f"{flag} {value} exceeds the model's context length {block}; pass "
                             f"{flag} {min(2048, block)} or less")
    existing = args.greedy_only or args.tune_only
    if not existing:  # the file's size is known: a full disk fails now, not at the end
        from teal.io import check_free_space
        from teal.projections import INPUTS, PROJECTIONS
        n_hist = len(INPUTS) + (len(PROJECTIONS) if args.weighted else 0)
        check_free_space(args.output, model.config.n_layer * n_hist * 8192 * 8 + (1 << 20))
    ids = load_token_ids(args.text, args.checkpoint_path, meta)
    progress = not args.quiet
    if existing:
        calib = Calibration.load(args.output, model.config.to_dict())
    else:
        check_enough_tokens(ids.numel(), args.min_tokens, "calibration", args.text)
        n = min(ids.numel(), args.max_tokens)
        calib = collect_histograms(
            model, ids, args.seq_len, max_tokens=args.max_tokens, weighted=args.weighted,
            progress=progress, text_meta=source_meta(args.text, n))
        calib.meta.setdefault("extra", {}).update(
            checkpoint=str(args.checkpoint_path), model_name=meta.get("name"),
            seq_len=args.seq_len, dtype=args.dtype)
        for layer, name in calib.zero_inputs():
            print(f"warning: layer {layer} {name} is all zero on the calibration text; its "
                  f"projections get threshold 0 (only exact zeros dropped) at every sparsity",
                  file=sys.stderr)
        calib.save(args.output)  # atomic; nothing was written before this point
        print(f"wrote {args.output} ({calib.meta['tokens']} tokens, {calib.hist.shape[0]} layers)")
    if args.greedy or args.greedy_only:
        from teal.greedy import greedy_search
        check_enough_tokens(ids.numel(), min(args.greedy_tokens, args.greedy_seq_len),
                            "the greedy search", args.text)
        result = greedy_search(
            model, calib, ids, n_tokens=args.greedy_tokens, seq_len=args.greedy_seq_len,
            positions=args.greedy_positions, step=args.greedy_step,
            scorings=args.greedy_scoring, progress=progress,
            source=dict(thresholds=str(args.output), text=calib.meta.get("text")))
        result.save(args.greedy_output)  # atomic, like the thresholds file
        print(f"wrote {args.greedy_output} (scorings: {', '.join(args.greedy_scoring)})")
    if args.tune or args.tune_only:
        tune(args, model, calib, ids, progress)


def tune(args, model, calib, ids, progress: bool) -> None:
    """The per-block budget tuning step (teal.budgets): validation tokens after the
    calibration's, greedy.json's split tried when it exists; writes --tune-output."""
    from teal.budgets import tune_budgets
    from teal.greedy import GreedyAllocation
    greedy = None
    if args.greedy_output.exists():
        greedy = GreedyAllocation.load(args.greedy_output)
        greedy.check_model(model.config.to_dict(), args.greedy_output)
        top = max(greedy.targets("magnitude"))
        if max(args.tune_targets) > top:
            raise ValueError(f"--tune-targets {max(args.tune_targets)} is beyond the greedy "
                             f"grid of {args.greedy_output} (max {top}); lower it")
    offset = int(calib.meta.get("tokens", 0))
    seq_len = min(args.seq_len, args.tune_tokens, model.config.block_size)
    result = tune_budgets(
        model, calib, ids, args.tune_targets, offset=offset, n_tokens=args.tune_tokens,
        seq_len=seq_len, greedy=greedy, objective=args.tune_objective,
        rounds=args.tune_rounds, progress=progress,
        source=dict(thresholds=str(args.output), text=calib.meta.get("text"),
                    greedy=str(args.greedy_output) if greedy is not None else None))
    result.save(args.tune_output)
    summary = ", ".join(f"{float(k):.0%}: {v['objective']:.4f} (uniform {v['uniform_objective']:.4f})"
                        for k, v in result.meta["tuning"].items())
    print(f"wrote {args.tune_output} ({args.tune_objective} per token, tuned vs uniform TEAL: "
          f"{summary})")


def main(argv=None) -> int:
    from teal.calibration import TextFileError, TextTooShortError
    from teal.checkpoint import CheckpointError
    from teal.greedy import AllocationError
    from teal.paths import OutputPathError
    from teal.thresholds import ThresholdsError

    from teal.cli import run_reporting_errors

    args = parse_args(argv)
    return run_reporting_errors(
        lambda: (check_paths(args), run(args)),
        (CheckpointError, ThresholdsError, TextTooShortError, TextFileError, OutputPathError,
         AllocationError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
