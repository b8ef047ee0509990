"""Compatibility shim for Triton's CPU interpreter (TRITON_INTERPRET=1) with NumPy >= 2.4.

The interpreter stores every scalar as a 1-element 1-D numpy array and implements
``tensor.__index__`` as ``int(array)``; NumPy 2.4 turned that deprecated conversion into a
TypeError, which breaks any kernel with a run-time loop bound (``range(lo, hi, STEP)``).
We wrap the interpreter's patch hook so ``__index__`` reads the single element instead.
Applied by teal.kernels.launch only when our kernels were decorated for the interpreter;
a no-op when the interpreter already works.
"""

from __future__ import annotations

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - layout of other Triton versions
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None:  # pragma: no cover
        return

    def _index(self):
        return int(self.handle.data.reshape(-1)[0])

    def _patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    _interp._patch_lang_tensor = _patched
