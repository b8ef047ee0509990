"""Export a llama GGUF as a Hugging Face folder (LlamaForCausalLM), dequantized.

`export_hf(gguf, out_dir)` (CLI: scripts/export_hf_from_gguf.py) writes config.json,
generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json (with the
GGUF's chat template). q/k rows are permuted per head from llama.cpp's interleaved-pair RoPE
order back to Hugging Face's rotate-half order, so `transformers` computes the same model as
`model.py` does on the GGUF weights. The tests use it as an independent reference; it also
lets users run a GGUF model with `transformers`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from teal.convert.common import interleaved_to_hf
from teal.convert.gguf import (build_tokenizer, gguf_state_dict, model_args_from_metadata,
                               open_gguf, read_metadata, tokenizer_meta)
from teal.convert.hf import HF_BLOCK_NAMES, HF_GLOBAL_NAMES
from teal.dtypes import dtype_name
from teal.io import atomic_write, atomic_write_json, atomic_write_text

# our name -> HF name: the inverse of the HF converter's tables
_BLOCK_NAMES = {ours: hf for hf, ours in HF_BLOCK_NAMES.items()}
_GLOBAL_NAMES = {ours: hf for hf, ours in HF_GLOBAL_NAMES.items()}


def to_hf_state_dict(sd: dict, args: dict) -> dict:
    """Our state dict -> HF LlamaForCausalLM names, q/k rows back in rotate-half order.

    With tied embeddings `lm_head.weight` is left out (transformers ties it).

    Args:
        sd: our state dict (checkpoint keys, q/k in interleaved RoPE order).
        args: its `ModelArgs` dict (n_head, n_local_heads, tie_embeddings).
    """
    out = {}
    for key, t in sd.items():
        if key == "output.weight" and args["tie_embeddings"]:
            continue
        if key in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[key]] = t.contiguous()
            continue
        _, i, rest = key.split(".", 2)
        if rest == "attention.q_proj.weight":
            t = interleaved_to_hf(t, args["n_head"])
        elif rest == "attention.k_proj.weight":
            t = interleaved_to_hf(t, args["n_local_heads"])
        out[f"model.layers.{i}.{_BLOCK_NAMES[rest]}"] = t.contiguous()
    return out


def hf_config(args: dict, tok: dict, dtype: torch.dtype) -> dict:
    """config.json of a LlamaForCausalLM with the architecture `args` (a ModelArgs dict).

    Args:
        args: the `ModelArgs` dict.
        tok: the `meta["tokenizer"]` record (`teal.convert.gguf.tokenizer_meta`): bos/eos ids.
        dtype: the weights' dtype, recorded as `torch_dtype`.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args["dim"],
        "intermediate_size": args["intermediate_size"],
        "num_hidden_layers": args["n_layer"],
        "num_attention_heads": args["n_head"],
        "num_key_value_heads": args["n_local_heads"],
        "head_dim": args["head_dim"],
        "max_position_embeddings": args["block_size"],
        "rms_norm_eps": args["norm_eps"],
        "rope_theta": args["rope_base"],
        "rope_scaling": None,
        "vocab_size": args["vocab_size"],
        "tie_word_embeddings": args["tie_embeddings"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": tok["bos_id"],
        "eos_token_id": tok["eos_id"],
        "torch_dtype": dtype_name(dtype),
    }


def export_hf(gguf_path, out_dir, dtype: torch.dtype = torch.float32,
              progress: bool = True) -> Path:
    """Write the HF folder `out_dir` for the GGUF file; returns `out_dir`.

    Args:
        gguf_path: the .gguf file (architecture `llama`).
        out_dir: output folder (created if missing); config.json, generation_config.json,
            model.safetensors, tokenizer.json and tokenizer_config.json are written into it,
            each atomically.
        dtype: weight dtype of model.safetensors.
        progress: show a tqdm bar over tensors.

    Raises:
        GGUFError: unreadable or unsupported GGUF.
        OSError: the folder cannot be created or written.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    reader = open_gguf(gguf_path)
    md = read_metadata(reader)
    args = model_args_from_metadata(md, {t.name for t in reader.tensors})
    tokenizer = build_tokenizer(md)
    tok = tokenizer_meta(md)
    sd = to_hf_state_dict(gguf_state_dict(reader, args, dtype, progress), args)
    out_dir.mkdir(parents=True, exist_ok=True)

    def token(i):
        return None if i is None else tokenizer.id_to_token(i)

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(tok["bos_id"]),
        "eos_token": token(tok["eos_id"]),
        "unk_token": token(md.get("tokenizer.ggml.unknown_token_id")),
        "pad_token": token(md.get("tokenizer.ggml.padding_token_id")),
        "add_bos_token": tok["add_bos"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": args["block_size"],
        "chat_template": md.get("tokenizer.chat_template"),
    }
    tok_config = {k: v for k, v in tok_config.items() if v is not None}
    gen_config = {"bos_token_id": tok["bos_id"], "eos_token_id": tok["eos_id"]}
    atomic_write(out_dir / "model.safetensors",
                 lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str())
    atomic_write_json(out_dir / "tokenizer_config.json", tok_config, indent=2)
    atomic_write_json(out_dir / "generation_config.json", gen_config, indent=2)
    atomic_write_json(out_dir / "config.json", hf_config(args, tok, dtype), indent=2)
    return out_dir
