"""torch.library registration of the kernels (imports Triton through .launch / .attention).

The ops are ``torch.library.custom_op``s (opaque to torch.compile) with fake implementations.
Opaque is deliberate: the GEMV and attention kernels keep persistent, self-resetting split-K
arrival counters (teal/kernels/common.py), which makes each projection ONE kernel launch;
through ``triton_op`` the compiler would functionalize that buffer (a copy per call).  An
opaque op is captured fine by ``torch.compile(fullgraph=True, mode="reduce-overhead")``: the
CUDA graph records whatever kernels the op launches.  The kernel choice is made before the
op (a `Launch` encoded as ints), so a compiled step bakes it in.

Ops:
    teal::sparse_gemv(Tensor x, Tensor weight, Tensor? scales, Tensor thresholds, int[] sizes,
                      bool gated, str wformat, int[] launch) -> Tensor
        x (M, K), 1 <= M <= 16; returns (M, sum(sizes)) or, gated, (M, sizes[0])
    teal::decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .attention import launch_decode_attention
from .dispatch import Launch
from .launch import launch_gemv


@torch.library.custom_op("teal::sparse_gemv", mutates_args=())
def sparse_gemv_op(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor],
                   thresholds: torch.Tensor, sizes: List[int], gated: bool, wformat: str,
                   launch: List[int]) -> torch.Tensor:
    m = x.shape[0]
    y = launch_gemv(x.reshape(-1) if m == 1 else x, weight, scales, thresholds, sizes, gated,
                    wformat, Launch.decode(launch))
    return y.view(m, -1)


@sparse_gemv_op.register_fake
def _(x, weight, scales, thresholds, sizes, gated, wformat, launch):
    return x.new_empty((x.shape[0], sizes[0] if gated else sum(sizes)))


@torch.library.custom_op("teal::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return launch_decode_attention(q, k, v, mask)


@decode_attention_op.register_fake
def _(q, k, v, mask):
    return torch.empty_like(q)
