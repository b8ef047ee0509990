"""Convert a llama.cpp GGUF file (architecture `llama`) into our checkpoint format.

`convert_gguf(path)` writes `checkpoints/<name>/model.pth` (see teal/checkpoint.py) and
`tokenizer.json` next to it (CLI: scripts/convert_gguf_checkpoint.py). Every tensor is
dequantized with `gguf.quants.dequantize` (Q4_1, Q8_0, F16, ... -> float32) and stored in the
requested dtype (float32 by default). The architecture comes from the GGUF metadata
(`llama.block_count`, `llama.embedding_length`, ...); the output head is tied to the token
embedding when the file has no `output.weight`.

q/k rows are kept as llama.cpp stores them: permuted for interleaved-pair RoPE, which is the
convention of `model.py` (Meta / gpt-fast). `teal.convert.hf_export` undoes that
permutation for a Hugging Face (rotate-half) export.

The tokenizer.json is a Hugging Face `tokenizers` byte-level BPE built from the GGUF vocabulary,
merges and control tokens, with the pre-tokenizer named by `tokenizer.ggml.pre` (SmolLM2's
`smollm`: every digit on its own, then the GPT-2 split regex).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Optional

import gguf
import numpy as np
import torch

from teal.convert.common import (ConversionError, check_out_dir, check_source_tensors,
                                 check_state_dict, write_checkpoint_and_tokenizer)
from teal.dtypes import dtype_name
from teal.tokenizer import chat_template_kind

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor names -> ours (per block: "blk.{i}." -> "layers.{i}.").
_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "output.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.q_proj.weight",
    "attn_k.weight": "attention.k_proj.weight",
    "attn_v.weight": "attention.v_proj.weight",
    "attn_output.weight": "attention.o_proj.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.gate_proj.weight",
    "ffn_up.weight": "feed_forward.up_proj.weight",
    "ffn_down.weight": "feed_forward.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# GPT-2's split regex, and llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`) that we rebuild.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {"smollm": "smollm", "gpt2": "gpt2", "default": "gpt2",
                   "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class GGUFError(ConversionError):
    """A GGUF file we cannot convert (unsupported architecture, tensor, tokenizer...)."""


# ----------------------------------------------------------------------------- metadata

def open_gguf(path) -> gguf.GGUFReader:
    """Open a GGUF file (memory-mapped). Raises GGUFError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on a bad file
        if "reshape" in str(e) or isinstance(e, (EOFError, IndexError)):
            # a tensor's data runs past the end of the file
            raise GGUFError(f"{path} is truncated or corrupt; download it again "
                            f"({e.__class__.__name__}: {e})") from None
        raise GGUFError(f"{path} is not a readable GGUF file "
                        f"({e.__class__.__name__}: {e})") from None


def read_metadata(reader) -> dict:
    """All GGUF key/value fields of `reader` (a `gguf.GGUFReader`) as plain Python values
    (strings, numbers, lists), without the `GGUF.*` header fields."""
    md = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        md[key] = field.contents()
    return md


