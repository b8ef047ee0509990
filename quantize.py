"""Weight-only int8 / int4 quantization of a checkpoint for the TEAL sparse kernels.

    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth --mode int8
    python quantize.py --checkpoint_path ... --mode int4 --groupsize 128

Writes `model_int8.pth` or `model_int4-g<groupsize>.pth` next to the source checkpoint (or
`--output`): every projection (q/k/v, o, gate/up, down) as codes and scales (`teal.quant`:
int8 symmetric with one scale per output channel; int4 min/max per group of input channels,
two columns per byte, so a dropped input channel skips its bytes), optionally the output
head, and a "quantization" entry (mode, group size, head, the source's sha256, torch
version) that every CLI (generate.py, perplexity.py, calibrate.py, tp.py, the benchmarks)
reads; the file name means nothing to them. Calibrate the quantized model for its own TEAL
thresholds (`python calibrate.py --checkpoint_path <output>` writes
`thresholds.<format>.safetensors`, which the CLIs then prefer; measured better than the
source's in the README); until then the source's `thresholds.safetensors` beside it is used.
"""
from __future__ import annotations

import argparse
import hashlib
import signal
import sys
from pathlib import Path

import torch

# Output head quantized by default? Measured on SmolLM2-135M-Instruct (README, "Quantized
# weights"): see HEAD_NOTE.
HEAD_DEFAULT = {"int8": True, "int4": False}
HEAD_NOTE = ("SmolLM2-135M: an int8 head costs +0.15% perplexity dense and nothing at 50% "
             "sparsity; an int4-g128 head +10.5% dense, so int4 keeps the head unless asked")


def parse_args(argv=None) -> argparse.Namespace:
    from teal.checkpoint import DEFAULT_CHECKPOINT
    from teal.quant import GROUP_SIZES, MODES
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="the bf16/fp32 checkpoint to quantize")
    p.add_argument("--mode", choices=MODES, default="int8", help="weight format")
    p.add_argument("--groupsize", type=int, default=128, choices=GROUP_SIZES,
                   help="int4: input channels per scale group (ignored for int8)")
    p.add_argument("--quantize_head", action=argparse.BooleanOptionalAction, default=None,
                   help="also quantize the output head (default: yes for int8, no for int4; "
                        + HEAD_NOTE.replace("%", "%%") + ")")
    p.add_argument("--output", type=Path, default=None,
                   help="output file (default: model_<format>.pth next to the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to quantize (cpu or cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.quantize_head is None:
        args.quantize_head = HEAD_DEFAULT[args.mode]
    if args.mode == "int8":
        args.groupsize = 0
    return args


def sha256_of(path: Path, progress: bool) -> str:
    """sha256 of a file, read in 16 MiB chunks (with a progress bar for large files)."""
    from tqdm import tqdm
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="sha256",
                                     disable=not progress or size < 256 << 20) as bar:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "generation_config.json")


def copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files beside the source checkpoint to a different output folder
    (every CLI looks for them next to the checkpoint it loads), atomically."""
    import shutil

    from teal.io import atomic_write
    if out_dir.resolve() == src_dir.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file() and not (out_dir / name).exists():
            atomic_write(out_dir / name, lambda tmp, f=src_dir / name: shutil.copyfile(f, tmp))


def estimated_bytes(model, spec) -> int:
    """About the size of the quantized checkpoint: int8 1 byte, int4 half a byte per
    projection weight (plus the scales), everything else as it is."""
    from teal.sparse_linear import sparse_linears
    proj = sum(m.weight.numel() for m in sparse_linears(model))
    head = model.output.weight.numel() if spec.head else 0
    rest = sum(p.numel() * p.element_size() for p in model.parameters()) \
        - (proj + head) * model.tok_embeddings.weight.element_size()
    per = 1.0 if spec.mode == "int8" else 0.5
    return int((proj + head) * per * 1.1 + max(rest, 0))


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from model import load_model
    from teal.checkpoint import load_checkpoint, save_checkpoint
    from teal.paths import check_output_file
    from teal.quant import QuantSpec
    from teal.sparse_linear import quantize_model, sparse_linears

    from teal.cli import check_device
    check_device(args.device)
    spec = QuantSpec(args.mode, args.groupsize, args.quantize_head)
    src = args.checkpoint_path
    q = load_checkpoint(src).get("quantization")  # (memory-mapped: cheap)
    if q is not None:
        raise ValueError(f"{src} is already quantized ({q.get('mode') if isinstance(q, dict) else q}); "
                         f"quantize the bf16 source checkpoint it was made from "
                         f"({q.get('source', 'unknown') if isinstance(q, dict) else 'unknown'})")
    out = args.output or src.parent / f"model_{spec.wformat}.pth"
    if out.resolve() == src.resolve():
        raise ValueError(f"--output {out} is the source checkpoint; choose another file")
    check_output_file(out, "--output")
    model, meta = load_model(src, device=args.device)
    from teal.io import check_free_space
    check_free_space(out, estimated_bytes(model, spec))  # before the quantization and sha256
    n_modules = len(sparse_linears(model)) + int(spec.head)
    with tqdm(total=n_modules, desc=f"quantize {spec.wformat}", disable=args.quiet) as bar:
        report = quantize_model(model, spec, progress=lambda name: bar.update(1))
    entry = dict(spec.to_dict(), source=str(src), source_sha256=sha256_of(src, not args.quiet),
                 torch=str(torch.__version__))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_checkpoint(out, model.config.to_dict(), state, meta, quantization=entry)
    copy_tokenizer(src.parent, out.parent)
    g = model.config
    short = (f", {report['padded']} with K not a multiple of {spec.group_size} (last group short)"
             if report["padded"] else "")
    head = "the output head too" if report["head"] else "the output head kept in " \
        f"{str(model.tok_embeddings.weight.dtype).removeprefix('torch.')}"
    print(f"quantized {report['projections'] - int(report['head'])} projections of {g.n_layer} layers to "
          f"{spec.wformat}{short}; {head}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; source "
          f"{src.stat().st_size / 2**20:.1f} MiB)")
    src_th = src.parent / "thresholds.safetensors"
    if not src_th.is_file():
        until = "the source has no thresholds.safetensors to fall back on"
    elif out.parent.resolve() == src.parent.resolve():
        until = "until then the source's thresholds.safetensors beside it is used"
    else:
        until = f"until then pass --thresholds {src_th} (it is not beside {out})"
    print(f"thresholds: `python calibrate.py --checkpoint_path {out}` writes its own "
          f"(thresholds.{spec.wformat}.safetensors, preferred by every CLI); {until}")


def main(argv=None) -> int:
    from teal.checkpoint import CheckpointError
    from teal.cli import run_reporting_errors
    from teal.paths import OutputPathError

    args = parse_args(argv)

    def terminated(signum, frame):  # kill (SIGTERM) as Ctrl-C: the temp file is removed
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return run_reporting_errors(lambda: run(args),
                                    (CheckpointError, OutputPathError, OSError, ValueError))
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
