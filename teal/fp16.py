"""float16 safety: refuse (fall back to bfloat16) where calibration saw activations beyond the
float16 range, and say so when a float16 run still produced non-finite values.

float16 tops out at 65504; bfloat16 has float32's range. A model whose residual stream or
projection inputs reach beyond that (large models' "massive activations") gives inf, then NaN
logits in float16 with no error anywhere. Two checks:

- before: `choose_dtype` reads the max |x| that calibration records per input and per block
  (`teal.thresholds.Calibration.fp16_overflow`) and returns bfloat16 with a message when
  float16 is unsafe;
- after: `OverflowGuard` (host side, forward hooks; the kernels are not changed) records on
  the device whether any projection module or the output head stored a non-finite float16
  value, and `check()` names the first such module (one host sync, at the end of a run).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from teal.sparse_linear import sparse_linears

__all__ = ["choose_dtype", "OverflowGuard"]


def choose_dtype(dtype: torch.dtype, thresholds_path, model_args: dict) -> tuple[torch.dtype,
                                                                                  Optional[str]]:
    """The activation dtype to run in, and a one-line message when it is not `dtype`.

    Only float16 is checked: with a calibration file whose recorded max |x| is beyond the
    safe float16 range, bfloat16 is returned with the reason. Without a file (or an old one
    without the record) float16 is kept with a note that only the run-time check applies.

    Raises:
        teal.thresholds.ThresholdsError: a corrupt calibration file, or one for another model.
    """
    if dtype != torch.float16:
        return dtype, None
    from teal.thresholds import Calibration
    path = Path(thresholds_path)
    if not path.is_file():
        return dtype, (f"note: no calibration file {path} to check the float16 range against; "
                       f"non-finite outputs will be reported after the run")
    why = Calibration.load(path, model_args).fp16_overflow()
    if why is None:
        return dtype, None
    if "no max |x| record" in why:
        return dtype, f"note: {why}; non-finite outputs will be reported after the run"
    return torch.bfloat16, f"warning: float16 refused: {why}; running in bfloat16 instead"


class OverflowGuard:
    """Forward hooks that flag non-finite float16 outputs of every projection module and the
    output head, without a host sync per step. Use as a context manager; `check()` after the
    run returns a one-line message naming the first module that overflowed, or None.

    Args:
        model: a `model.Transformer`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = [(name, m) for name, m in model.named_modules()
                        if m in set(sparse_linears(model)) or name == "output"]
        device = next(model.parameters()).device
        self.flags = torch.zeros(len(self.modules), dtype=torch.bool, device=device)
        self._handles = []

    def _hook(self, i: int):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor) and out.dtype == torch.float16:
                self.flags[i] |= ~torch.isfinite(out).all()
        return hook

    def __enter__(self):
        for i, (_, m) in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def check(self) -> Optional[str]:
        """None, or 'warning: ...' naming the first module whose float16 output was not finite."""
        bad = self.flags.nonzero().flatten().tolist()
        if not bad:
            return None
        names = [self.modules[i][0] for i in bad]
        return (f"warning: float16 overflow: non-finite outputs of {names[0]}"
                f"{f' and {len(names) - 1} more modules' if len(names) > 1 else ''}; the "
                f"generated text is unreliable, run with --dtype bfloat16")
