"""Weight dtype names, as the command lines and checkpoint metadata spell them."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["DTYPES", "dtype_name", "parse_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype without the `torch.` prefix (torch.bfloat16 -> "bfloat16").

    Raises:
        TypeError: `dtype` is not a `torch.dtype`.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"expected a torch.dtype, got {type(dtype).__name__}")
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, allowed: Optional[Iterable[str]] = None) -> torch.dtype:
    """The torch dtype of a name of `DTYPES` ("float32", "bfloat16", "float16").

    Args:
        name: the dtype's name.
        allowed: the names accepted here (a subset of `DTYPES`); default all of them.

    Raises:
        ValueError: `name` is not an accepted name (one line listing the valid choices), or
            `allowed` names a dtype missing from `DTYPES`.
    """
    choices = list(DTYPES) if allowed is None else list(allowed)
    unknown = [c for c in choices if c not in DTYPES]
    if unknown:
        raise ValueError(f"allowed dtype names {unknown} are not in teal.dtypes.DTYPES")
    if name not in choices:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(choices)}")
    return DTYPES[name]
