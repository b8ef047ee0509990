"""Generation quality of TEAL-sparse decoding, judged against the dense model (GPT-Fast-style CLI).

    python evaluate_generation.py --sparsity 0.25 0.5 --limit 20
    python evaluate_generation.py --sparsity 0.5 --allocation uniform greedy --json gen.json \
        --show sea_poem

Every prompt of `--prompts` (JSON lines: id, kind chat|plain, domain, text; chat prompts are
wrapped in the checkpoint's chat template, as generate.py does) gets a greedy continuation of
up to `--max_new_tokens` tokens (stopping after an end token) under the dense model (always
run, first: the reference) and under each (sparsity, allocation, scoring, calibration)
combination. The prompt is prefilled densely and every decoded token runs sparse. Columns:
the dense model's perplexity of the continuation given the prompt (mean over prompts), the
fraction of the continuation's 4-grams seen earlier in it, the tokens until the first
divergence from the dense continuation, and the measured parameter-weighted sparsity of the
projection inputs of the generated tokens (teal.generation_eval).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_PROMPTS = REPO_ROOT / "prompts" / "generation.jsonl"
DEFAULT_CALIB_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"
DTYPE_CHOICES = ("bfloat16", "float32")


def parse_args(argv=None) -> argparse.Namespace:
    from teal.checkpoint import DEFAULT_CHECKPOINT, default_thresholds, greedy_beside
    from teal.cli import HelpFormatter, add_sweep_arguments
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="model.pth to evaluate")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                   help="prompt file, JSON lines {id, kind: chat|plain, domain, text} "
                        "(default: prompts/generation.jsonl)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N prompts (default: all)")
    add_sweep_arguments(p, [0.5], "model-level target sparsities in [0, 1); the dense model "
                        "(0) always runs first as the reference", DEFAULT_CALIB_TEXT)
    p.add_argument("--max_new_tokens", type=int, default=128,
                   help="new tokens per continuation (fewer when an end token stops it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="dtype the model runs in")
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write every configuration's metrics and continuations as JSON "
                        "to this file (default: not written)")
    p.add_argument("--show", default=None, metavar="ID",
                   help="print the continuations of the prompt with this id under every "
                        "configuration (default: none shown)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.calib_tokens < 1:
        p.error(f"--calib_tokens must be >= 1, got {args.calib_tokens}")
    if args.thresholds is None:
        args.thresholds = default_thresholds(args.checkpoint_path)
    if args.greedy is None:
        args.greedy = greedy_beside(args.thresholds)
    if args.tuned is None:
        args.tuned = greedy_beside(args.thresholds, kind="tuned")
    return args


def label(row: tuple) -> str:
    s, alloc, scoring, calibration = row
    return "dense" if s == 0.0 else f"{s:.2f} {alloc} {scoring} {calibration}"


def _load_tokenizer(checkpoint_path, meta: dict):
    from teal.tokenizer import load_tokenizer
    try:
        return load_tokenizer(Path(checkpoint_path).parent, meta)
    except Exception as e:  # noqa: BLE001 - any tokenizer-library failure is a bad file
        raise ValueError(f"cannot load the tokenizer next to {checkpoint_path} ({e}); convert "
                         f"the model again") from None


def run(args) -> list[dict]:
    from tqdm import tqdm

    from model import load_model
    from teal.allocation import apply_configuration, load_sweep_files, sweep_configurations
    from teal.calibration import load_token_ids
    from teal.cli import check_device
    from teal.dtypes import DTYPES
    from teal.generation import check_generation_length
    from teal.generation_eval import (encode_prompt, load_prompts, run_configuration,
                                      score_configuration, summarize)
    from teal.paths import check_output_file

    check_device(args.device)
    prompts = load_prompts(args.prompts)[:args.limit]
    if args.show is not None and args.show not in {p.id for p in prompts}:
        raise ValueError(f"--show {args.show}: no such prompt id among the "
                         f"{len(prompts)} prompts used (of {args.prompts})")
    if args.json is not None:
        check_output_file(args.json, "--json")
    rows = sweep_configurations(args.sparsity, args.allocation, args.scoring, args.calibration,
                                dense=True)
    model, meta = load_model(args.checkpoint_path, device=args.device, dtype=DTYPES[args.dtype])
    model.eval()
    tokenizer = _load_tokenizer(args.checkpoint_path, meta)
    if tokenizer.chat_template is None and any(p.kind == "chat" for p in prompts):
        print("note: the checkpoint has no chat template; chat prompts are used as plain text",
              file=sys.stderr)
    stop_ids = set(tokenizer.eos_ids) - {None}
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    for p, ids in zip(prompts, prompt_ids):
        try:
            check_generation_length(model, len(ids), args.max_new_tokens)
        except ValueError as e:
            raise ValueError(f"prompt {p.id!r}: {e}") from None
    calib, tables = load_sweep_files(model, rows, args.thresholds, args.greedy, args.tuned)
    calib_ids = None
    seq_len = min(2048, model.config.block_size)
    if any(row[0] > 0 and row[3] == "sequential" for row in rows):
        calib_ids = load_token_ids(args.calib_text, args.checkpoint_path, meta)
    print(f"{len(prompts)} prompts of {args.prompts}, up to {args.max_new_tokens} new tokens "
          f"(greedy), {len(rows)} configurations, {args.dtype} on {args.device}",
          file=sys.stderr, flush=True)

    results, dense = [], None
    for row in rows:
        apply_configuration(model, row, calib, tables, calib_ids, seq_len=seq_len,
                            calib_tokens=args.calib_tokens, progress=not args.quiet)
        with tqdm(total=len(prompts), desc=label(row), unit="prompt", disable=args.quiet,
                  leave=False, file=sys.stderr) as bar:
            conts, measured = run_configuration(model, prompt_ids, args.max_new_tokens, stop_ids,
                                                sparse=row[0] > 0, progress=bar.update)
        if dense is None:
            dense = conts
        per_prompt = score_configuration(model, prompt_ids, conts, dense)
        for p, rec, (ids, stopped) in zip(prompts, per_prompt, conts):
            shown = ids[:-1] if stopped else ids
            rec.update(id=p.id, kind=p.kind, domain=p.domain, text=tokenizer.decode(shown))
        s, alloc, scoring, calibration = row
        results.append(dict(config=label(row), sparsity=s, allocation=alloc, scoring=scoring,
                            calibration=calibration,
                            measured_sparsity=0.0 if s == 0.0 else measured,
                            **summarize(per_prompt), prompts=per_prompt))
        if args.json is not None:  # after every configuration: a long run keeps what it did
            _write_json(args, results, len(prompts))
    import teal
    teal.configure(model, sparse=False, sparsify_prefill=False, track=False)
    print(format_table(results, args.max_new_tokens))
    if args.show is not None:
        print(format_show(results, args.show))
    return results


def format_table(results: list[dict], max_new_tokens: int) -> str:
    head = (f"{'config':<36} {'dense ppl':>10} {'rep-4gram':>10} {'agree tok':>10} "
            f"{'new tok':>8} {'sparsity':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        ms = r["measured_sparsity"]
        lines.append(f"{r['config']:<36} {r['mean_dense_perplexity']:>10.3f} "
                     f"{r['mean_repeated_ngram_rate']:>10.3f} {r['mean_agreement']:>10.1f} "
                     f"{r['mean_new_tokens']:>8.1f} {'-' if ms is None else f'{ms:.3f}':>9}")
    lines.append(f"(means over prompts; dense ppl: the dense model's perplexity of each "
                 f"continuation; agree tok: tokens until the first divergence from dense, "
                 f"of up to {max_new_tokens})")
    return "\n".join(lines)


def format_show(results: list[dict], prompt_id: str) -> str:
    out = []
    for r in results:
        rec = next(p for p in r["prompts"] if p["id"] == prompt_id)
        out.append(f"=== {prompt_id} | {r['config']} | {rec['new_tokens']} tokens"
                   f"{', stopped' if rec['stopped'] else ''}, agreement {rec['agreement']}, "
                   f"dense ppl {rec['dense_perplexity']:.3f}\n{rec['text']}")
    return "\n".join(out)


def _write_json(args, results: list, n_prompts: int) -> None:
    from teal.io import atomic_write_json
    atomic_write_json(args.json, dict(checkpoint=str(args.checkpoint_path),
                                      prompts=str(args.prompts), n_prompts=n_prompts,
                                      thresholds=str(args.thresholds),
                                      max_new_tokens=args.max_new_tokens, decoding="greedy",
                                      dtype=args.dtype, device=args.device, results=results))


def main(argv=None) -> int:
    from teal.calibration import TextTooShortError
    from teal.checkpoint import CheckpointError
    from teal.cli import run_reporting_errors
    from teal.thresholds import ThresholdsError

    args = parse_args(argv)
    return run_reporting_errors(lambda: run(args),
                                (CheckpointError, ThresholdsError, TextTooShortError, OSError,
                                 ValueError), interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
