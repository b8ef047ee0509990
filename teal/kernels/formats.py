"""Weight formats of the sparse GEMV kernels (host side, pure torch).

A format says how a projection's weight is stored and which kernel branch loads it (the
WFMT constexpr of `teal.kernels.common.load_weight_tile` / `scale_output`).  Every format
keeps the weight input-channel major, so skipping an input channel skips its stored bytes.

- "dense" (WFMT 0): ``wt = W.t()`` contiguous (K, N) in the activation dtype; no scales.
- "int8" (WFMT 1): int8 codes (K, N), fp32 scales (N,), one per output column, applied to
  the fp32 sums in the epilogue.
- "int4-g32" / "int4-g64" / "int4-g128" (WFMT 2, GROUP 32/64/128): uint8 (K, N / 2), two
  codes per byte along N (column 2j low nibble, 2j + 1 high), so a row is still one input
  channel; bf16 scales (ceil(K / GROUP), 4, N / 2) holding, per group of GROUP input
  channels, the scales and biases of the even and of the odd columns by byte column (rows
  s_even, s_odd, b_even, b_odd), read only for a group with a kept channel; every segment's
  width must be even.
The codes and scales come from `teal.quant` (which documents the quantizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["WeightFormat", "FORMATS", "get_format"]


@dataclass(frozen=True)
class WeightFormat:
    """Attributes: name; wfmt: the kernels' WFMT constexpr; group: channels per scale group
    along K (0: none)."""

    name: str
    wfmt: int
    group: int = 0

    @property
    def quantized(self) -> bool:
        return self.wfmt != 0

    def storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of the stored weight for activations of `dtype`."""
        return {0: dtype, 1: torch.int8, 2: torch.uint8}[self.wfmt]

    def columns_per_row(self, n: int) -> int:
        """Stored entries per weight row for N = n output columns (int4: n / 2)."""
        return n // 2 if self.wfmt == 2 else n

    def scale_shape(self, K: int, N: int) -> Optional[tuple]:
        """Shape of the scales for a (K, N) weight (None: no scales)."""
        if self.wfmt == 1:
            return (N,)
        if self.wfmt == 2:
            return (-(-K // self.group), 4, N // 2)
        return None

    def scale_dtype(self) -> Optional[torch.dtype]:
        return {0: None, 1: torch.float32, 2: torch.bfloat16}[self.wfmt]

    def check(self, weight: torch.Tensor, scales: Optional[torch.Tensor], K: int,
              dtype: torch.dtype) -> int:
        """Validate a weight of this format for K input channels and activations of `dtype`;
        return N (output columns).

        Raises:
            ValueError: wrong rank, dtype, K, layout or device, naming the fix.
        """
        if self.quantized:
            return self._check_quantized(weight, scales, K)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"wt must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"wt must be 2-D (K, N) = W.t() (input-channel major), got shape "
                             f"{tuple(weight.shape)}")
        if weight.dtype != dtype:
            raise ValueError(f"wt.dtype ({weight.dtype}) must equal x.dtype ({dtype}) for the "
                             f"{self.name} weight format")
        if weight.shape[0] != K:
            raise ValueError(f"K mismatch: x has {K} input channels but wt has shape "
                             f"{tuple(weight.shape)} (expected (K, N) = W.t(), i.e. "
                             f"wt.shape[0] == x.shape[-1])")
        if weight.shape[1] == 0:
            raise ValueError("wt has N = 0 output columns")
        if not weight.is_contiguous():
            raise ValueError(f"wt must be contiguous (K, N) row-major (= W.t().contiguous()); "
                             f"got strides {weight.stride()} for shape {tuple(weight.shape)}")
        if scales is not None:
            raise ValueError(f"the {self.name} weight format has no scales; got a scales tensor")
        return weight.shape[1]

    def _check_quantized(self, weight, scales, K: int) -> int:
        want = self.storage_dtype(torch.bfloat16)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != want:
            raise ValueError(f"the {self.name} format stores its weight as {want} (K, N"
                             f"{' / 2' if self.wfmt == 2 else ''}) codes (teal.quant); got "
                             f"{getattr(weight, 'dtype', type(weight).__name__)} "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        if weight.shape[0] != K or weight.shape[1] == 0 or not weight.is_contiguous():
            raise ValueError(f"{self.name} codes must be contiguous with K = {K} rows (input-"
                             f"channel major), got shape {tuple(weight.shape)} strides "
                             f"{weight.stride()}")
        N = weight.shape[1] * (2 if self.wfmt == 2 else 1)
        shape, sdt = self.scale_shape(K, N), self.scale_dtype()
        if (not isinstance(scales, torch.Tensor) or tuple(scales.shape) != shape
                or scales.dtype != sdt or not scales.is_contiguous()):
            raise ValueError(f"the {self.name} format needs contiguous {sdt} scales of shape "
                             f"{shape}; got {getattr(scales, 'dtype', None)} "
                             f"{tuple(getattr(scales, 'shape', ())) if scales is not None else None}")
        return N


FORMATS = {"dense": WeightFormat("dense", 0), "int8": WeightFormat("int8", 1),
           **{f"int4-g{g}": WeightFormat(f"int4-g{g}", 2, g) for g in (32, 64, 128)}}


def get_format(name: str) -> WeightFormat:
    """The weight format called `name`.

    Raises:
        ValueError: an unknown format (the message lists the known ones).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; implemented: {', '.join(FORMATS)}") from None
