"""Algorithm "ballot": the sparse GEMV as a CUDA C++ kernel that reads only kept weight rows.

TEAL (arXiv 2408.14690, Section 4, Eq. 2-3) keeps input channel k iff ``|x_k| > t``; with the
input-channel-major weight ``wt = W.t()`` of shape (K, N), ``y = sum over kept k of x_k wt[k]``.
Triton has no warp vote, so its kernels either walk every row of a tile with masked loads (a
dropped row costs its instructions) or build kept-row lists through shared memory (a scan
and a barrier per program).  Here each warp reads 32 channels of x and one ``__ballot_sync``
gives their keep bits; the warp walks only the set bits, ``unroll`` rows at a time (that many
independent 16-byte loads per lane in flight, x broadcast by a shuffle): bytes and
instructions both follow the kept rows.  Split-K partials are summed through distributed
shared memory inside a thread-block cluster on compute capability 9.0+ (split <= 16 and what
the GPU can co-schedule), else with the Triton kernels' deterministic global tail and
self-resetting arrival counters.  Kernel source and layout: `cuda_gemv.cu` (bf16 / fp16, dense
weights; segments with their own thresholds; gated gate/up with the SwiGLU epilogue; scalar
or per-channel thresholds).

Build: the source is compiled on first use with the CUDA toolkit's ``nvcc`` (the one
``torch.utils.cpp_extension.CUDA_HOME`` finds, else ``nvcc`` on PATH) for the GPU's own
architecture into a shared library cached under ``~/.cache/teal-fast`` (written to a temp
file, then renamed), and loaded with ctypes: no torch headers, so the build takes seconds and
does not depend on the torch version.  Without nvcc, `available` is False and dispatch runs
the Triton config instead (`teal.kernels.dispatch.fit_device`), with one warning.

Numerics: products and sums in fp32 (each kept row's bf16/fp16 weights converted exactly),
one rounding to the activation dtype at the store; deterministic (fixed order in a warp, in
a block and across the split; the cluster and global reductions add in the same order, so
they give the same bits).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["available", "library", "launch", "fits", "max_cluster", "BLOCK_N", "UNROLLS",
           "MAX_WARPS", "MAX_CLUSTER", "COL_ALIGN"]

BLOCK_N = 256           # columns per block tile (32 lanes x 8 columns of 16 bytes)
UNROLLS = (4, 8)        # rows in flight per warp (GemvConfig.num_stages)
MAX_WARPS = 8
MAX_CLUSTER = 16        # blocks along K summed through distributed shared memory
COL_ALIGN = 8           # every segment a multiple of 8 columns (16-byte rows per lane)
CHUNK = 32              # channels per warp ballot (k_per_split is a multiple)
_SOURCE = Path(__file__).with_name("cuda_gemv.cu")
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}


def _nvcc() -> Optional[str]:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 (a broken toolkit probe means no toolkit)
        CUDA_HOME = None
    if CUDA_HOME:
        p = Path(CUDA_HOME) / "bin" / "nvcc"
        if p.exists():
            return str(p)
    return shutil.which("nvcc")


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "teal-fast"


@functools.lru_cache(maxsize=None)
def library(arch: str) -> Optional[ctypes.CDLL]:
    """The built kernel library for `arch` (e.g. "sm_90"), or None when it cannot be built
    (no nvcc, or the build failed: one warning says why; dispatch then runs Triton)."""
    src = _SOURCE.read_bytes()
    nvcc = _nvcc()
    if nvcc is None:
        warnings.warn("teal: nvcc not found, so the 'ballot' CUDA GEMV cannot be built; the "
                      "Triton kernels run instead (install the CUDA toolkit for the faster one)",
                      RuntimeWarning, stacklevel=3)
        return None
    tag = hashlib.sha256(src + arch.encode() + nvcc.encode()).hexdigest()[:16]
    out = _cache_dir() / f"ballot_gemv_{arch}_{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [nvcc, "-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", "-o", tmp,
               str(_SOURCE)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1][:200])
            os.replace(tmp, out)
        except Exception as e:  # noqa: BLE001 (any build failure: warn, run Triton)
            Path(tmp).unlink(missing_ok=True)
            warnings.warn(f"teal: building the 'ballot' CUDA GEMV failed ({e}); the Triton "
                          f"kernels run instead", RuntimeWarning, stacklevel=3)
            return None
    lib = ctypes.CDLL(str(out))
    f = lib.teal_ballot_gemv
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    f.argtypes = [P, P, P, P, P, P, I, L, L, L, I, ctypes.POINTER(L), I, I, I, I, I, I, P, I]
    f.restype = I
    lib.teal_ballot_max_cluster.argtypes = [I, I, I, I]
    lib.teal_ballot_max_cluster.restype = I
    return lib


def _arch(device: torch.device) -> str:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return f"sm_{major}{minor}"


def available(device) -> bool:
    """True if the ballot kernel can run on `device`: a CUDA GPU of compute capability >= 8.0
    whose library builds (or is cached)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(idx) < (8, 0):
        return False
    return library(_arch(device)) is not None


