"""The checkpoint format: `checkpoints/<model>/model.pth`, a torch.save'd dict

    {"format": "teal-fast/1", "config": ModelArgs dict, "state_dict": {...},
     "meta": {"name": ..., "source": ..., "tokenizer": {...}, ...}}

A quantized checkpoint (quantize.py) adds ``"quantization": {"mode": "int8" | "int4",
"group_size": 0 | 32 | 64 | 128, "head": bool, "source_sha256": ..., "torch": ...}`` and
holds, instead of each projection's `.weight`, its `.qweight` codes and `.scales`
(`teal.sparse_linear.QuantizedSparseLinear`; with `head`, `output.qweight` / `output.scales`).
Every loader reads the format from this entry, never from the file name.

State-dict keys and layouts are documented on `model.Transformer`; `state_dict_shapes` lists
them with their shapes for a config (converters check against it). Everything is plain
tensors, strings and numbers, so `torch.load(weights_only=True)` reads it. Files are written
to a temp file and renamed, so an interrupted conversion leaves no partial checkpoint.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from teal.io import atomic_torch_save
from teal.projections import PROJECTION_SPECS, projection_shapes
from teal.quant import QuantSpec
from teal.sparse_linear import quantize_model

FORMAT = "teal-fast/1"
DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct/model.pth")
PREPARE_HINT = "run `python scripts/prepare.py` to download and convert the default model"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated/corrupt, or not in our format."""


def atomic_save(obj, path) -> None:
    """torch.save `obj` to `path` atomically, creating missing parent folders.

    Raises:
        teal.io.WriteError (an OSError): the folder cannot be created or written, the disk is
            full, torch.save failed (one line naming the path and the cause; nothing is left
            behind).
    """
    atomic_torch_save(obj, path, make_parents=True)


_CONFIG_SIZES = ("vocab_size", "dim", "n_layer", "n_head", "n_local_heads", "head_dim",
                 "intermediate_size")


def _check_config(config: Mapping) -> None:
    """Raise ValueError unless `config` has positive integer sizes and whole KV-head groups."""
    for key in _CONFIG_SIZES:
        if key not in config:
            raise ValueError(f"config lacks {key!r}")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"config {key}={value!r} is not a positive integer")
    if config["n_head"] % config["n_local_heads"]:
        raise ValueError(f"n_head={config['n_head']} is not a multiple of "
                         f"n_local_heads={config['n_local_heads']}")


def state_dict_shapes(config: Mapping) -> dict[str, tuple]:
    """Every state-dict key of the checkpoint format and its shape, for a model config.

    `tok_embeddings.weight` (vocab, dim); per block i `layers.i.attention_norm.weight` and
    `layers.i.ffn_norm.weight` (dim,) and each projection of `teal.projections`
    (`layers.i.<owner>.<name>.weight`, nn.Linear (out_features, in_features)); `norm.weight`
    (dim,); `output.weight` (vocab, dim), present also with tied embeddings.

    Args:
        config: a `ModelArgs` dict as stored in a checkpoint (n_local_heads and head_dim
            resolved, not -1 / 0): vocab_size, dim, n_layer, n_head, n_local_heads,
            head_dim, intermediate_size.

    Raises:
        ValueError: a size is missing or not a positive integer, or n_head is not a
            multiple of n_local_heads.
    """
    _check_config(config)
    vocab, dim = config["vocab_size"], config["dim"]
    projections = projection_shapes(config)
    shapes = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(config["n_layer"]):
        block = f"layers.{i}."
        shapes[block + "attention_norm.weight"] = (dim,)
        shapes[block + "ffn_norm.weight"] = (dim,)
        for spec in PROJECTION_SPECS:
            n_in, n_out = projections[spec.name]
            shapes[f"{block}{spec.owner}.{spec.name}.weight"] = (n_out, n_in)
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (vocab, dim)
    return shapes


def save_checkpoint(path, config: dict, state_dict: dict, meta: Optional[dict] = None,
                    quantization: Optional[dict] = None) -> None:
    """Write a checkpoint atomically (see module doc); `quantization`: the entry of a
    quantized checkpoint."""
    obj = {"format": FORMAT, "config": dict(config), "state_dict": state_dict,
           "meta": dict(meta or {})}
    if quantization is not None:
        obj["quantization"] = dict(quantization)
    atomic_save(obj, path)  # teal.io.WriteError (one line: path and cause) on any failure


