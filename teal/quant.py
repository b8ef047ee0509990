"""Weight-only int8 / int4 quantization of the TEAL projections (pure torch, any device).

Both formats keep the weight input-channel major, like the dense kernels' ``wt = W.t()``
(K, N): row k holds input channel k's codes for every output column, so a dropped input
channel (TEAL's zero activation) skips its stored bytes.

- int8 (`quantize_int8`): symmetric, one fp32 scale per output column:
  ``s_n = max_k |W[n, k]| / 127``, ``q = clamp(round(W / s), -127, 127)``; codes int8 (K, N);
  ``W ~= q * s``.
- int4 (`quantize_int4`): asymmetric (min/max) per group of `group` consecutive input
  channels and output column: ``s = (max - min) / 15`` and ``b = min``, both rounded to
  bf16 first, then ``q = clamp(round((W - b) / s), 0, 15)``; ``W ~= q * s + b``.
  Codes are packed two per byte along N: byte (k, j) holds column 2j in its low nibble and
  2j + 1 in its high nibble (uint8 (K, N / 2)), so a row is still one input channel.
  Scales: bf16 (ceil(K / group), 4, N / 2): for group g, rows [s of the even columns,
  s of the odd columns, b of the even columns, b of the odd columns], each indexed by byte
  column j (columns 2j and 2j + 1), so a kernel reads each row contiguously for the bytes it
  loaded (`int4_scale_bias` gives the plain (G, N) scale and bias). When K is not
  a multiple of the group size the last group holds the remaining K % group channels (as if
  padded with zero channels; nothing is stored for the padding).

Dequantization (`dequantize`) is exact: it computes the values the kernels compute (codes
times fp32 scales, plus the fp32 bias), so the float64 references of the tests use it.
Source: per-channel int8 and group-wise min/max int4 weight-only quantization as in
gpt-fast (`quantize.py`) and GPTQ/AWQ-style group sizes (32/64/128).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["QuantSpec", "MODES", "GROUP_SIZES", "quantize_int8", "quantize_int4", "quantize",
           "dequantize", "int4_scale_bias", "pack_int4", "unpack_int4", "format_name", "parse_format"]

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
INT4_SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class QuantSpec:
    """What a quantized checkpoint holds (its "quantization" entry).

    Attributes:
        mode: "int8" or "int4".
        group_size: int4: input channels per scale group (32, 64 or 128); int8: 0.
        head: the output head (lm_head) is quantized too.
    """

    mode: str
    group_size: int = 0
    head: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.mode == "int8" and self.group_size not in (0, None):
            raise ValueError("int8 has one scale per output channel: no group size (got "
                             f"{self.group_size})")

    @property
    def wformat(self) -> str:
        """The kernels' weight-format name (teal.kernels.formats)."""
        return format_name(self.mode, self.group_size)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "group_size": int(self.group_size or 0), "head": bool(self.head)}

    @classmethod
    def from_dict(cls, d) -> "QuantSpec":
        """Raises ValueError for a malformed entry."""
        if not isinstance(d, dict) or "mode" not in d:
            raise ValueError(f"a quantization entry needs a 'mode', got {d!r}")
        group, head = d.get("group_size") or 0, d.get("head", False)
        if isinstance(group, bool) or not isinstance(group, int):
            raise ValueError(f"'group_size' must be an integer, got {group!r}")
        if not isinstance(head, bool):
            raise ValueError(f"'head' must be true or false, got {head!r}")
        return cls(str(d["mode"]), group, head)


def format_name(mode: str, group_size: int = 0) -> str:
    """"int8", or "int4-g<group_size>"; "dense" for mode "dense"."""
    if mode in ("dense", "int8"):
        return mode
    return f"int4-g{int(group_size)}"


def parse_format(name: str) -> tuple[str, int]:
    """(mode, group_size) of a format name: "dense" -> ("dense", 0), "int4-g128" -> ("int4", 128).

    Raises:
        ValueError: not a known format name.
    """
    if name in ("dense", "int8"):
        return name, 0
    if name.startswith("int4-g") and name[6:].isdigit() and int(name[6:]) in GROUP_SIZES:
        return "int4", int(name[6:])
    raise ValueError(f"unknown weight format {name!r}; use dense, int8 or int4-g{{32,64,128}}")


