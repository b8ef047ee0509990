"""Host-side launch of the sparse GEMV kernels (imports Triton).

`launch_gemv` turns one validated call into a `Plan` (grid, runtime arguments and
constexprs shared by every algorithm) and hands it to the algorithm's module (`masked`,
`dot`, `lists`, `words`), whose `launch(plan, lc)` adds its own constexprs; a "ballot" launch
goes to the CUDA C++ kernel (`ballot.launch`) with the same counters and workspace (unused
where its split is summed inside a thread-block cluster).  Outputs and the fp32
split-K workspace are allocated here unless passed in (tests pass NaN-poisoned buffers).  The
per-column-tile arrival counters live in a persistent, per-device int32 buffer that every
launch leaves all-zero (the last-arriving program resets its slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import _interp_compat, ballot, dot, lists, masked, words
from .dispatch import BALLOT_BLOCK_N, Launch, cdiv, words_fit
from .formats import get_format

_COUNTERS: dict = {}  # per-device counter buffers (a cache of allocations, not a setting)
_MIN_COUNTERS = 1 << 16
_HUGE = 1 << 30
_I32_LIMIT = 2**31 - 1
_MODULES = (masked, dot, lists, words)  # index = Launch.algo (dispatch.ALGORITHMS order)


def interpreted() -> bool:
    """True when Triton decorated our kernels for its CPU interpreter (TRITON_INTERPRET=1
    set before Triton was imported): Triton's decision, read from the kernel object."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(masked.masked_gemv_kernel, InterpretedFunction)


if interpreted():
    _interp_compat.apply()


