"""Test configuration shared by all test modules.

On machines without CUDA, Triton kernels run through Triton's interpreter: the variable must
be set before any kernel module is imported (it is read when `@triton.jit` decorates).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
