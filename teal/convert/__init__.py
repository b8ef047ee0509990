"""Checkpoint conversion: llama.cpp GGUF -> ours, Hugging Face folder -> ours, GGUF -> HF.

Submodules: `common` (error base class, state-dict check, RoPE q/k row permutation, output
writing), `gguf` (GGUF reader, tokenizer rebuild, `convert_gguf`), `hf` (HF folder reader,
`convert_hf`), `hf_export` (`export_hf`: a GGUF as a LlamaForCausalLM folder). The command
lines are scripts/convert_gguf_checkpoint.py, scripts/convert_hf_checkpoint.py and
scripts/export_hf_from_gguf.py.
"""
from teal.convert.common import (ConversionError, check_out_dir, check_state_dict,
                                 hf_to_interleaved, interleaved_to_hf,
                                 write_checkpoint_and_tokenizer)
from teal.convert.gguf import GGUFError, convert_gguf
from teal.convert.hf import DTYPE_CHOICES as HF_DTYPE_CHOICES
from teal.convert.hf import HFConversionError, convert_hf, parse_hf_dtype
from teal.convert.hf_export import export_hf

__all__ = ["ConversionError", "GGUFError", "HFConversionError", "HF_DTYPE_CHOICES",
           "check_out_dir", "check_state_dict", "convert_gguf", "convert_hf", "export_hf",
           "hf_to_interleaved", "interleaved_to_hf", "parse_hf_dtype",
           "write_checkpoint_and_tokenizer"]
