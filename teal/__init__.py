"""TEAL: training-free activation sparsity (arXiv 2408.14690) for GPT-Fast-style decoding.

Submodules: `sparse_linear` (the projection module and its dispatch), `thresholds`
(histograms, inverse CDF, calibration file), `checkpoint` (our checkpoint format),
`kernels` (Triton sparse GEMV kernels for CUDA decode).
"""
from teal.sparse_linear import (SparseLinear, configure, fuse_shared_inputs, gated_mlp, project,
                                sparse_linears, to_kernel_layout)

__all__ = ["SparseLinear", "configure", "fuse_shared_inputs", "gated_mlp", "project",
           "sparse_linears", "to_kernel_layout"]
