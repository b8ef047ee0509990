#!/usr/bin/env python
"""Side-by-side table of two sets of benchmark JSON files (e.g. an old commit and this one).

    python scripts/bench_compare.py --old old_gemv_1.json old_gemv_2.json --new gemv_1.json gemv_2.json
    python scripts/bench_compare.py --old old_decode.json --new decode.json --limit 0.02

Reads `scripts/bench_gemv.py --json` files (rows keyed by model, projection and target
sparsity; lower microseconds is better) or `scripts/bench_decode.py --json` files (rows
keyed by model and configuration; higher tokens/s is better); with several files per side,
each key's median is compared. Prints one line per key with both values and new/old, marks
the rows where the new side is slower than `--limit` (a fraction), and exits 1 if any is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _rows(path, d) -> tuple[str, list]:
    """(kind, [(key, value)]) of one loaded file. Raises SystemExit for another layout."""
    try:
        if isinstance(d, dict) and isinstance(d.get("bench"), list):
            return "gemv", [((str(r["model"]), str(r["name"]), f"{float(r['target_sparsity']):.2f}"),
                             float(r["us"])) for r in d["bench"]]
        if isinstance(d, dict) and isinstance(d.get("rows"), list):
            return "decode", [((str(r["model"]), str(r["config"])), float(r["tokens_per_s"]))
                              for r in d["rows"]]
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {path}: a row lacks {e} or is malformed; pass files written by "
                         f"scripts/bench_gemv.py --json or scripts/bench_decode.py --json") from None
    what = " (a --compare run without --bench: nothing to compare)" if isinstance(d, dict) and "compare" in d else ""
    raise SystemExit(f"error: {path} is neither a bench_gemv.py nor a bench_decode.py result{what}")


def load(paths) -> tuple[str, dict]:
    """(kind "gemv" or "decode", {key: [values, one per file]})."""
    kind, out = None, {}
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except OSError as e:
            raise SystemExit(f"error: cannot read {p} ({e.strerror}); pass an existing JSON file") from None
        except ValueError:
            raise SystemExit(f"error: {p} is not JSON; pass a file written by a benchmark's --json") from None
        k, rows = _rows(p, d)
        if kind not in (None, k):
            raise SystemExit(f"error: {p} is a {k} file, the others are {kind} files")
        kind = k
        for key, v in rows:
            if not v > 0:
                raise SystemExit(f"error: {p}: {' '.join(key)} has a non-positive value {v}")
            out.setdefault(key, []).append(v)
    return kind, out


def main(argv=None) -> int:
    from teal.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--old", nargs="+", required=True, help="JSON files of the baseline")
    ap.add_argument("--new", nargs="+", required=True, help="JSON files of the new code")
    ap.add_argument("--limit", type=float, default=0.02, help="tolerated slowdown, as a fraction of the baseline")
    args = ap.parse_args(argv)
    if not args.limit >= 0:
        ap.error(f"--limit must be >= 0, got {args.limit}")
    kind_old, old = load(args.old)
    kind_new, new = load(args.new)
    if kind_old != kind_new:
        raise SystemExit(f"error: --old holds {kind_old} files, --new {kind_new} files")
    unit = "us" if kind_old == "gemv" else "tok/s"
    slower = 0
    print(f"{'key':34s} {'old ' + unit:>10s} {'new ' + unit:>10s} {'new/old':>8s}")
    for key in sorted(set(old) & set(new)):
        o, n = statistics.median(old[key]), statistics.median(new[key])
        ratio = n / o
        worse = ratio > 1 + args.limit if kind_old == "gemv" else ratio < 1 - args.limit
        slower += worse
        print(f"{' '.join(key):34s} {o:10.2f} {n:10.2f} {ratio:8.3f}{'  SLOWER' if worse else ''}")
    missing = sorted(set(old) ^ set(new))
    if missing:
        print(f"(only on one side: {', '.join(' '.join(k) for k in missing)})")
    print(f"{slower} of {len(set(old) & set(new))} rows slower than the {args.limit:.0%} limit")
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
