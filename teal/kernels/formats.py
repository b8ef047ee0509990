"""Weight formats of the sparse GEMV kernels (host side, pure torch).

A format says how a projection's weight is stored and which kernel branch loads it (the
WFMT constexpr of `teal.kernels.common.load_weight_tile` / `scale_output`).  Every format
keeps the weight input-channel major, so skipping an input channel skips its stored bytes.

- "dense": ``wt = W.t()`` contiguous (K, N) in the activation dtype (bf16/fp16); no scales.

The next formats plug in here and in those two Triton helpers, with no new kernels:
"int8" (int8 codes (K, N), one fp32 scale per output column, applied to the fp32 sums) and
"int4" (two codes per byte along K, one scale per group of GROUP input channels and output
column, so a group's scales are read only when one of its channels is kept).
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

    def check(self, weight: torch.Tensor, scales: Optional[torch.Tensor], K: int,
              dtype: torch.dtype) -> int:
        """Validate a weight of this format for K input channels and activations of `dtype`;
        return N (output columns).

        Raises:
            ValueError: wrong rank, dtype, K, layout or device, naming the fix.
        """
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


FORMATS = {"dense": WeightFormat("dense", 0)}


def get_format(name: str) -> WeightFormat:
    """The weight format called `name`.

    Raises:
        ValueError: an unknown format (the message lists the known ones).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; implemented: {', '.join(FORMATS)}") from None