def counters(device: torch.device, n: int) -> torch.Tensor:
    """Persistent zeroed int32 arrival counters (>= n slots) for `device`."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _workspace(buf: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """The fp32 split-K workspace: `buf` (caller's, checked) or a new one of n floats."""
    if buf is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.numel() < n or buf.device != device:
        raise ValueError(f"workspace must be a contiguous float32 tensor of >= {n} elements on "
                         f"{device}, got {tuple(buf.shape)} {buf.dtype} on {buf.device}")
    return buf


@dataclass
class Plan:
    """One call, ready to launch: `args` are the runtime arguments every GEMV kernel takes
    first (x_ptr ... stride_s), `meta` their shared constexprs, `grid` (column tiles, split)."""

    x: torch.Tensor
    thresholds: torch.Tensor
    K: int
    grid: tuple
    args: tuple
    meta: dict
    per_channel: bool
    stride_tk: int
    threshold_rows: int
    interpreted: bool
    rows: int = 1  # M input rows (x (M, K); only the dot algorithm takes M > 1)
    stride_xm: int = 0


def _check_words(fmt, sizes, lc: Launch, wformat: str) -> None:
    if not words_fit(wformat, sizes):
        raise ValueError(f"the words kernel takes int8 / int4 weights whose segments are whole "
                         f"32-bit words (int8: multiples of 4 columns, int4: of 8), got "
                         f"{wformat} with segments {list(sizes)}; resolve the launch with "
                         f"KernelPolicy.launch (it falls back to the masked loop)")
    if lc.block_k % lc.num_warps:
        raise ValueError(f"a words launch needs block_k ({lc.block_k}) a multiple of num_warps "
                         f"({lc.num_warps}); resolve it with KernelPolicy.launch")
    if fmt.group and (fmt.group % lc.block_k or lc.k_per_split % fmt.group):
        raise ValueError(f"a words launch on {wformat} needs block_k dividing the group and whole "
                         f"groups per split: got block_k {lc.block_k}, k_per_split "
                         f"{lc.k_per_split}; resolve it with KernelPolicy.launch")


def _launch_ballot(x, weight, scales, thresholds, sizes, gated, wformat, lc: Launch, rows,
                   out, workspace) -> torch.Tensor:
    """The ballot CUDA kernel (teal.kernels.ballot): one row, dense weights, CUDA tensors."""
    if rows > 1 or wformat != "dense" or scales is not None or x.device.type != "cuda":
        raise ValueError(f"a ballot launch takes one row of dense weights on a CUDA device, got "
                         f"{rows} rows of {wformat} on {x.device}; resolve the launch with "
                         f"KernelPolicy.launch")
    K = x.shape[-1]
    n_out = sizes[0] if gated else sum(sizes)
    n_tiles = cdiv(sizes[0], BALLOT_BLOCK_N) if gated else sum(cdiv(n, BALLOT_BLOCK_N) for n in sizes)
    split = cdiv(K, lc.k_per_split)
    if out is None:
        out = torch.empty(x.shape[:-1] + (n_out,), dtype=x.dtype, device=x.device)
    part = _workspace(workspace, split * (2 * sizes[0] if gated else n_out), x.device) if split > 1 else out
    cnt = counters(x.device, n_tiles)
    return ballot.launch(x.reshape(-1), weight, thresholds, sizes, gated, lc.k_per_split,
                         lc.num_warps, lc.num_stages, out.view(-1), part, cnt)


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor],
                thresholds: torch.Tensor, sizes: Sequence[int], gated: bool, wformat: str,
                lc: Launch, out: Optional[torch.Tensor] = None,
                workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch one sparse GEMV (inputs validated by teal.kernels._checks).

    Args:
        x: (K,) contiguous activation (one row), or (M, K) contiguous with 1 <= M <=
            dot.BLOCK_M rows (the dot algorithm, dense or int8 weights): each row is masked
            by its own |x[m]| > t, and a weight row is read once if any row keeps it.
        weight, scales: the weight in format `wformat` ("dense": (K, N) = W.t(), no scales).
        thresholds: fp32 (S,) or (S, K), one row per segment (gated: gate, up), shared by
            the M rows.
        sizes: segment widths (gated: (F, F)).
        lc: the resolved launch (teal.kernels.dispatch.Launch).
        out: optional output, (N,) (gated: (F,)) for x (K,), else (M, N) (gated: (M, F));
            workspace: optional fp32 split-K buffer.
    Returns:
        out in x's dtype.
    Raises:
        ValueError: x not contiguous (K,) / (M, K), M > 1 with another algorithm than dot or
        with int4 weights, a launch that cannot run the format.
    """
    if x.dim() not in (1, 2) or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (K,) vector or (M, K) matrix, got shape "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    rows = 1 if x.dim() == 1 else x.shape[0]
    if lc.algo_name == "torch":
        raise ValueError("a torch launch (masked cuBLAS GEMM) has no Triton kernel; call "
                         "teal.kernels.sparse_gemv / sparse_gated_gemv, which run it")
    if lc.algo_name == "ballot":
        return _launch_ballot(x, weight, scales, thresholds, sizes, gated, wformat, lc, rows,
                              out, workspace)
    fmt = get_format(wformat)
    if fmt.group and (lc.block_k > fmt.group or lc.algo_name == "list"):
        raise ValueError(f"a {lc.algo_name} launch with block_k {lc.block_k} cannot run {wformat}: "
                         f"int4 tiles must lie inside one scale group (block_k <= {fmt.group}, no "
                         f"kept-row lists); resolve the launch for this format "
                         f"(KernelPolicy.launch / dispatch.fit_format)")
    if lc.algo_name == "words":
        _check_words(fmt, sizes, lc, wformat)
    if rows > 1 and (lc.algo_name != "dot" or fmt.wfmt == 2 or rows > dot.BLOCK_M):
        raise ValueError(f"{rows} rows per call run on the dot algorithm with dense or int8 "
                         f"weights, at most {dot.BLOCK_M} rows; got a {lc.algo_name} launch on "
                         f"{wformat}: resolve the launch with KernelPolicy.launch(..., rows={rows})")
    K = x.shape[-1]
    bn, split = lc.block_n, lc.split
    if gated:
        F = sizes[0]
        ncols, n_out, n_tiles = F, F, cdiv(F, bn)
        c, tfirst = [F] * 4, [_HUGE] * 3
        even_n = F % bn == 0
        part_n = split * rows * 2 * F
    else:
        S, N = len(sizes), sum(sizes)
        tiles = [cdiv(n, bn) for n in sizes]
        ncols, n_out, n_tiles = N, N, sum(tiles)
        starts = [sum(sizes[:i + 1]) for i in range(S)]
        c = starts + [N] * (4 - S)
        tfirst = ([sum(tiles[:i]) for i in range(1, S)] + [_HUGE] * 3)[:3]
        even_n = all(n % bn == 0 for n in sizes)
        part_n = split * rows * N
    if out is None:
        out = torch.empty(x.shape[:-1] + (n_out,), dtype=x.dtype, device=x.device)
    # (the words kernel always pairs gate and up tiles through the workspace)
    paired = split > 1 or (gated and lc.algo_name == "words")
    part = _workspace(workspace, part_n, x.device) if paired else out
    cnt = counters(x.device, n_tiles) if paired else out
    per_channel = thresholds.dim() == 2
    stride_tk = thresholds.stride(1) if per_channel else 0
    stride_wk = weight.stride(0)
    s_arg = weight if scales is None else scales
    stride_s = 0 if scales is None else scales.stride(0)
    args = (x, weight, thresholds, part, cnt, out, K, stride_wk, thresholds.stride(0), stride_tk,
            lc.k_per_split, split, ncols, *c, *tfirst, s_arg, stride_s)
    starts = [0] + ([] if gated else [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)])
    if gated:
        starts.append(sizes[0])  # up's columns
    # int4 tiles start on 16-byte bytes, and (ncols) the scale rows' stride N / 2 (gated: F)
    # is a multiple of 16, as group_scales' hint assumes
    walign = bn >= 32 and all(c % 32 == 0 for c in starts + [ncols])
    meta = dict(GATED=gated, PER_CHANNEL=per_channel, HAS_SPLIT=split > 1, EVEN_N=even_n,
                BIG=K * stride_wk > _I32_LIMIT, WFMT=fmt.wfmt, GROUP=fmt.group, WALIGN=walign,
                BLOCK_K=lc.block_k, BLOCK_N=bn, RCHUNK=lc.rchunk)
    plan = Plan(x, thresholds, K, (n_tiles, split), args, meta, per_channel, stride_tk,
                2 if gated else len(sizes), interpreted(), rows, K)
    _MODULES[lc.algo].launch(plan, lc)
    return out
