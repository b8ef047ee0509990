"""What the converters share: their error base class, the state-dict check, output writing,
and the per-head RoPE row permutation between Hugging Face and our q/k layouts."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Union

import torch

from teal.checkpoint import save_checkpoint, state_dict_shapes
from teal.io import atomic_write_bytes, atomic_write_text

__all__ = ["ConversionError", "hf_to_interleaved", "interleaved_to_hf", "check_state_dict",
           "check_out_dir", "write_checkpoint_and_tokenizer"]


class ConversionError(ValueError):
    """A source (GGUF file, Hugging Face folder) that cannot be converted; the message names
    the fix. `GGUFError` and `HFConversionError` derive from it."""


# ----------------------------------------------------------------------------- RoPE order

def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k from Hugging Face's rotate-half order to interleaved pairs (model.py's).

    Per head, HF orders the rows [a_0..a_{d/2-1}, b_0..b_{d/2-1}] (rotate-half pairs
    (a_i, b_i)); the interleaved order is [a_0, b_0, a_1, b_1, ...].

    Args:
        w: (n_heads * head_dim, in_features) weight, head_dim even.
        n_heads: heads of `w` (query heads for q_proj, KV heads for k_proj).

    Returns:
        A tensor of the same shape with the rows of each head reordered.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_to_interleaved` (interleaved pairs -> rotate-half order); same args."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------- checks

def check_state_dict(sd: Mapping[str, torch.Tensor], config: dict, source: str,
                     error: type = ConversionError) -> None:
    """The state dict has exactly the keys and shapes of `teal.checkpoint.state_dict_shapes`.

    Args:
        sd: our state dict (with `output.weight` also when tied).
        config: its `ModelArgs` dict.
        source: what the weights came from, for the messages ("GGUF", "checkpoint").
        error: the exception class to raise (a ValueError subclass taking a message).

    Raises:
        error: an invalid config, missing tensors, a wrong shape, or extra tensors (e.g.
            more layers than the config says), with the fix in the message.
    """
    try:
        want = state_dict_shapes(config)
    except ValueError as e:
        raise error(f"the {source} config is invalid ({e})") from None
    missing = [k for k in want if k not in sd]
    if missing:
        raise error(f"{source} lacks tensors for {missing[:3]} (of {len(missing)} missing)")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise error(f"tensor {k} has shape {tuple(sd[k].shape)}, expected {shape}")
    extra = [k for k in sd if k not in want]
    if extra:
        layers = {int(m.group(1)) for k in extra if (m := re.match(r"layers\.(\d+)\.", k))}
        if layers:
            raise error(f"the weights have {max(layers) + 1} layers but the config says "
                        f"{config['n_layer']} (extra tensors such as {extra[0]!r}); the "
                        f"{source} is inconsistent, download it again")
        raise error(f"{source} has unexpected tensors {extra[:3]} for its config")


def check_out_dir(out_dir, error: type = ConversionError, flag: str = "--out-dir") -> None:
    """Raise `error` (one line) unless `out_dir` is or can be created as a writable folder.

    Args:
        out_dir: the output folder.
        error: the exception class to raise.
        flag: the command-line flag named in the message.
    """
    from teal.paths import OutputPathError, check_output_dir
    try:
        check_output_dir(out_dir, flag)
    except OutputPathError as e:
        raise error(str(e)) from None


# ----------------------------------------------------------------------------- writing

def write_checkpoint_and_tokenizer(out_dir, config: dict, sd: dict, meta: dict,
                                   tokenizer_files: Mapping[str, Union[bytes, str]]) -> Path:
    """Write the tokenizer file(s), then model.pth, into `out_dir` (created if missing).

    model.pth is written last: its presence marks a finished conversion. If writing it fails
    or is interrupted, tokenizer files created here are removed again, so an interrupted
    conversion leaves neither behind.

    Args:
        out_dir: output folder.
        config, sd, meta: the checkpoint's parts (see `teal.checkpoint.save_checkpoint`).
        tokenizer_files: {file name: content}, bytes or str (written as UTF-8).

    Returns:
        The path of model.pth.

    Raises:
        OSError: a file cannot be written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "model.pth"
    created = []
    try:
        for fname, data in tokenizer_files.items():
            path = out_dir / fname
            if not path.exists():
                created.append(path)
            (atomic_write_text if isinstance(data, str) else atomic_write_bytes)(path, data)
        save_checkpoint(ckpt_path, config, sd, meta)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return ckpt_path
