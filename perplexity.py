"""Perplexity of a (TEAL-sparsified) model on a text file, plus measured effective sparsity.

    python perplexity.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth \
        --text ../shared/data/wikitext-2-raw-test.txt --sparsity 0 0.25 0.5 \
        [--allocation uniform greedy] [--scoring magnitude weight] [--max_tokens 32768]

The text is tokenized once (no BOS), cut into non-overlapping windows of `--seq_len` tokens,
and scored as exp(mean NLL) over every predicted token. Sparse configurations sparsify every
token's projections (the teacher-forced equivalent of generating every token sparsely, KV
cache included). Each (sparsity, allocation, scoring) combination is evaluated on the same
windows with one loaded model; a sparsity of 0 is the dense baseline (evaluated once).
For each sparse row the measured effective sparsity per projection type and the
parameter-weighted model-level sparsity on the evaluated text are printed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sparsity(value: str) -> float:
    s = float(value)
    if not 0.0 <= s < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {value}")
    return s


def parse_args(argv=None) -> argparse.Namespace:
    from teal.allocation import ALLOCATIONS, SCORINGS
    from teal.checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="evaluation text")
    p.add_argument("--sparsity", type=_sparsity, nargs="+", default=[0.0],
                   help="model-level target sparsities in [0, 1); 0 = dense")
    p.add_argument("--allocation", nargs="+", choices=ALLOCATIONS, default=["uniform"])
    p.add_argument("--scoring", nargs="+", choices=SCORINGS, default=["magnitude"])
    p.add_argument("--max_tokens", type=int, default=32768, help="tokens to score")
    p.add_argument("--seq_len", type=int, default=2048, help="window length")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="calibration file (default: thresholds.safetensors next to the checkpoint)")
    p.add_argument("--greedy", type=Path, default=None,
                   help="greedy allocation file (default: greedy.json next to the thresholds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.thresholds is None:
        args.thresholds = args.checkpoint_path.parent / "thresholds.safetensors"
    if args.greedy is None:
        args.greedy = args.thresholds.parent / "greedy.json"
    return args


def configurations(args) -> list[tuple[float, str, str]]:
    """(sparsity, allocation, scoring) rows; sparsity 0 (dense) appears once, first."""
    rows = [(0.0, "dense", "-")] if 0.0 in args.sparsity else []
    for s, a, sc in itertools.product(sorted(set(args.sparsity) - {0.0}), args.allocation,
                                      args.scoring):
        rows.append((s, a, sc))
    return rows


def run(args) -> list[dict]:
    import teal
    from teal.allocation import apply_config
    from teal.calibration import load_token_ids
    from teal.checkpoint import load_model
    from teal.evaluation import (effective_sparsity, format_sparsity, parameter_weighted_sparsity,
                                 perplexity)
    from teal.thresholds import Calibration

    rows = configurations(args)
    model, meta = load_model(args.checkpoint_path, device=args.device, dtype=DTYPES[args.dtype])
    model.eval()
    calib = greedy = None
    if any(s > 0 for s, _, _ in rows):
        calib = Calibration.load(args.thresholds, model.config.to_dict())
        if "greedy" in args.allocation:
            from teal.greedy import GreedyAllocation
            greedy = GreedyAllocation.load(args.greedy)
            greedy.check_model(model.config.to_dict())
    ids = load_token_ids(args.text, args.checkpoint_path, meta)
    n = min(ids.numel(), args.max_tokens)
    if n < 2:
        raise ValueError(f"{args.text} has fewer than 2 tokens")
    seq_len = min(args.seq_len, model.config.block_size)
    print(f"{args.text}: {n} tokens, {-(-n // seq_len)} windows of {seq_len}, {args.dtype} "
          f"on {args.device}", flush=True)
    results = []
    for s, alloc, scoring in rows:
        if s == 0.0:
            teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
        else:
            apply_config(model, calib, s, allocation=alloc, scoring=scoring, greedy=greedy)
            teal.configure(model, sparsify_prefill=True, track=True)
        ppl = perplexity(model, ids, seq_len, max_tokens=n, progress=not args.quiet,
                         desc=f"{alloc} {scoring} {s:.2f}")
        row = dict(sparsity=s, allocation=alloc, scoring=scoring, perplexity=ppl, tokens=n)
        line = f"{alloc:>8} {scoring:>9} target {s:.2f}: perplexity {ppl:.3f}"
        if s > 0:
            eff = effective_sparsity(model)
            row.update(effective=eff, model_sparsity=parameter_weighted_sparsity(model))
            line += (f" | measured model-level (param-weighted) {row['model_sparsity']:.3f}"
                     f" | per type: {format_sparsity(eff)}")
        print(line, flush=True)
        results.append(row)
    teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
    if args.output is not None:
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(dict(checkpoint=str(args.checkpoint_path), text=str(args.text),
                                       seq_len=seq_len, dtype=args.dtype, results=results),
                                  indent=1))
        os.replace(tmp, args.output)
    return results


def main(argv=None) -> int:
    from teal.calibration import TextTooShortError
    from teal.checkpoint import CheckpointError
    from teal.thresholds import ThresholdsError

    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ThresholdsError, TextTooShortError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
