"""Export a llama GGUF as a Hugging Face folder (LlamaForCausalLM), dequantized.

    python scripts/export_hf_from_gguf.py model.gguf out/folder [--dtype float32]

writes config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (with the GGUF's chat template), q/k rows back in Hugging Face's
rotate-half order. The export itself is `teal.convert.export_hf` (teal/convert/hf_export.py
documents it); this file is its command line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from teal.cli import run_reporting_errors
from teal.convert import GGUFError, export_hf
from teal.dtypes import DTYPES, parse_dtype


def main(argv=None) -> None:
    """Command line of `teal.convert.export_hf`; exits 1 with one `error:` line on bad input."""
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Export a llama GGUF as a Hugging Face LlamaForCausalLM folder "
                    "(dequantized weights, q/k in HF rotate-half order, tokenizer.json).")
    p.add_argument("gguf", type=Path, help="path of the .gguf file")
    p.add_argument("out_dir", type=Path, help="output folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weight dtype (default: float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    a = p.parse_args(argv)
    rc = run_reporting_errors(
        lambda: export_hf(a.gguf, a.out_dir, parse_dtype(a.dtype), not a.no_progress),
        (GGUFError, OSError), interrupted=f"interrupted; {a.out_dir} may be incomplete")
    if rc:
        raise SystemExit(rc)
    print(f"wrote {a.out_dir}")


if __name__ == "__main__":
    main()
