"""Perplexity of a (TEAL-sparsified) model on a text file, plus measured effective sparsity.

    python perplexity.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth \
        --text ../shared/data/wikitext-2-raw-test.txt --sparsity 0 0.25 0.5 \
        [--allocation uniform greedy] [--scoring magnitude weight] [--max_tokens 32768]

The text is tokenized once (no BOS) and scored as exp(mean NLL) over every predicted token,
in windows of `--seq_len` tokens that overlap by one (each window starts with the last token
of the one before, as context): every token after the first is predicted exactly once
(`teal.evaluation.scoring_windows`). With `--start_token S` the token before S is carried in
as context, so S itself is predicted and consecutive runs add up to one run exactly. Sparse configurations sparsify every
token's projections (the teacher-forced equivalent of generating every token sparsely, KV
cache included). Each (sparsity, allocation, scoring) combination is evaluated on the same
windows with one loaded model; a sparsity of 0 is the dense baseline (evaluated once).
For each sparse row the measured effective sparsity per projection type and the
parameter-weighted model-level sparsity on the evaluated text are printed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from teal.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
DEFAULT_CALIB_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"
# fp16 is not offered: calibration and scoring statistics need the fp32/bf16 range
DTYPE_CHOICES = ("bfloat16", "float32")


def parse_args(argv=None) -> argparse.Namespace:
    from teal.checkpoint import DEFAULT_CHECKPOINT, default_thresholds, greedy_beside
    from teal.cli import HelpFormatter, add_sweep_arguments
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="model.pth to evaluate")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="evaluation text")
    add_sweep_arguments(p, [0.0], "model-level target sparsities in [0, 1); 0 = dense",
                        DEFAULT_CALIB_TEXT)
    p.add_argument("--max_tokens", type=int, default=32768, help="tokens to score")
    p.add_argument("--start_token", type=int, default=0,
                   help="skip this many tokens first; the token before is carried in as "
                        "context, so runs over consecutive ranges merge exactly from their "
                        "nll_sum/predicted (1 + k*(seq_len-1) keeps the windows of a full run)")
    p.add_argument("--seq_len", type=int, default=2048,
                   help="window length; windows overlap by one token")
    p.add_argument("--report_tokens", type=int, nargs="*", default=[],
                   help="also report perplexity and sparsity of these prefixes from the same "
                        "run (token counts at which a window ends: 1 + k*(seq_len-1) from "
                        "token 0, k*(seq_len-1) from a --start_token > 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="dtype the model is evaluated in")
    p.add_argument("--output", type=Path, default=None,
                   help="also write the results as JSON to this file (default: not written)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.seq_len < 2:
        p.error(f"--seq_len must be >= 2 (a window predicts all but its first token), "
                f"got {args.seq_len}")
    if args.max_tokens < 2:
        p.error(f"--max_tokens must be >= 2 (perplexity needs a token to predict), "
                f"got {args.max_tokens}")
    if args.start_token < 0:
        p.error(f"--start_token must be >= 0, got {args.start_token}")
    if args.calib_tokens < 1:
        p.error(f"--calib_tokens must be >= 1, got {args.calib_tokens}")
    if any(t < 1 for t in args.report_tokens):
        p.error(f"--report_tokens must be >= 1, got {args.report_tokens}")
    if args.thresholds is None:
        args.thresholds = default_thresholds(args.checkpoint_path)
    if args.greedy is None:
        args.greedy = greedy_beside(args.thresholds)
    if args.tuned is None:
        args.tuned = greedy_beside(args.thresholds, kind="tuned")
    return args


def configurations(args) -> list[tuple[float, str, str, str]]:
    """(sparsity, allocation, scoring, calibration) rows; sparsity 0 (dense) appears once,
    first."""
    from teal.allocation import sweep_configurations
    return sweep_configurations(args.sparsity, args.allocation, args.scoring, args.calibration)


def check_paths(args) -> None:
    """Cheap checks of the device and of the input/output paths, before the model is loaded
    (one-line errors)."""
    from teal.cli import check_device
    check_device(args.device)
    from teal.calibration import check_text_file
    from teal.paths import check_output_file
    check_text_file(args.text)
    if args.output is not None:
        check_output_file(args.output, "--output")


def run(args) -> list[dict]:
    import teal
    from teal.allocation import apply_configuration, load_sweep_files
    from teal.calibration import load_token_ids
    from model import load_model
    from teal.dtypes import DTYPES
    from teal.evaluation import perplexity, scoring_windows, window_ends

    rows = configurations(args)
    model, meta = load_model(args.checkpoint_path, device=args.device, dtype=DTYPES[args.dtype])
    model.eval()
    calib, tables = load_sweep_files(model, rows, args.thresholds, args.greedy, args.tuned)
    all_ids = load_token_ids(args.text, args.checkpoint_path, meta)
    ids = all_ids[args.start_token:]
    # the token before --start_token is context: token start_token itself is predicted too
    context = all_ids[args.start_token - 1:args.start_token] if args.start_token > 0 else None
    n = min(ids.numel(), args.max_tokens)
    if n < (1 if context is not None else 2):
        raise ValueError(f"{args.text} has {all_ids.numel()} tokens, {ids.numel()} after "
                         f"--start_token {args.start_token}; nothing to predict (lower "
                         f"--start_token or use a longer text)")
    seq_len = min(args.seq_len, model.config.block_size)
    ends = window_ends(n, seq_len, context is not None)
    bad = [t for t in args.report_tokens if t not in ends and t < n]
    if bad:
        raise ValueError(f"--report_tokens {bad} do not end a window (windows of {seq_len} "
                         f"overlapping by one end at {ends[:4]}...); pick from those")
    n_win = len(scoring_windows(ids, seq_len, n, context))
    print(f"{args.text}: tokens {args.start_token}..{args.start_token + n} "
          f"({n - (context is None)} predicted), {n_win} windows of {seq_len} overlapping by "
          f"one, {args.dtype} on {args.device}", flush=True)
    calib_ids = None
    if "sequential" in args.calibration and any(row[0] > 0 for row in rows):
        calib_ids = load_token_ids(args.calib_text, args.checkpoint_path, meta)
    results = []
    for s, alloc, scoring, calibration in rows:
        apply_configuration(model, (s, alloc, scoring, calibration), calib, tables, calib_ids,
                            seq_len=seq_len, calib_tokens=args.calib_tokens,
                            progress=not args.quiet)
        if s == 0.0:
            teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
        else:
            teal.configure(model, sparsify_prefill=True, track=True)
        row = dict(sparsity=s, allocation=alloc, scoring=scoring, calibration=calibration,
                   start_token=args.start_token, tokens=n, prefixes=[])

        def on_window(done, nll, count, row=row, sparse=s > 0):
            row.update(nll_sum=nll, predicted=count)
            if done in args.report_tokens and done < n:
                prefix = dict(tokens=done, perplexity=math.exp(nll / count), nll_sum=nll,
                              predicted=count)
                row["prefixes"].append(_measure(model, sparse, prefix))
        row["perplexity"] = perplexity(model, ids, seq_len, max_tokens=n, context=context,
                                       progress=not args.quiet, on_window=on_window,
                                       desc=f"{alloc} {scoring} {calibration} {s:.2f}")
        _measure(model, s > 0, row)
        for rec in row["prefixes"] + [row]:
            print(_format_row(row, rec), flush=True)
        results.append(row)
        if args.output is not None:  # after every row: a long run keeps what it measured
            _write_json(args, seq_len, results)
    teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
    return results


def _measure(model, sparse: bool, rec: dict) -> dict:
    """Add the measured effective sparsity (per type, parameter-weighted) to `rec`."""
    from teal.evaluation import effective_sparsity, parameter_weighted_sparsity
    if sparse:
        rec.update(effective=effective_sparsity(model),
                   model_sparsity=parameter_weighted_sparsity(model))
    return rec


def _format_row(row: dict, rec: dict) -> str:
    from teal.evaluation import format_sparsity
    line = (f"{row['allocation']:>8} {row['scoring']:>9} {row['calibration']:>10} "
            f"target {row['sparsity']:.2f} "
            f"[{rec['tokens']} tokens]: perplexity {rec['perplexity']:.3f}")
    if "effective" in rec:
        line += (f" | measured model-level (param-weighted) {rec['model_sparsity']:.3f}"
                 f" | per type: {format_sparsity(rec['effective'])}")
    return line


def _write_json(args, seq_len: int, results: list) -> None:
    atomic_write_json(args.output, dict(checkpoint=str(args.checkpoint_path), text=str(args.text),
                                        thresholds=str(args.thresholds), seq_len=seq_len,
                                        windows="overlapping by one token (every token after "
                                                "the first predicted once)",
                                        dtype=args.dtype, results=results))


def main(argv=None) -> int:
    from teal.calibration import TextTooShortError
    from teal.checkpoint import CheckpointError
    from teal.thresholds import ThresholdsError

    from teal.cli import run_reporting_errors

    args = parse_args(argv)
    # rows already scored stay in --output (written after every row): not "nothing written"
    return run_reporting_errors(
        lambda: (check_paths(args), run(args)),
        (CheckpointError, ThresholdsError, TextTooShortError, OSError, ValueError),
        interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
