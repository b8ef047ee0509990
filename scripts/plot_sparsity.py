"""Plots of a greedy allocation and of perplexity vs sparsity (matplotlib, imported lazily).

    python scripts/plot_sparsity.py --greedy checkpoints/SmolLM2-135M-Instruct/greedy.json \
        --results results.json [more.json ...] --target 0.5 --out_dir docs

Writes into `--out_dir`:
- `greedy_allocation.png`: per-layer sparsity of each projection at `--target`, one panel per
  scoring method of the greedy file (uniform allocation would be a flat line at the target);
- `perplexity_vs_sparsity.png`: perplexity against the measured parameter-weighted sparsity
  for each (allocation, scoring) method in the `perplexity.py --output` JSON files, with the
  dense perplexity as a horizontal line.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from teal.io import atomic_write
from teal.projections import PROJECTIONS


def method(r: dict) -> tuple:
    """(allocation, scoring, calibration) of a result row ("dense" calibration if absent)."""
    return r["allocation"], r["scoring"], r.get("calibration", "dense" if r["sparsity"] else "-")


def merge_results(results: list[dict]) -> list[dict]:
    """Combine rows of the same (sparsity, allocation, scoring) measured on consecutive token
    ranges (`perplexity.py --start_token`): perplexity from the summed NLL and predicted-token
    counts, measured sparsities averaged weighted by tokens."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["sparsity"], *method(r)), []).append(r)
    merged = []
    for (s, alloc, sc, cal), rows in groups.items():
        rows = sorted(rows, key=lambda r: r.get("start_token", 0))
        if len(rows) == 1:
            merged.append(rows[0])
            continue
        tokens = sum(r["tokens"] for r in rows)
        out = dict(sparsity=s, allocation=alloc, scoring=sc, calibration=cal,
                   start_token=rows[0]["start_token"],
                   tokens=tokens, nll_sum=sum(r["nll_sum"] for r in rows),
                   predicted=sum(r["predicted"] for r in rows))
        out["perplexity"] = math.exp(out["nll_sum"] / out["predicted"])
        if s > 0:
            out["model_sparsity"] = sum(r["model_sparsity"] * r["tokens"] for r in rows) / tokens
            out["effective"] = {p: sum(r["effective"][p] * r["tokens"] for r in rows) / tokens
                                for p in rows[0]["effective"]}
        merged.append(out)
    return merged


def markdown_table(results: list[dict]) -> str:
    """Perplexity table: one row per method, one column per target sparsity."""
    dense = next((r for r in results if r["sparsity"] == 0.0), None)
    targets = sorted({r["sparsity"] for r in results if r["sparsity"] > 0})
    methods = sorted({method(r) for r in results if r["sparsity"] > 0},
                     key=lambda m: (m[2] != "dense", m[1], m[0]))
    head = "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |"
    lines = [head, "|" + "---|" * (len(targets) + 1)]
    if dense is not None:
        lines.append("| dense | " + " | ".join(f"{dense['perplexity']:.3f}" for _ in targets) + " |")
    for m in methods:
        cells = []
        for t in targets:
            r = next((r for r in results if r["sparsity"] == t and method(r) == m), None)
            cells.append("" if r is None else
                         f"{r['perplexity']:.3f} ({r['model_sparsity']:.1%})")
        lines.append(f"| {m[0]} {m[1]} ({m[2]} calib.) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT_HINT = ("scripts/plot_sparsity.py needs matplotlib, which teal-fast does not install by "
             "default: pip install -e \".[plot]\" (or pip install matplotlib)")


def pyplot():
    """matplotlib.pyplot on the Agg backend; SystemExit naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"error: {PLOT_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_allocation(greedy, target: float, path: Path) -> None:
    plt = pyplot()

    scorings = list(greedy.allocations)
    fig, axes = plt.subplots(1, len(scorings), figsize=(5.2 * len(scorings), 3.6), sharey=True,
                             squeeze=False)
    for ax, sc in zip(axes[0], scorings):
        rows = greedy.sparsities(sc, target)  # (n_layer, 7)
        layers = range(len(rows))
        for j, proj in enumerate(PROJECTIONS):
            ax.plot(layers, [r[j] for r in rows], marker=".", lw=1.2,
                    label=proj.removesuffix("_proj"))
        ax.axhline(target, color="k", ls=":", lw=1, label="uniform")
        ax.set_title(f"greedy, {sc} scoring, target {target:.0%}")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("sparsity")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path: Path) -> None:
    """fig as an image at `path` (format from its suffix), written atomically."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format=fmt))


def plot_perplexity(results: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    dense = [r["perplexity"] for r in results if r["sparsity"] == 0.0]
    methods = sorted({method(r) for r in results if r["sparsity"] > 0})
    for m in methods:
        pts = sorted((r["model_sparsity"], r["perplexity"]) for r in results
                     if method(r) == m and r["sparsity"] > 0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"{m[0]}, {m[1]}, {m[2]} calib.", ls="-" if m[2] == "sequential" else "--")
    if dense:
        ax.axhline(dense[0], color="k", ls=":", lw=1, label=f"dense ({dense[0]:.2f})")
    ax.set_xlabel("measured parameter-weighted sparsity")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> None:
    from teal.cli import HelpFormatter
    from teal.greedy import GreedyAllocation
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--greedy", type=Path,
                   default=Path("checkpoints/SmolLM2-135M-Instruct/greedy.json"),
                   help="greedy allocation file (calibrate.py --greedy) to plot")
    p.add_argument("--results", type=Path, nargs="*", default=[],
                   help="perplexity.py --output JSON files to plot (default: none, only the allocation)")
    p.add_argument("--target", type=float, default=0.5,
                   help="model-level sparsity whose greedy allocation is plotted per layer")
    p.add_argument("--out_dir", type=Path, default=Path("docs"), help="folder for the plots")
    args = p.parse_args(argv)
    if args.greedy.exists() or args.results:
        pyplot()  # before any work: a missing matplotlib is one line naming the extra
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.greedy.exists():
        out = args.out_dir / "greedy_allocation.png"
        plot_allocation(GreedyAllocation.load(args.greedy), args.target, out)
        print(f"wrote {out}")
    if args.results:
        results = merge_results([r for f in args.results
                                 for r in json.loads(f.read_text())["results"]])
        print(markdown_table(results))
        out = args.out_dir / "perplexity_vs_sparsity.png"
        plot_perplexity(results, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
