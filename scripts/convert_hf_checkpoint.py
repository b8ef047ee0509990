"""Convert a Hugging Face Llama-family folder into our checkpoint format.

    python scripts/convert_hf_checkpoint.py checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/hf

reads config.json, the weights (safetensors, sharded safetensors, or pytorch_model*.bin) and
the tokenizer files, and writes `model.pth` (q/k rows permuted into model.py's interleaved
RoPE order) plus a copy of the tokenizer file(s). The architecture always comes from
config.json (`model_type` llama or mistral), never from the model name. The conversion itself
is `teal.convert.convert_hf` (teal/convert/hf.py documents it); this file is its command line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from teal.cli import run_reporting_errors
from teal.convert import HF_DTYPE_CHOICES, HFConversionError, convert_hf, parse_hf_dtype


def main(argv=None) -> None:
    """Command line of `teal.convert.convert_hf`; exits 1 with one `error:` line on bad input."""
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Convert a Hugging Face Llama/Mistral folder (config.json + safetensors or "
                    "pytorch_model*.bin + tokenizer) into model.pth + tokenizer files.")
    p.add_argument("folder", type=Path, help="the Hugging Face model folder")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="output folder (default: <x> for a folder <x>/hf, else checkpoints/<name>)")
    p.add_argument("--name", default=None,
                   help="model name stored in the checkpoint (default: the folder name); the "
                        "architecture always comes from config.json")
    p.add_argument("--dtype", choices=HF_DTYPE_CHOICES, default="auto",
                   help="weight dtype (default: auto = keep the dtype of the HF weights)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    a = p.parse_args(argv)
    out = []
    rc = run_reporting_errors(lambda: out.append(convert_hf(
        a.folder, a.out_dir, a.name, parse_hf_dtype(a.dtype), not a.no_progress)),
        (HFConversionError, OSError))
    if rc:
        raise SystemExit(rc)
    print(f"wrote {out[0]}")


if __name__ == "__main__":
    main()
