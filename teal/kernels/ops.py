"""torch.library registration of the sparse GEMV kernels (imports Triton via .launch).

The ops are registered with ``torch.library.custom_op`` (opaque to torch.compile) plus a
fake implementation.  Opaque is deliberate: the kernel keeps persistent, self-resetting
split-K arrival counters (see triton_gemv.py), which lets each projection be ONE kernel
launch.  Through ``triton_op`` the compiler would functionalize that buffer (copy it each
call).  An opaque op is captured fine by ``torch.compile(fullgraph=True,
mode="reduce-overhead")``: the CUDA graph records whatever kernels the op launches.

Ops (all take the flattened (K,) activation):
    teal::sparse_gemv_segments(Tensor x, Tensor wt, Tensor thresholds, int[] sizes, int sparsity_pct=0) -> Tensor
    teal::sparse_gated_gemv(Tensor x, Tensor wt, Tensor thresholds, int sparsity_pct=0) -> Tensor
    teal::decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor
(sparsity_pct: the expected sparsity in percent, a hint for the algorithm choice only)
"""

from __future__ import annotations

from typing import List

import torch

from .launch import launch_gated, launch_segments


@torch.library.custom_op("teal::sparse_gemv_segments", mutates_args=())
def sparse_gemv_segments_op(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, sizes: List[int],
                            sparsity_pct: int = 0) -> torch.Tensor:
    return launch_segments(x, wt, thresholds, sizes, sparsity=sparsity_pct / 100)


@sparse_gemv_segments_op.register_fake
def _(x, wt, thresholds, sizes, sparsity_pct=0):
    return x.new_empty((wt.shape[1],))


@torch.library.custom_op("teal::sparse_gated_gemv", mutates_args=())
def sparse_gated_gemv_op(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                         sparsity_pct: int = 0) -> torch.Tensor:
    return launch_gated(x, wt, thresholds, sparsity=sparsity_pct / 100)


@sparse_gated_gemv_op.register_fake
def _(x, wt, thresholds, sparsity_pct=0):
    return x.new_empty((wt.shape[1] // 2,))


@torch.library.custom_op("teal::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from .launch import launch_decode_attention

    return launch_decode_attention(q, k, v, mask)


@decode_attention_op.register_fake
def _(q, k, v, mask):
    return torch.empty_like(q)
