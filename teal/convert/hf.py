"""Convert a Hugging Face Llama-family folder into our checkpoint format.

`convert_hf(folder)` (CLI: scripts/convert_hf_checkpoint.py) reads config.json and the
weights (model.safetensors, sharded safetensors with model.safetensors.index.json, or
pytorch_model*.bin as a fallback), renames the tensors to ours (see `model.Transformer`),
permutes q/k rows from Hugging Face's rotate-half RoPE order into the interleaved-pair order
of `model.py` (per head; k with the KV head count), and writes `model.pth` plus a copy of the
tokenizer file(s) and tokenizer metadata. Before any tensor is read, the tensor names and
shapes (from the file headers) are checked against config.json and the output's disk is
checked for room for the output (`teal.io.check_free_space`, sizes from the headers and the
output dtype).

The architecture always comes from config.json (`model_type` llama or mistral), never from
the model name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from teal.convert.common import (ConversionError, check_out_dir, check_source_tensors,
                                 check_state_dict, hf_to_interleaved,
                                 write_checkpoint_and_tokenizer)
from teal.dtypes import DTYPES, dtype_name, parse_dtype
from teal.tokenizer import chat_template_kind

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# --dtype choices: "auto" keeps the dtype of the HF weights.
DTYPE_CHOICES = ("auto", *DTYPES)

# HF name -> our name (per block, and model-level); teal.convert.hf_export inverts them.
HF_BLOCK_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.q_proj.weight",
    "self_attn.k_proj.weight": "attention.k_proj.weight",
    "self_attn.v_proj.weight": "attention.v_proj.weight",
    "self_attn.o_proj.weight": "attention.o_proj.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.gate_proj.weight",
    "mlp.up_proj.weight": "feed_forward.up_proj.weight",
    "mlp.down_proj.weight": "feed_forward.down_proj.weight",
}
HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight",
                   "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}


class HFConversionError(ConversionError):
    """A Hugging Face folder we cannot convert (missing/corrupt files, unsupported config)."""


def parse_hf_dtype(name: str) -> Optional[torch.dtype]:
    """The `convert_hf` dtype of a `--dtype` choice: None for "auto" (keep the weights' dtype).

    Raises:
        ValueError: `name` is not one of `DTYPE_CHOICES` (one line listing them).
    """
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return parse_dtype(name)


# ----------------------------------------------------------------------------- config

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFConversionError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConversionError(f"{path} is not valid JSON ({e})") from None


def model_args_from_config(cfg: dict) -> dict:
    """`ModelArgs` dict of a Hugging Face Llama/Mistral config.json.

    Args:
        cfg: the parsed config.json.

    Raises:
        HFConversionError: another architecture, missing or invalid sizes, or a feature
            model.py does not implement (biases, another activation or RoPE scaling).
    """
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(f"config.json model_type {mtype!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise HFConversionError(f"config.json sets {flag}; biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    try:
        dim, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        args = dict(
            block_size=int(cfg.get("max_position_embeddings", 2048)),
            vocab_size=int(cfg["vocab_size"]),
            n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head,
            dim=dim,
            intermediate_size=int(cfg["intermediate_size"]),
            n_local_heads=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or dim // n_head),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise HFConversionError(f"config.json lacks {e.args[0]!r}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise HFConversionError(f"config.json has an invalid model size ({e}); download the "
                                f"folder again") from None
    if min(args["n_layer"], args["n_head"], args["dim"], args["vocab_size"],
           args["intermediate_size"], args["n_local_heads"], args["head_dim"]) < 1:
        raise HFConversionError("config.json has a zero or negative model size "
                                "(num_hidden_layers, hidden_size, ...); download the folder again")
    # transformers < 5: rope_theta + rope_scaling; >= 5: rope_parameters (may hold both).
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                          else None)
    args["rope_base"] = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    args["rope_scaling"] = None
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "llama3":
            args["rope_scaling"] = {k: float(scaling[k]) if k != "original_max_position_embeddings"
                                    else int(scaling[k])
                                    for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}
        elif kind not in (None, "default"):
            raise HFConversionError(f"rope_scaling type {kind!r} is not supported (only llama3)")
    window = cfg.get("sliding_window")
    if window and int(window) < args["block_size"]:
        # model.py has no sliding-window attention; within one window the two agree exactly.
        print(f"note: sliding_window={window}: context limited to {window} tokens")
        args["block_size"] = int(window)
    return args


# ----------------------------------------------------------------------------- weights

def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: safetensors (single/sharded), else pytorch_model*.bin.

    Raises:
        HFConversionError: no weights, or an index naming a missing shard.
    """
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise HFConversionError(f"{index} has no weight_map")
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise HFConversionError(f"{index} names missing shard(s) {missing[:3]}; "
                                        f"download the folder again")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if found:
        return found
    raise HFConversionError(f"no model.safetensors(.index.json) or pytorch_model*.bin in {folder}")


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from safetensors or .bin files.

    Raises:
        HFConversionError: a corrupt or truncated file.
    """
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        yield k, sf.get_tensor(k)
            except HFConversionError:
                raise
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise HFConversionError(f"{f} is corrupt or truncated ({e}); download it "
                                        f"again") from None
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001
                raise HFConversionError(f"{f} is corrupt or truncated "
                                        f"({e.__class__.__name__}); download it again") from None
            yield from sd.items()


# bytes per element of the safetensors header dtypes
_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                         "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                         "F8_E4M3": 1, "F8_E5M2": 1}


def hf_tensor_headers(files: list[Path]) -> dict:
    """{HF name: (shape, bytes per element)} of the weight files, read from the safetensors
    headers (no tensor data) or a memory-mapped .bin.

    Raises:
        HFConversionError: a corrupt or truncated file.
    """
    headers = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        sl = sf.get_slice(k)
                        headers[k] = (tuple(sl.get_shape()),
                                      _SAFETENSORS_ITEMSIZE.get(sl.get_dtype(), 8))
            else:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                headers.update({k: (tuple(v.shape), v.element_size()) for k, v in sd.items()})
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, unpickling errors
            raise HFConversionError(f"{f} is corrupt or truncated ({e.__class__.__name__}: "
                                    f"{' '.join(str(e).split())[:120]}); download it again") from None
    return headers


def hf_tensor_shapes(files: list[Path]) -> dict:
    """{HF name: shape} of the weight files (`hf_tensor_headers` without the element sizes).

    Raises:
        HFConversionError: a corrupt or truncated file.
    """
    return {k: shape for k, (shape, _) in hf_tensor_headers(files).items()}


def hf_checkpoint_nbytes(folder: Path, args: dict, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of the tensors `hf_state_dict(folder, args, dtype)` gives, from the weight files'
    headers (no tensor is read): each kept tensor's element count times the size of `dtype`
    (None: of its dtype in the file); a tied head is stored once. `args` is not changed.

    Raises:
        HFConversionError: missing/corrupt weights, or tensors that do not match `args`
            (the same one line `hf_state_dict` raises).
    """
    headers = hf_tensor_headers(weight_files(folder))
    config = dict(args)  # check_source_tensors may set tie_embeddings; hf_state_dict notes it
    ours = check_source_tensors({k: shape for k, (shape, _) in headers.items()}, our_name,
                                config, f"Hugging Face folder {folder}", HFConversionError)
    itemsize = {our_name(k): size for k, (_, size) in headers.items()}
    out_size = dtype.itemsize if dtype is not None else None
    total = 0
    for key, shape in ours.items():
        if key == "output.weight" and config["tie_embeddings"]:
            continue  # the same tensor as tok_embeddings.weight
        n = 1
        for d in shape:
            n *= int(d)
        total += n * (out_size or itemsize.get(key, 4))
    return total


def our_name(hf_name: str) -> Optional[str]:
    """Our key of an HF tensor name; None for tensors to drop (rotary inv_freq buffers).

    Raises:
        HFConversionError: a tensor of no plain Llama model.
    """
    if hf_name in HF_GLOBAL_NAMES:
        return HF_GLOBAL_NAMES[hf_name]
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_BLOCK_NAMES:
        return f"layers.{parts[2]}.{HF_BLOCK_NAMES[parts[3]]}"
    raise HFConversionError(f"unexpected tensor {hf_name!r} (not a plain Llama model?)")


def hf_state_dict(folder: Path, args: dict, dtype: Optional[torch.dtype] = None,
                  progress: bool = True) -> dict:
    """Our state dict from the HF weights: renamed, q/k permuted, cast to `dtype` (None: keep).

    Without an `lm_head.weight` the head is tied (`args["tie_embeddings"]` is set True);
    with tied embeddings `output.weight` is the same tensor as `tok_embeddings.weight`.

    Args:
        folder: the HF model folder.
        args: its `ModelArgs` dict (`model_args_from_config`).
        dtype: weight dtype; None keeps the file's.
        progress: show a tqdm bar over tensors.

    Raises:
        HFConversionError: missing/corrupt weights, or tensors that do not match `args`
            (`teal.checkpoint.state_dict_shapes`).
    """
    from tqdm import tqdm
    files = weight_files(folder)
    tied_before = args["tie_embeddings"]
    # every name and shape against config.json first: one line, before any reshape
    check_source_tensors(hf_tensor_shapes(files), our_name, args, f"Hugging Face folder {folder}",
                         HFConversionError)
    if args["tie_embeddings"] and not tied_before:
        print("note: the weights have no lm_head.weight; tying the output head to the "
              "token embedding")
    sd = {}
    bar = tqdm(desc="convert", unit="tensor", disable=not progress)
    for name, t in iter_hf_tensors(files):
        key = our_name(name)
        bar.update()
        if key is None:
            continue
        if key.endswith("q_proj.weight"):
            t = hf_to_interleaved(t, args["n_head"])
        elif key.endswith("k_proj.weight"):
            t = hf_to_interleaved(t, args["n_local_heads"])
        t = t.contiguous()
        sd[key] = t.to(dtype) if dtype is not None else t
    bar.close()
    if args["tie_embeddings"] and "tok_embeddings.weight" in sd:  # one tensor, both keys
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, args, "checkpoint", HFConversionError)
    return sd