def load_checkpoint(path, map_location="cpu", mmap: bool = True) -> dict:
    """Read a checkpoint dict; raises CheckpointError with the fix in the message."""
    path = Path(path)
    if not path.exists():
        hint = PREPARE_HINT if path.parts[-2:] == DEFAULT_CHECKPOINT.parts[-2:] else \
            "convert one with scripts/convert_hf_checkpoint.py or scripts/convert_gguf_checkpoint.py"
        raise CheckpointError(f"checkpoint {path} not found; {hint}")
    if path.is_dir():
        if (path / "config.json").is_file() and not (path / "model.pth").is_file():
            raise CheckpointError(f"{path} is a Hugging Face model folder, not a teal-fast "
                                  f"checkpoint; convert it first: python "
                                  f"scripts/convert_hf_checkpoint.py {path}")
        raise CheckpointError(f"checkpoint {path} is a directory; pass the model.pth file "
                              f"inside it (e.g. {path / 'model.pth'})")
    kind = _foreign_kind(path)
    if kind == "gguf":
        raise CheckpointError(f"{path} is a GGUF file, not a teal-fast checkpoint; convert it "
                              f"first: python scripts/convert_gguf_checkpoint.py {path}")
    if kind == "safetensors":
        raise CheckpointError(f"{path} is a safetensors weights file, not a teal-fast "
                              f"checkpoint; convert the Hugging Face folder holding it: python "
                              f"scripts/convert_hf_checkpoint.py {path.parent}")
    convert = "scripts/convert_hf_checkpoint.py or scripts/convert_gguf_checkpoint.py"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"{path} is not a teal-fast checkpoint (not a torch.save "
                                  f"file); pass a model.pth converted with {convert}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({e.__class__.__name__}); delete it and convert again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a teal-fast checkpoint ({FORMAT}); convert it "
                              f"with {convert}")
    for key, kind in (("config", dict), ("state_dict", dict), ("meta", dict)):
        if key == "meta" and key not in ckpt:
            continue
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"checkpoint {path} has no valid {key!r} entry; "
                                  f"delete it and convert again with {convert}")
    return ckpt


def _foreign_kind(path: Path) -> Optional[str]:
    """"gguf" or "safetensors" when the file starts like one (a model that needs a
    converter), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    return None


def _looks_like_torch_file(path: Path) -> bool:
    """Does the file start like a torch.save file (zip archive or legacy pickle)?"""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return head[:2] == b"PK" or head[:1] == b"\x80" or head == b""


def load_model(path, build: Callable[[dict], torch.nn.Module], device="cpu",
               dtype: Optional[torch.dtype] = None):
    """Build a model from a checkpoint, on `device`, cast to `dtype` if given.

    Args:
        path: the checkpoint (`model.pth`).
        build: config dict -> an untrained model of that architecture (called under the meta
            device; `model.load_model` passes `Transformer(ModelArgs.from_dict(config))`).
    Returns:
        (model, ckpt_meta). Projection weights are laid out input-channel major for the kernels.
    Raises:
        CheckpointError: missing, corrupt, or shape-mismatched checkpoint, or an invalid config.
    """
    ckpt = load_checkpoint(path)
    spec = quantization_of(ckpt, path)
    try:
        with torch.device("meta"):
            model = build(ckpt["config"])
            if spec is not None:
                quantize_model(model, spec)  # the quantized structure, filled by the state dict
    except Exception as e:  # noqa: BLE001 - ZeroDivisionError, ValueError, TypeError, ...
        raise CheckpointError(f"checkpoint {path} has an invalid config "
                              f"({e.__class__.__name__}: {e}); convert it again") from None
    redo = "quantize its source again with quantize.py" if spec is not None else "convert it again"
    sd = ckpt["state_dict"]
    tied = bool(ckpt["config"].get("tie_embeddings")) and not (spec and spec.head)
    if tied:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match its config "
                              f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
                              f"; {redo}") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight
        missing = [k for k in missing if k != "output.weight"]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its config (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}); {redo}")
    for mod in model.modules():  # buffers created on meta: materialise them
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                mod._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device=device)
    meta = dict(ckpt.get("meta", {}))
    if spec is not None:
        meta["quantization"] = dict(ckpt["quantization"])
    return model, meta


def quantization_of(ckpt: dict, path="checkpoint") -> Optional[QuantSpec]:
    """The `QuantSpec` of a checkpoint dict (its "quantization" entry), None for a dense one.

    Raises:
        CheckpointError: a malformed entry.
    """
    entry = ckpt.get("quantization")
    if entry is None:
        return None
    try:
        return QuantSpec.from_dict(entry)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has a bad quantization entry ({e}); "
                              f"quantize the source checkpoint again with quantize.py") from None


def default_thresholds(checkpoint_path, for_writing: bool = False) -> Path:
    """The default calibration file beside a checkpoint: `thresholds.safetensors`; a
    quantized checkpoint's own is tagged with its format (`thresholds.int8.safetensors`,
    written by calibrate.py run on it) and measured better than the source model's (README,
    "Quantized weights"); reading falls back to the untagged file while it does not exist.
    """
    path = Path(checkpoint_path)
    plain = path.parent / "thresholds.safetensors"
    try:
        spec = quantization_of(load_checkpoint(path), path) if path.is_file() else None
    except CheckpointError:
        spec = None  # the loader reports it
    if spec is None:
        return plain
    tagged = path.parent / f"thresholds.{spec.wformat}.safetensors"
    return tagged if for_writing or tagged.exists() else plain


def greedy_beside(thresholds_path, for_writing: bool = False, kind: str = "greedy") -> Path:
    """The allocation file of `kind` ("greedy": teal.greedy, "tuned": teal.budgets) that goes
    with a calibration file: `<kind><tag>.json` for `thresholds<tag>.safetensors` (tag e.g.
    ".int8"), else `<kind>.json`, in its folder; reading falls back to `<kind>.json` while
    the tagged one does not exist."""
    path = Path(thresholds_path)
    plain = path.parent / f"{kind}.json"
    name = path.name
    if not (name.startswith("thresholds.") and name.endswith(".safetensors")) or name == "thresholds.safetensors":
        return plain
    tagged = path.parent / (kind + name[len("thresholds"):-len(".safetensors")] + ".json")
    return tagged if for_writing or tagged.exists() else plain
