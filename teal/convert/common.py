"""What the converters share: their error base class, the state-dict check, output writing,
and the per-head RoPE row permutation between Hugging Face and our q/k layouts."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from teal.checkpoint import save_checkpoint, state_dict_shapes
from teal.io import atomic_write_bytes, atomic_write_text

__all__ = ["ConversionError", "hf_to_interleaved", "interleaved_to_hf", "check_state_dict",
           "check_source_tensors", "check_out_dir", "write_checkpoint_and_tokenizer"]


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


_LAYER_RE = re.compile(r"(?<=[.])(\d+)(?=[.])")


def _grouped(names) -> list[str]:
    """Names with their layer index folded: 'blk.{0-29}.attn_q.bias' for 30 of them."""
    groups: dict = {}
    for n in names:
        m = _LAYER_RE.search(n)
        key = _LAYER_RE.sub("{}", n, count=1) if m else n
        groups.setdefault(key, []).append(int(m.group(1)) if m else None)
    out = []
    for key, idx in groups.items():
        idx = sorted(i for i in idx if i is not None)
        if not idx:
            out.append(key)
            continue
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append(key.replace("{}", "{" + ",".join(runs) + "}" if len(idx) > 1 else runs[0]))
    return out


def _why(key: str, config: Mapping) -> str:
    """Which config fields give the expected shape of `key`."""
    c = config
    hd = f"head_dim {c.get('head_dim')}"
    for part, why in (("q_proj", f"n_head {c.get('n_head')} x {hd}, dim {c.get('dim')}"),
                      ("k_proj", f"n_local_heads {c.get('n_local_heads')} x {hd}"),
                      ("v_proj", f"n_local_heads {c.get('n_local_heads')} x {hd}"),
                      ("o_proj", f"dim {c.get('dim')}, n_head {c.get('n_head')} x {hd}"),
                      ("gate_proj", f"intermediate_size {c.get('intermediate_size')}"),
                      ("up_proj", f"intermediate_size {c.get('intermediate_size')}"),
                      ("down_proj", f"intermediate_size {c.get('intermediate_size')}"),
                      ("tok_embeddings", f"vocab_size {c.get('vocab_size')}"),
                      ("output", f"vocab_size {c.get('vocab_size')}")):
        if f"{part}." in key or key.startswith(part):
            return f" [{why}]"
    return f" [dim {c.get('dim')}]"


def check_source_tensors(shapes: Mapping[str, tuple], our_name: Callable[[str], Optional[str]],
                         config: dict, source: str, error: type = ConversionError) -> dict:
    """Check a source's tensor names and shapes against its config before any tensor is read
    or reshaped; every disagreement is named, in one line.

    Args:
        shapes: {source tensor name: shape in nn.Linear (out, in) order}.
        our_name: source name -> our key, None for a tensor to drop; raising `error` marks the
            name as unmapped.
        config: the `ModelArgs` dict read from the source's config; with
            `tie_embeddings` False and no output head among the tensors, it is set True.
        source: what the weights come from, for the message ("GGUF file x", "folder y").
        error: the exception class to raise.

    Returns:
        {our key: shape}.

    Raises:
        error: one line listing every problem: config values that do not fit together (head
            counts that do not divide, odd head_dim), every unmapped tensor (grouped over
            layers), every tensor whose shape disagrees with the config (and the fields that
            give the expected shape), missing and surplus tensors.
    """
    problems, unmapped, ours = [], [], {}
    for name, shape in shapes.items():
        try:
            key = our_name(name)
        except error:
            unmapped.append(name)
            continue
        if key is not None:
            ours[key] = tuple(int(x) for x in shape)
    if not config.get("tie_embeddings") and "output.weight" not in ours:
        config["tie_embeddings"] = True
    if config.get("tie_embeddings") and "tok_embeddings.weight" in ours:
        ours.setdefault("output.weight", ours["tok_embeddings.weight"])
    n_head, n_kv, hd = config.get("n_head"), config.get("n_local_heads"), config.get("head_dim")
    if isinstance(n_head, int) and isinstance(n_kv, int) and n_kv > 0 and n_head % n_kv:
        problems.append(f"n_head {n_head} is not a multiple of n_local_heads {n_kv}")
    if isinstance(hd, int) and hd % 2:
        problems.append(f"head_dim {hd} is odd (RoPE rotates pairs)")
    try:
        want = state_dict_shapes(config)
    except ValueError as e:
        problems.append(f"config: {e}")
        want = {}
    if unmapped:
        problems.append(f"{len(unmapped)} unmapped tensors: {', '.join(_grouped(unmapped))}")
    if want:
        bad = {}
        for k, shape in want.items():
            if k in ours and ours[k] != shape:
                desc = f"{ours[k]} where the config gives {shape}{_why(k, config)}"
                bad.setdefault(desc, []).append(k)
        for desc, keys in bad.items():
            problems.append(f"{', '.join(_grouped(keys))} has shape {desc}")
        missing = [k for k in want if k not in ours]
        if missing:
            problems.append(f"missing {', '.join(_grouped(missing))}")
        extra = [k for k in ours if k not in want]
        if extra:
            layers = {int(m.group(1)) for k in extra if (m := re.match(r"layers\.(\d+)\.", k))}
            more = (f" (the weights have {max(layers) + 1} layers but the config says "
                    f"{config['n_layer']})" if layers else "")
            problems.append(f"surplus {', '.join(_grouped(extra))}{more}")
    if problems:
        raise error(f"{source} disagrees with its config: {'; '.join(problems)}")
    return ours


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