# ----------------------------------------------------------------------------- tokenizer

def _token_id(value, vocab_lookup) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, dict):  # {"content": "<s>", ...} in old tokenizer_config.json
        value = value.get("content")
    if isinstance(value, int):
        return value
    return vocab_lookup(value)


def tokenizer_files_and_meta(folder: Path, cfg: dict) -> tuple[dict, dict]:
    """Tokenizer files to copy ({name: bytes}) and the `meta["tokenizer"]` record.

    Args:
        folder: the HF model folder (tokenizer.json or tokenizer.model, tokenizer_config.json,
            generation_config.json, chat_template.jinja).
        cfg: its parsed config.json (bos/eos token ids).

    Raises:
        HFConversionError: the folder has no tokenizer.json / tokenizer.model.
    """
    files = {}
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    if not files and (folder / "original" / "tokenizer.model").is_file():
        files["tokenizer.model"] = (folder / "original" / "tokenizer.model").read_bytes()
    if not files:
        raise HFConversionError(f"no tokenizer.json or tokenizer.model in {folder}")
    tcfg = _read_json(folder / "tokenizer_config.json") \
        if (folder / "tokenizer_config.json").is_file() else {}
    gcfg = _read_json(folder / "generation_config.json") \
        if (folder / "generation_config.json").is_file() else {}
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"),
                        None)
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    hf_tok = None
    if "tokenizer.json" in files:
        from tokenizers import Tokenizer
        try:
            hf_tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # noqa: BLE001
            raise HFConversionError(f"{folder / 'tokenizer.json'} cannot be read ({e})") from None
    lookup = hf_tok.token_to_id if hf_tok is not None else (lambda s: None)

    bos = cfg.get("bos_token_id", gcfg.get("bos_token_id"))
    bos = bos if bos is not None else _token_id(tcfg.get("bos_token"), lookup)
    eos_ids = []
    for src in (cfg.get("eos_token_id"), gcfg.get("eos_token_id")):
        eos_ids += src if isinstance(src, list) else ([src] if src is not None else [])
    tok_eos = _token_id(tcfg.get("eos_token"), lookup)
    if tok_eos is not None:
        eos_ids.append(tok_eos)
    eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
    eos = tok_eos if tok_eos is not None else (eos_ids[0] if eos_ids else None)

    if "add_bos_token" in tcfg:
        add_bos = bool(tcfg["add_bos_token"])
    elif hf_tok is not None:
        # Does the tokenizer's own post-processor prepend BOS? (Llama-3 yes, SmolLM2 no.)
        with_special = hf_tok.encode("a", add_special_tokens=True).ids
        add_bos = bool(bos is not None and with_special and with_special[0] == bos
                       and with_special != hf_tok.encode("a", add_special_tokens=False).ids)
    else:
        add_bos = True  # sentencepiece / tiktoken Llama models
    name = "tokenizer.json" if "tokenizer.json" in files else "tokenizer.model"
    meta = {"file": name, "backend": "hf" if name == "tokenizer.json" else None,
            "bos_id": None if bos is None else int(bos),
            "eos_id": None if eos is None else int(eos), "eos_ids": eos_ids,
            "add_bos": add_bos, "chat_template": chat_template_kind(template)}
    if meta["backend"] is None:
        del meta["backend"]  # teal.tokenizer detects sentencepiece vs tiktoken
    return files, meta