def _round_f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def model_args_from_metadata(md: dict, tensor_names: set) -> dict:
    """`ModelArgs` dict of a llama-architecture GGUF.

    Args:
        md: the GGUF metadata (`read_metadata`).
        tensor_names: names of the file's tensors (an `output.weight` means an untied head;
            `rope_freqs.weight` means RoPE scaling).

    Raises:
        GGUFError: another architecture, missing metadata, or llama features we do not
            implement (MoE, RoPE scaling).
    """
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def get(key, default=None, required=True):
        value = md.get(f"{arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"GGUF metadata lacks {arch}.{key}")
        return value

    if get("expert_count", 0, required=False):
        raise GGUFError("mixture-of-experts llama GGUFs are not supported")
    if "rope_freqs.weight" in tensor_names or get("rope.scaling.type", None, required=False) \
            not in (None, "none"):
        raise GGUFError("GGUF with RoPE scaling (e.g. Llama-3.1 rope_freqs) is not supported; "
                        "convert the Hugging Face folder with scripts/convert_hf_checkpoint.py")
    n_head = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    if n_head < 1:
        raise GGUFError(f"GGUF metadata has {arch}.attention.head_count={n_head}; the file is "
                        f"corrupt, download it again")
    head_dim = int(get("attention.key_length", dim // n_head, required=False))
    vocab = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise GGUFError("GGUF metadata has neither a vocab size nor a token list")
    return dict(
        block_size=int(get("context_length")),
        vocab_size=int(vocab),
        n_layer=int(get("block_count")),
        n_head=n_head,
        dim=dim,
        intermediate_size=int(get("feed_forward_length")),
        n_local_heads=int(get("attention.head_count_kv", n_head, required=False)),
        head_dim=head_dim,
        rope_base=_round_f32(get("rope.freq_base", 10000.0, required=False)),
        norm_eps=_round_f32(get("attention.layer_norm_rms_epsilon")),
        rope_scaling=None,
        tie_embeddings="output.weight" not in tensor_names,
    )


def default_name(gguf_path) -> str:
    """Model name from the file name, without a quantization suffix (`X.Q4_1.gguf` -> `X`)."""
    stem = Path(gguf_path).stem
    parts = stem.rsplit(".", 1)
    if len(parts) == 2 and re.fullmatch(r"(?i)(I?Q\d.*|F16|F32|BF16)", parts[1]):
        return parts[0]
    return re.sub(r"(?i)[-_.](I?Q\d[\w]*|F16|F32|BF16)$", "", stem)


# ----------------------------------------------------------------------------- tensors

def our_tensor_name(gguf_name: str) -> str:
    """Our state-dict key of a llama.cpp tensor name. Raises GGUFError for unknown tensors."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} in a llama GGUF (not a plain Llama model?)")


def dequantize_tensor(t) -> np.ndarray:
    """A GGUF tensor (a `gguf.ReaderTensor`) as a float32 numpy array in nn.Linear
    (rows, cols) order.

    Raises:
        GGUFError: an unsupported quantization, or truncated tensor data.
    """
    shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))  # ggml lists ne0 first
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"tensor {t.name}: quantization {t.tensor_type.name} cannot be "
                        f"dequantized by this gguf version") from None
    except ValueError as e:  # e.g. a reshape of a short (truncated) data block
        raise GGUFError(f"the GGUF file is truncated or corrupt; download it again (tensor "
                        f"{t.name}: {e})") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size != int(np.prod(shape)):
        raise GGUFError(f"the GGUF file is truncated or corrupt; download it again (tensor "
                        f"{t.name} has {arr.size} values, expected {shape})")
    return arr.reshape(shape)


def iter_state_dict(reader, dtype: torch.dtype = torch.float32,
                    progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our key, tensor) for every GGUF tensor, dequantized and cast to `dtype`.

    Raises:
        GGUFError: an unknown tensor name or a tensor that cannot be dequantized.
    """
    from tqdm import tqdm
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress):
        name = our_tensor_name(t.name)
        yield name, torch.from_numpy(dequantize_tensor(t).copy()).to(dtype)


def gguf_state_dict(reader, args: dict, dtype: torch.dtype = torch.float32,
                    progress: bool = True) -> dict:
    """Our full state dict (q/k rows in interleaved RoPE order, as stored by llama.cpp).

    With tied embeddings `output.weight` is the same tensor as `tok_embeddings.weight`.

    Args:
        reader: the open GGUF file.
        args: its `ModelArgs` dict (`model_args_from_metadata`).
        dtype: weight dtype.
        progress: show a tqdm bar over tensors.

    Raises:
        GGUFError: unreadable tensors, or tensors that do not match `args`
            (`teal.checkpoint.state_dict_shapes`).
    """
    sd = dict(iter_state_dict(reader, dtype, progress))
    if args["tie_embeddings"]:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, args, "GGUF", GGUFError)
    return sd


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(md: dict):
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE) from the GGUF tokenizer metadata.

    Args:
        md: the GGUF metadata (`read_metadata`): tokenizer.ggml.{model,pre,tokens,merges,
            token_type}.

    Raises:
        GGUFError: the GGUF tokenizer is not a byte-level BPE we know how to rebuild.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
                        f"'gpt2'); convert the Hugging Face folder instead")
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported "
                        f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
    tokens = list(md["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
    types = list(md.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("GGUF vocabulary has duplicate tokens")
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    style = _PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def tokenizer_meta(md: dict, file: str = "tokenizer.json") -> dict:
    """The checkpoint's `meta["tokenizer"]` record (see teal/tokenizer.py) from GGUF metadata.

    Args:
        md: the GGUF metadata (`read_metadata`).
        file: the tokenizer file name recorded in the record.
    """
    bos = md.get("tokenizer.ggml.bos_token_id")
    eos = md.get("tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos)} if eos is not None else set()
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if md.get(key) is not None:
            eos_ids.add(int(md[key]))
    return {"file": file, "backend": "hf",
            "bos_id": None if bos is None else int(bos),
            "eos_id": None if eos is None else int(eos),
            "eos_ids": sorted(eos_ids),
            "add_bos": bool(md.get("tokenizer.ggml.add_bos_token", False)),
            "chat_template": chat_template_kind(md.get("tokenizer.chat_template"))}


# ----------------------------------------------------------------------------- convert

def _nbytes(shapes: dict, args: dict, dtype: torch.dtype) -> int:
    """Bytes of the checkpoint's tensors (a tied head stored once)."""
    n = sum(int(np.prod(s)) for k, s in shapes.items()
            if not (k == "output.weight" and args["tie_embeddings"]))
    return n * torch.empty((), dtype=dtype).element_size()


def convert_gguf(gguf_path, out_dir=None, name: Optional[str] = None,
                 dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Convert a GGUF file; returns the path of the written model.pth.

    Args:
        gguf_path: the .gguf file (architecture `llama`).
        out_dir: output folder; default `checkpoints/<name>`.
        name: model name recorded in meta; default from the file name.
        dtype: weight dtype of the checkpoint (dequantized values are exact in float32).
        progress: show a tqdm bar over tensors.

    Raises:
        GGUFError: unreadable file, unsupported architecture/tensor/tokenizer, or an output
            folder that cannot be written.
        OSError: writing the output failed (nothing is left behind).
    """
    gguf_path = Path(gguf_path)
    if out_dir is not None:
        check_out_dir(out_dir, GGUFError)
    reader = open_gguf(gguf_path)
    md = read_metadata(reader)
    tensor_names = {t.name for t in reader.tensors}
    args = model_args_from_metadata(md, tensor_names)
    name = name or default_name(gguf_path)
    out_dir = Path(out_dir) if out_dir is not None else Path("checkpoints") / name
    check_out_dir(out_dir, GGUFError)
    # every tensor name and shape against the metadata first: one line, before dequantizing
    shapes = {t.name: tuple(int(x) for x in reversed([int(d) for d in t.shape]))
              for t in reader.tensors}
    ours = check_source_tensors(shapes, our_tensor_name, dict(args), f"GGUF file {gguf_path}",
                                GGUFError)
    from teal.io import check_free_space
    check_free_space(out_dir / "model.pth", _nbytes(ours, args, dtype))
    tok_text = build_tokenizer(md).to_str()
    sd = gguf_state_dict(reader, args, dtype, progress)
    meta = {"name": name, "source": str(gguf_path.name), "source_format": "gguf",
            "gguf_general_name": md.get("general.name"),
            "dtype": dtype_name(dtype),
            "tokenizer": tokenizer_meta(md)}
    return write_checkpoint_and_tokenizer(out_dir, args, sd, meta, {"tokenizer.json": tok_text})