def _check_weight(w: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize takes a floating-point (N, K) weight, got "
                         f"{getattr(w, 'shape', type(w).__name__)} {getattr(w, 'dtype', '')}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds inf or NaN; it cannot be quantized")
    return w.detach().float()


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per output channel.

    Args:
        w: (N, K) floating weight (nn.Linear layout).
    Returns:
        codes: int8 (K, N) contiguous (input-channel major), in [-127, 127];
        scales: fp32 (N,), ``W[n, k] ~= codes[k, n] * scales[n]`` (an all-zero row: scale 1).
    Raises:
        ValueError: not a finite 2-D floating tensor.
    """
    wf = _check_weight(w)
    amax = wf.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.t().contiguous(), scales.contiguous()


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 codes (K, N) in [0, 15] (N even) into uint8 (K, N / 2): column 2j in the
    low nibble of byte j, 2j + 1 in the high nibble."""
    if q.shape[1] % 2:
        raise ValueError(f"int4 packing needs an even number of output columns, got {q.shape[1]}")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: uint8 (K, N / 2) -> uint8 codes (K, N)."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric (min/max) int4 with one (scale, bias) per group of `group_size` input
    channels and output column.

    Args:
        w: (N, K) floating weight, N even.
        group_size: 32, 64 or 128; the last group holds K % group_size channels when K is not
            a multiple.
    Returns:
        packed: uint8 (K, N / 2) (see module doc); scales: bf16 (ceil(K / group), 4, N / 2)
        (see module doc): ``W[n, k] ~= q[k, n] * s[g, n] + b[g, n]`` with g = k // group_size
        and (s, b) = `int4_scale_bias(scales)`.
    Raises:
        ValueError: a bad weight, an odd N or a group size not in GROUP_SIZES.
    """
    wf = _check_weight(w)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    N, K = wf.shape
    if N % 2:
        raise ValueError(f"int4 needs an even number of output channels, got {N}")
    n_groups = -(-K // group_size)
    pad = n_groups * group_size - K
    wt = wf.t()                                       # (K, N)
    # per-group min/max over the real channels only (the padding is not part of any group)
    wp = torch.cat([wt, wt[-1:].expand(pad, N)]) if pad else wt
    g = wp.reshape(n_groups, group_size, N)
    lo, hi = g.amin(dim=1), g.amax(dim=1)             # (G, N)
    s = ((hi - lo) / 15.0).to(INT4_SCALE_DTYPE).float()
    b = lo.to(INT4_SCALE_DTYPE).float()
    s = torch.where(s > 0, s, torch.zeros_like(s))
    safe = torch.where(s > 0, s, torch.ones_like(s))
    rows = torch.arange(K, device=wf.device) // group_size
    q = torch.round((wt - b[rows]) / safe[rows]).clamp_(0, 15)
    q = torch.where(s[rows] > 0, q, torch.zeros_like(q))
    scales = torch.stack((s[:, 0::2], s[:, 1::2], b[:, 0::2], b[:, 1::2]), dim=1)  # (G, 4, N/2)
    return pack_int4(q), scales.to(INT4_SCALE_DTYPE).contiguous()


def int4_scale_bias(scales: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 (scale, bias), each (G, N) in column order, of int4 scales (G, 4, N / 2)."""
    sf = scales.float()
    G, N = sf.shape[0], 2 * sf.shape[2]
    return (torch.stack((sf[:, 0], sf[:, 1]), dim=-1).reshape(G, N),
            torch.stack((sf[:, 2], sf[:, 3]), dim=-1).reshape(G, N))


def quantize(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """`quantize_int8` or `quantize_int4` as `spec` says; returns (codes, scales)."""
    if spec.mode == "int8":
        return quantize_int8(w)
    return quantize_int4(w, spec.group_size)


def dequantize(wformat: str, codes: Tensor, scales: Tensor, K: Optional[int] = None) -> Tensor:
    """The weight a quantized format represents, input-channel major: fp32 (K, N).

    Args:
        wformat: "int8" or "int4-g<group>".
        codes, scales: as returned by `quantize_int8` / `quantize_int4`.
    Raises:
        ValueError: an unknown format.
    """
    mode, group = parse_format(wformat)
    if mode == "int8":
        return codes.float() * scales.float()[None, :]
    if mode != "int4":
        raise ValueError(f"{wformat!r} is not a quantized format")
    q = unpack_int4(codes).float()                    # (K, N)
    rows = torch.arange(q.shape[0], device=q.device) // group
    s, b = int4_scale_bias(scales)
    return q * s[rows] + b[rows]