# ----------------------------------------------------------------------------- convert

def default_name_and_dir(folder: Path) -> tuple[str, Path]:
    """(name, output folder): `<x>/hf` (scripts/download.py's layout) -> (x's name, <x>);
    any other folder -> (its name, checkpoints/<name>)."""
    folder = Path(folder).resolve()
    if folder.name == "hf":
        return folder.parent.name, folder.parent
    return folder.name, Path("checkpoints") / folder.name


def convert_hf(folder, out_dir=None, name: Optional[str] = None,
               dtype: Optional[torch.dtype] = None, progress: bool = True) -> Path:
    """Convert an HF folder; returns the path of the written model.pth.

    Args:
        folder: the HF model folder (config.json, weights, tokenizer files).
        out_dir: output folder (default: the parent of `<x>/hf`, else checkpoints/<name>).
        name: model name stored in meta (default: the folder name).
        dtype: weight dtype; None keeps the dtype of the HF weights.
        progress: show a tqdm bar over tensors.

    Raises:
        HFConversionError: missing/corrupt files, an unsupported config, or an output folder
            that cannot be written.
        WriteError (an OSError): the output's disk has too little free space for model.pth
            and the tokenizer files (estimated from the weight headers and `dtype`); raised
            before any tensor is read, one line naming the path and the fix.
        OSError: writing the output failed (nothing is left behind).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HFConversionError(f"{folder} is not a folder")
    if not (Path(folder) / "config.json").is_file():
        raise HFConversionError(f"{folder} has no config.json; pass a Hugging Face model folder "
                                f"(config.json, *.safetensors, tokenizer files)")
    cfg = _read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise HFConversionError(f"{folder / 'config.json'} is not a JSON object (got "
                                f"{type(cfg).__name__}); download the folder again")
    args = model_args_from_config(cfg)
    default_name, default_dir = default_name_and_dir(folder)
    name = name or default_name
    out_dir = Path(out_dir) if out_dir is not None else (
        default_dir if name == default_name else Path("checkpoints") / name)
    check_out_dir(out_dir, HFConversionError)
    tok_files, tok_meta = tokenizer_files_and_meta(folder, cfg)
    # room for model.pth and the tokenizer files (+1 MB: archive records, meta), before any
    # tensor is read; the names and shapes are checked on the way
    from teal.io import check_free_space
    check_free_space(out_dir / "model.pth", hf_checkpoint_nbytes(folder, args, dtype)
                     + sum(len(b) for b in tok_files.values()) + (1 << 20))
    sd = hf_state_dict(folder, args, dtype, progress)
    dtypes = sorted({dtype_name(t.dtype) for t in sd.values()})
    meta = {"name": name, "source": str(folder), "source_format": "hf",
            "hf_model_type": cfg.get("model_type"), "dtype": ",".join(dtypes),
            "tokenizer": tok_meta}
    return write_checkpoint_and_tokenizer(out_dir, args, sd, meta, tok_files)
