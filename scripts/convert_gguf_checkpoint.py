"""Convert a llama.cpp GGUF file (architecture `llama`) into our checkpoint format.

    python scripts/convert_gguf_checkpoint.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf

writes `checkpoints/<name>/model.pth` (see teal/checkpoint.py) and `tokenizer.json` next to it:
every tensor dequantized and stored as `--dtype` (float32 by default), q/k rows kept in
llama.cpp's interleaved RoPE order, the tokenizer rebuilt from the GGUF vocabulary. The
conversion itself is `teal.convert.convert_gguf` (teal/convert/gguf.py documents it); this
file is its command line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from teal.cli import run_reporting_errors
from teal.convert import GGUFError, convert_gguf
from teal.dtypes import DTYPES, parse_dtype


def main(argv=None) -> None:
    """Command line of `teal.convert.convert_gguf`; exits 1 with one `error:` line on bad input."""
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Convert a llama.cpp GGUF (architecture llama) into checkpoints/<name>/"
                    "model.pth + tokenizer.json (weights dequantized).")
    p.add_argument("gguf", type=Path, help="path of the .gguf file")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="output folder (default: checkpoints/<name>)")
    p.add_argument("--name", default=None,
                   help="model name stored in the checkpoint (default: the file name without "
                        "its quantization suffix, e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weight dtype of the checkpoint (default: float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    a = p.parse_args(argv)
    out = []
    rc = run_reporting_errors(lambda: out.append(convert_gguf(
        a.gguf, a.out_dir, a.name, parse_dtype(a.dtype), not a.no_progress)),
        (GGUFError, OSError))
    if rc:
        raise SystemExit(rc)
    print(f"wrote {out[0]} and {out[0].parent / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
