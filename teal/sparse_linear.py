"""TEAL sparse linear layers: y = W (x * [|x| > t]), the projection of TEAL Section 3.

`SparseLinear` holds one projection's weight and threshold and dispatches:
- sparsity off (`sparse=False`): dense `F.linear`;
- prefill (more than one token) with `sparsify_prefill=False`: dense, as TEAL does at inference;
- CUDA decode (batch 1, one token, fp16/bf16) with the Triton kernels available: the fused
  sparse GEMV that skips the weight rows of inactive input channels (`teal.kernels`);
- otherwise: the exact torch path, zero entries with |x| <= t, then a dense matmul.

Weight layout: `weight` has the nn.Linear shape (out_features, in_features) but is stored
input-channel major, i.e. it is the transposed view of a contiguous (in_features,
out_features) tensor `weight.t()`, so that the row of one input channel is contiguous and a
masked channel's row is never read. `F.linear` accepts the view as is (cuBLAS transposes).
Loading a state dict with `load_state_dict(..., assign=False)` keeps this layout;
`to_kernel_layout(model)` restores it after `assign=True` loads or dtype/device moves.

Projections that share their input (q/k/v; gate/up) can be fused by `fuse_shared_inputs`:
their weights become column slices of one contiguous (in_features, sum(out)) buffer and their
thresholds rows of one fp32 buffer, so one kernel pass reads each active input row once.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class SparseLinear(nn.Module):
    """Bias-free linear layer with a TEAL activation threshold on its input.

    Args:
        in_features: K, the input width.
        out_features: N, the output width.

    Attributes:
        weight: (N, K) parameter, a transposed view of a contiguous (K, N) tensor.
        threshold: fp32 buffer, shape () (one threshold for the tensor) or (K,) (one per input
            channel, e.g. weight-informed scoring t / ||W[:, i]||_2). Entries with |x| <= t are
            zeroed. Not saved in the state dict (thresholds come from the calibration file).
        sparse: apply the threshold at all (False: a plain dense layer).
        target_sparsity: the sparsity the threshold was calibrated for (set with the threshold
            by teal.thresholds / teal.allocation; 0 when unknown). Only a hint for the kernels'
            algorithm choice (kept-row lists above ~80%), never for the math.
        sparsify_prefill: also sparsify inputs with more than one token (evaluation mode: the
            teacher-forced equivalent of generating every token sparsely).
        counts: fp64 buffer [zeroed entries, seen entries], accumulated only while `track`.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        w = torch.empty(in_features, out_features, device=device, dtype=dtype)
        nn.init.normal_(w, std=in_features ** -0.5)
        self.weight = nn.Parameter(w.t())
        self.register_buffer("threshold", torch.zeros((), device=device), persistent=False)
        self.register_buffer("counts", torch.zeros(2, dtype=torch.float64, device=device),
                             persistent=False)
        self.sparse = False
        self.target_sparsity = 0.0
        self.sparsify_prefill = False
        self.track = False
        self._group: Optional[_FusedGroup] = None

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` must not cast the fp32 threshold / fp64 counters, and moving the weight
        # detaches it from a fused buffer (re-fuse with fuse_shared_inputs afterwards).
        super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold = self.threshold.float()
        if self.counts.dtype != torch.float64:
            self.counts = self.counts.double()
        self._group = None
        return self

    def extra_repr(self) -> str:
        t = self.threshold
        th = f"{t.item():.4g}" if t.dim() == 0 else f"per-channel({t.numel()})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparse={self.sparse}, threshold={th}")

    def set_threshold(self, threshold) -> None:
        """Set the threshold: a float, a 0-d tensor, or a (in_features,) tensor (per channel).

        Raises:
            ValueError: wrong shape, negative or NaN values.
        """
        t = torch.as_tensor(threshold, dtype=torch.float32).to(self.threshold.device)
        if t.dim() not in (0, 1) or (t.dim() == 1 and t.numel() != self.in_features):
            raise ValueError(f"threshold must be a scalar or have shape ({self.in_features},), "
                             f"got {tuple(t.shape)}")
        if torch.isnan(t).any() or (t < 0).any():
            raise ValueError("thresholds must be non-negative numbers")
        if t.shape == self.threshold.shape:
            self.threshold.copy_(t)  # keeps a fused group's view in sync
        else:
            self.threshold = t.clone()
            if self._group is not None:
                self._group.stale = True

    def effective_sparsity(self) -> float:
        """Fraction of input entries zeroed since the last `reset_counts` (NaN if none seen)."""
        zeroed, seen = self.counts.tolist()
        return zeroed / seen if seen else float("nan")

    def reset_counts(self) -> None:
        self.counts.zero_()

    def _sparsify(self, x: Tensor) -> Tensor:
        # Compare in fp32 like the kernels: a 0-d fp32 threshold would not promote a bf16 x.
        keep = x.float().abs() > self.threshold
        if self.track:
            self.counts[0] += (~keep).sum()
            self.counts[1] += keep.numel()
        return x * keep

    def _is_sparse_for(self, x: Tensor) -> bool:
        if not self.sparse:
            return False
        return self.sparsify_prefill or x.numel() // x.shape[-1] == 1 or x.shape[-2] == 1

    def forward(self, x: Tensor) -> Tensor:
        """y = W (x * [|x| > t]) for x (..., K) -> (..., N); dense when not sparse for x."""
        if not self._is_sparse_for(x):
            return F.linear(x, self.weight)
        if _kernel_ok(x, self) and not self.track and self.weight.t().is_contiguous():
            from teal import kernels
            return kernels.sparse_gemv(x, self.weight.t(), self.threshold, self.target_sparsity)
        return F.linear(self._sparsify(x), self.weight)


class _FusedGroup:
    """Projections sharing one input, with weights in one (K, sum N) buffer (see module doc)."""

    def __init__(self, members: Sequence[SparseLinear], wt: Tensor, thresholds: Tensor):
        self.members = tuple(members)
        self.weights: tuple = ()  # the members' weight Parameters (views of wt), set by fusing
        self.wt = wt
        self.thresholds = thresholds
        self.sizes = [m.out_features for m in members]
        bounds, acc = [], 0
        for n in self.sizes:
            acc += n
            bounds.append(acc)
        self.segments = tuple(bounds)
        self.stale = False

    def usable(self, members: Sequence[SparseLinear]) -> bool:
        """The fused buffers stand for `members`: same modules, their weights still the views
        made by fusing (a replaced Parameter, e.g. load_state_dict(assign=True), is not), and
        no forward hooks on them (hooks must see each member's own call)."""
        return (not self.stale and len(members) == len(self.members)
                and all(a is b for a, b in zip(members, self.members))
                and all(m.weight is w for m, w in zip(members, self.weights))
                and not any(m._forward_pre_hooks or m._forward_hooks for m in members))


# Tests set this to run the Triton kernels on CPU through Triton's interpreter
# (TRITON_INTERPRET=1), so the model-level kernel dispatch is covered without a GPU.
KERNELS_ON_CPU = False


def _kernel_ok(x: Tensor, lin: SparseLinear) -> bool:
    """True when the fused Triton decode kernels apply: CUDA, fp16/bf16, one token, batch 1."""
    if not (x.is_cuda or KERNELS_ON_CPU) or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.numel() != x.shape[-1] or x.dtype != lin.weight.dtype:
        return False
    from teal import kernels
    return kernels.kernels_available(x.device)


def project(x: Tensor, *linears: SparseLinear) -> tuple[Tensor, ...]:
    """Apply several projections that share the input x (..., K); returns their outputs.

    When the projections were fused by `fuse_shared_inputs`: one dense GEMM over the fused
    buffer when none of them sparsifies x (sparsity off, dense prefill), one fused sparse
    kernel pass (one threshold per projection) at a CUDA decode step; otherwise calls each
    module.
    """
    lin0 = linears[0]
    group = lin0._group
    if (group is not None and group.usable(linears) and not lin0.track
            and not any(m._is_sparse_for(x) for m in linears)):
        # dense (sparsity off, or dense prefill): one GEMM/GEMV over the fused buffer
        y = F.linear(x, group.wt.t())
        return tuple(y.split(group.sizes, dim=-1))
    if (group is not None and group.usable(linears) and lin0._is_sparse_for(x)
            and all(m.sparse for m in linears) and _kernel_ok(x, lin0) and not lin0.track):
        from teal import kernels
        y = kernels.sparse_gemv_segments(x, group.wt, group.thresholds, group.segments,
                                         min(m.target_sparsity for m in linears))
        return tuple(y.split(group.sizes, dim=-1))
    return tuple(m(x) for m in linears)


def gated_mlp(x: Tensor, gate_proj: SparseLinear, up_proj: SparseLinear) -> Tensor:
    """SwiGLU hidden state silu(gate_proj(x)) * up_proj(x), shape (..., intermediate_size).

    One fused kernel (shared input, silu * mul epilogue) at CUDA decode when the two were fused
    by `fuse_shared_inputs`; otherwise the two modules and a torch epilogue.
    """
    group = gate_proj._group
    if (group is not None and group.usable((gate_proj, up_proj)) and gate_proj.sparse
            and up_proj.sparse and gate_proj._is_sparse_for(x) and _kernel_ok(x, gate_proj)
            and not gate_proj.track):
        from teal import kernels
        return kernels.sparse_gated_gemv(x, group.wt, group.thresholds,
                                         min(gate_proj.target_sparsity, up_proj.target_sparsity))
    g, u = project(x, gate_proj, up_proj)
    return F.silu(g) * u


def _linears_with_shared_inputs(model: nn.Module):
    for mod in model.modules():
        names = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]
        for group in names:
            if all(isinstance(getattr(mod, n, None), SparseLinear) for n in group):
                yield [getattr(mod, n) for n in group]


@torch.no_grad()
def to_kernel_layout(model: nn.Module) -> nn.Module:
    """Re-lay out every SparseLinear weight input-channel major (contiguous (K, N)) in place."""
    for m in model.modules():
        if isinstance(m, SparseLinear) and not m.weight.t().is_contiguous():
            m.weight = nn.Parameter(m.weight.detach().t().contiguous().t(),
                                    requires_grad=m.weight.requires_grad)
            m._group = None
    _prepare_kernels(model)
    return model


def _prepare_kernels(model: nn.Module) -> None:
    devices = {m.weight.device for m in model.modules() if isinstance(m, SparseLinear)}
    for d in devices:
        if d.type == "cuda":
            from teal import kernels
            kernels.prepare(d)


@torch.no_grad()
def fuse_shared_inputs(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up of every block into shared (K, sum N) buffers (see module doc).

    Each member's `weight` becomes a view of its column slice and its `threshold` a view of
    one row of the group's fp32 threshold buffer (shape (S,) or (S, K)), so later
    `set_threshold` calls with the same shape update the fused copy. Call again after
    changing threshold shapes (scalar <-> per-channel). Memory: no extra copy is kept.
    """
    for members in _linears_with_shared_inputs(model):
        ws = [m.weight.detach() for m in members]
        k = members[0].in_features
        wt = torch.cat([w.t() for w in ws], dim=1).contiguous()  # (K, sum N)
        shapes = {tuple(m.threshold.shape) for m in members}
        if len(shapes) != 1:  # mixed scalar / per-channel: promote all to per-channel
            ths = torch.stack([m.threshold.expand(k) for m in members]).contiguous()
        else:
            ths = torch.stack([m.threshold for m in members]).contiguous()
        group = _FusedGroup(members, wt, ths)
        start = 0
        for i, m in enumerate(members):
            n = m.out_features
            m.weight = nn.Parameter(wt[:, start:start + n].t(), requires_grad=False)
            m.threshold = ths[i]
            m._group = group
            start += n
        group.weights = tuple(m.weight for m in members)
    _prepare_kernels(model)
    return model


def sparse_linears(model: nn.Module):
    """All SparseLinear modules of a model."""
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def configure(model: nn.Module, *, sparse: Optional[bool] = None,
              sparsify_prefill: Optional[bool] = None, track: Optional[bool] = None) -> None:
    """Set the dispatch flags of every SparseLinear (None leaves a flag unchanged)."""
    for m in sparse_linears(model):
        if sparse is not None:
            m.sparse = sparse
        if sparsify_prefill is not None:
            m.sparsify_prefill = sparsify_prefill
        if track is not None:
            m.track = track
            m.reset_counts()