@functools.lru_cache(maxsize=None)
def max_cluster(device_index: int, num_warps: int, unroll: int, gated: bool, dtype_code: int) -> int:
    """The largest split (blocks along K, at most MAX_CLUSTER) the GPU `device_index` can run as
    one thread-block cluster for this launch shape; 0 below compute capability 9.0 or where the
    query fails (the global split-K tail runs then)."""
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return 0
    lib = library(_arch(torch.device("cuda", device_index)))
    if lib is None:
        return 0
    with torch.cuda.device(device_index):
        return max(0, min(MAX_CLUSTER, int(lib.teal_ballot_max_cluster(num_warps, unroll, int(gated),
                                                                        dtype_code))))


def fits(sizes: Sequence[int], dtype: torch.dtype, wformat: str) -> bool:
    """The kernel takes this call: dense bf16/fp16 weights, segments of multiples of 8
    columns, at most 4 segments."""
    return (wformat == "dense" and dtype in _DTYPES and 1 <= len(sizes) <= 4
            and all(int(s) % COL_ALIGN == 0 for s in sizes))


def launch(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, sizes: Sequence[int],
           gated: bool, k_per_split: int, num_warps: int, unroll: int, out: torch.Tensor,
           part: torch.Tensor, cnt: torch.Tensor, cluster: Optional[bool] = None) -> torch.Tensor:
    """Launch the kernel on the current stream (inputs validated by teal.kernels._checks).

    Args:
        x: (K,) contiguous bf16/fp16. wt: (K, N) in x's dtype, row stride a multiple of 8,
            16-byte aligned. thresholds: fp32 (S,) or (S, K) (gated: rows gate, up).
        sizes: segment widths (gated: (F, F)), multiples of 8. k_per_split: channels per
            block along K (a multiple of 32). num_warps: 1..8. unroll: rows in flight per
            warp, 4 or 8.
        out: (N,) (gated: (F,)) in x's dtype. part: fp32 workspace of >= split * N (gated:
            2F) floats when K > k_per_split. cnt: int32 counters, >= the column tiles, zero.
        cluster: sum the split through a thread-block cluster (True), the global tail
            (False), or the cluster wherever `max_cluster` allows it (None).
    Returns:
        out.
    Raises:
        ValueError: a shape, alignment or option the kernel does not take, or no library.
        RuntimeError: the CUDA launch failed.
    """
    if x.dtype not in _DTYPES or wt.dtype != x.dtype:
        raise ValueError(f"the ballot kernel takes bf16/fp16 x and weights of x's dtype, got "
                         f"{x.dtype} / {wt.dtype}")
    if not fits(sizes, x.dtype, "dense"):
        raise ValueError(f"the ballot kernel needs 1..4 segments of multiples of {COL_ALIGN} "
                         f"columns, got {list(sizes)}; resolve the launch with KernelPolicy.launch")
    if wt.stride(1) != 1 or wt.stride(0) % COL_ALIGN or wt.data_ptr() % 16:
        raise ValueError(f"the ballot kernel needs a row-major weight with a row stride of a "
                         f"multiple of {COL_ALIGN} elements, 16-byte aligned; got strides "
                         f"{wt.stride()}")
    if k_per_split % CHUNK or k_per_split < CHUNK or unroll not in UNROLLS or not 1 <= num_warps <= MAX_WARPS:
        raise ValueError(f"ballot launch: k_per_split {k_per_split} (a multiple of {CHUNK}), unroll "
                         f"{unroll} (one of {UNROLLS}), num_warps {num_warps} (1..{MAX_WARPS})")
    lib = library(_arch(x.device))
    if lib is None:
        raise ValueError("the ballot kernel is not built on this machine (no nvcc); resolve the "
                         "launch with KernelPolicy.launch, which falls back to Triton")
    per_channel = thresholds.dim() == 2
    seg = [int(sizes[0])] if gated else [int(s) for s in sizes]
    arr = (ctypes.c_longlong * len(seg))(*seg)
    split = -(-wt.shape[0] // k_per_split)
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    limit = max_cluster(idx, int(num_warps), int(unroll), bool(gated), _DTYPES[x.dtype]) if split > 1 else 0
    if cluster and not 2 <= split <= limit:
        raise ValueError(f"a ballot cluster launch needs 2 <= split <= {limit} on this GPU, got "
                         f"split {split}; pass cluster=None to fall back to the global tail")
    use_cluster = 2 <= split <= limit if cluster is None else bool(cluster)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = lib.teal_ballot_gemv(
        x.data_ptr(), wt.data_ptr(), thresholds.data_ptr(), part.data_ptr(), cnt.data_ptr(),
        out.data_ptr(), wt.shape[0], wt.stride(0), thresholds.stride(0),
        thresholds.stride(1) if per_channel else 0, int(per_channel), arr, len(seg), int(gated),
        int(k_per_split), int(num_warps), int(unroll), _DTYPES[x.dtype], stream, int(use_cluster))
    if rc != 0:
        raise RuntimeError(f"the ballot CUDA GEMV launch failed (code {rc})")
    return out
