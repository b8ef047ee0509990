"""TEAL: training-free activation sparsity (arXiv 2408.14690) for GPT-Fast-style decoding.

Submodules: `projections` (the specification of a block's projections), `sparse_linear`
(the fused projection module, its handles and dispatch), `kernels` (Triton sparse GEMV and
decode-attention kernels, their dispatch table and `KernelPolicy`), `thresholds`
(histograms, inverse CDF, calibration file), `calibration`, `greedy`, `budgets` (per-block
budgets tuned end to end), `allocation`,
`evaluation`, `generation` (the decode loop), `tp` (tensor parallelism), `checkpoint`,
`convert`, `tokenizer`, `io`, `dtypes`.
"""
from teal.kernels.dispatch import KernelPolicy
from teal.sparse_linear import (Projection, SparseLinear, configure, set_kernel_policy,
                                set_thresholds, sparse_linears)

__all__ = ["SparseLinear", "Projection", "KernelPolicy", "configure", "set_kernel_policy",
           "set_thresholds", "sparse_linears"]
