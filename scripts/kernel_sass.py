#!/usr/bin/env python
"""Compile the sparse GEMV kernels for a GPU offline (no GPU needed) and dump their SASS.

    python scripts/kernel_sass.py --out sass/          # every H200 table row, sm_90
    python scripts/kernel_sass.py --shapes 4096x6144 --arch 90 --out sass/

For each call (a table row's config at its shape, bf16), the launcher runs with CPU tensors
and the kernel launch is intercepted: the arguments are specialised as Triton's JIT would
specialise them (16-byte divisibility, ints equal to 1), compiled for the target with the
ptxas that ships with Triton, and the SASS is written to `<out>/<call>.sass`, with
registers, spills and shared memory printed.  Use it to check, before spending device time,
that a change leaves the adopted kernels' machine code as it was (diff the .sass files of
two commits), or what a new kernel compiles to (LDGSTS = cp.async pipelined loads, HMMA =
tensor-core products, LDG.E.128 = 16-byte loads).

Needs Triton with the NVIDIA backend (the Linux wheel); the multiprocessor count of the
target is given by --sms (the split-K grid depends on it; 132 = H200).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch

from teal.io import atomic_write_text


def compile_call(fn, args, kwargs, arch: int):
    """Compile one intercepted launch `fn[grid](*args, **kwargs)` for sm_<arch>; returns
    Triton's compiled kernel (asm["cubin"], n_regs, n_spills, metadata.shared)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


class Recorder:
    """Stands in for `kernel[grid]`: records (kernel, args, kwargs) instead of launching."""

    def __init__(self, calls: list):
        self.calls = calls

    def patch(self, kernel):
        calls = self.calls

        class _Indexed:
            def __getitem__(self, grid):
                return lambda *a, **k: calls.append((kernel, a, k))
        return _Indexed()


def cuobjdump(cubin: bytes, workdir: Path, flag: str) -> str:
    """`cuobjdump <flag>` of a cubin (the cuobjdump that ships with Triton)."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    try:
        return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        path.unlink()


def resources(cubin: bytes, workdir: Path) -> dict:
    """{REG, STACK, SHARED, LOCAL, ...} of the kernel (cuobjdump -res-usage)."""
    text = cuobjdump(cubin, workdir, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", text)}


def normalise(sass: str) -> str:
    """SASS without addresses, encodings and header lines (for diffs between builds)."""
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;?\s*(/\*.*\*/)?\s*$", line)
        if m and m.group(1):
            lines.append(m.group(1).rstrip(" ;"))
    return "\n".join(lines) + "\n"


# segment widths of the fused q/k/v rows (Llama-3-8B, Llama-2-7B); other seg rows: one segment
QKV_SIZES = {6144: (4096, 1024, 1024), 12288: (4096, 4096, 4096)}
KERNELS = (("masked", "masked_gemv_kernel"), ("dot", "dot_gemv_kernel"),
           ("lists", "list_gemv_kernel"), ("lists", "keep_list_kernel"))


def calls_for(rows):
    """(label, kind, K, sizes, config) for every table row (gated: sizes (F, F))."""
    out = []
    for r in rows:
        sizes = (r.N, r.N) if r.kind == "gated" else QKV_SIZES.get(r.N, (r.N,))
        label = f"{r.kind}_{r.K}x{r.N}_{r.config.algo}{'_inline' if r.config.inline else ''}"
        out.append((label, r.kind, r.K, sizes, r.config))
    return out


def main(argv=None) -> int:
    from teal.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the .sass files")
    ap.add_argument("--arch", type=int, default=90, choices=[80, 86, 89, 90],
                    help="compute capability (the kernels need >= 80; 90 = Hopper)")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors of the target GPU")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                    help="activation dtype of the compiled kernels")
    ap.add_argument("--shapes", nargs="*", default=None, help="only rows of these KxN shapes (default: every row of the table)")
    args = ap.parse_args(argv)
    if args.sms < 1:
        ap.error(f"--sms must be >= 1, got {args.sms}")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file; pass a folder")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        sys.exit("error: this Triton has no NVIDIA backend (install the Linux wheel of triton)")

    import importlib

    from teal.kernels import launch
    from teal.kernels.dispatch import DEFAULT_TABLE, resolve

    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    calls: list = []
    rec = Recorder(calls)
    for mod_name, name in KERNELS:
        mod = importlib.import_module(f"teal.kernels.{mod_name}")
        setattr(mod, name, rec.patch(getattr(mod, name)))
    rows = [r for r in DEFAULT_TABLE.rows if not args.shapes or f"{r.K}x{r.N}" in args.shapes]
    if not rows:
        sys.exit(f"error: no table row has a shape in {args.shapes}; the table's shapes: "
                 f"{', '.join(sorted({f'{r.K}x{r.N}' for r in DEFAULT_TABLE.rows}))}")
    print(f"{'call':34s} {'kernel':18s} {'regs':>5s} {'local':>6s} {'smem':>7s}")
    for label, kind, K, sizes, cfg in calls_for(rows):
        lc = resolve(cfg, kind, K, sizes, args.sms)
        N = sum(sizes)
        x = torch.randn(K).to(dtype)
        w = torch.empty(K, N, dtype=dtype)
        t = torch.ones(2 if kind == "gated" else len(sizes))
        calls.clear()
        launch.launch_gemv(x, w, None, t, list(sizes), kind == "gated", "dense", lc)
        for fn, a, k in calls:
            kern = compile_call(fn, a, k, args.arch)
            name = f"{label}_{fn.__name__}"
            cubin = kern.asm["cubin"]
            atomic_write_text(args.out / f"{name}.sass", normalise(cuobjdump(cubin, args.out, "-sass")))
            res = resources(cubin, args.out)
            print(f"{label:34s} {fn.__name__:18s} {res.get('REG', -1):5d} {res.get('LOCAL', 0):6d} "
                  f"{kern.metadata.shared:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
