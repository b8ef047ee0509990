"""TEAL sparse linear layers: y = W (x * [|x| > t]), the projections of TEAL Section 3.

`SparseLinear` holds the S >= 1 projections of a block that read the same input x (fused
q/k/v: S = 3; o_proj: S = 1; gate/up: S = 2 with the SwiGLU epilogue; down_proj: S = 1) in
one weight buffer, with one threshold per projection, and dispatches:
- sparsity off (`sparse = False`): one dense GEMM over the fused buffer;
- prefill (more than one token) with `sparsify_prefill = False`: dense, as TEAL does at
  inference;
- a decode step (one token) that its `KernelPolicy` runs on a kernel (CUDA, fp16/bf16): one
  fused sparse GEMV launch that skips the weight rows of dropped input channels, each
  projection with its own threshold (`teal.kernels`);
- otherwise the exact torch path: zero the entries with |x| <= t_s, then a matmul.

Weight layout: `weight` has the nn.Linear shape (sum N_s, K) but is stored input-channel
major, i.e. it is the transposed view of a contiguous (K, sum N_s) tensor, so the row of one
input channel is contiguous and a dropped channel's row is never read. `F.linear` takes the
view as is (cuBLAS transposes). Moves (`.to(device/dtype)`) and `load_state_dict` keep this
layout; the state dict holds one nn.Linear-shaped `<name>.weight` per projection (split on
save, merged on load; `install_state_dict_hooks`).

`Projection` is a handle on one projection of a module: its name, weight rows, threshold,
calibrated sparsity and counters; `teal.projections.model_projections` yields them by block.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from teal import kernels
from teal.kernels.dispatch import DEFAULT_POLICY, KernelPolicy

__all__ = ["SparseLinear", "Projection", "configure", "configured", "sparse_linears", "set_kernel_policy",
           "set_thresholds", "install_state_dict_hooks"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _as_threshold(t, K: int) -> Tensor:
    """A threshold as an fp32 tensor, () or (K,). Raises ValueError (type, shape, sign, NaN)."""
    if torch.is_tensor(t):
        t = t.detach().float()
    else:
        try:
            t = torch.as_tensor(t, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"a threshold must be a number or a tensor, got {t!r}") from None
    if t.dim() not in (0, 1) or (t.dim() == 1 and t.numel() != K):
        raise ValueError(f"threshold must be a scalar or have shape ({K},), got {tuple(t.shape)}")
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError("thresholds must be non-negative numbers")
    return t


def _check_sparsities(sparsities, n: int) -> None:
    """n numbers in [0, 1). Raises ValueError otherwise."""
    try:
        ok = len(sparsities) == n and all(0.0 <= float(s) < 1.0 for s in sparsities)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sparsities must be {n} numbers in [0, 1), got {sparsities}")


class SparseLinear(nn.Module):
    """Bias-free projections sharing one input, each with a TEAL threshold (TEAL Eq. 2-3).

    Args:
        in_features: K, the input width.
        out_features: N (one projection) or the widths (N_1, ..., N_S) of S projections.
        names: the projections' names (state-dict keys `<owner>.<name>.weight`); default
            "proj0", "proj1", ...
        gated: S = 2 equal widths F; the output is silu(first) * second (SwiGLU), (..., F).

    Attributes:
        weight: (sum N_s, K) parameter, the transposed view of a contiguous (K, sum N_s).
        threshold: fp32 buffer (S,) (one threshold per projection) or (S, K) (per input
            channel, e.g. weight-informed scoring t / ||W[:, i]||_2). Entries with |x| <= t_s
            are zeroed for projection s. Not saved in the state dict.
        sparsity: S floats, the sparsity each threshold was calibrated for (0 when unknown);
            only chooses the kernel (kept-row lists from ~80%), never the math.
        sparse: apply the thresholds at all (False: plain dense projections).
        sparsify_prefill: also sparsify inputs with more than one token (evaluation: the
            teacher-forced equivalent of generating every token sparsely).
        track: count zeroed entries in `counts` (fp64 (S, 2): [zeroed, seen] per projection);
            runs the torch path.
        kernel_policy: the `teal.kernels.KernelPolicy` choosing the decode kernels.
    """

    def __init__(self, in_features: int, out_features, names: Optional[Sequence[str]] = None,
                 gated: bool = False, device=None, dtype=None):
        super().__init__()
        sizes = (int(out_features),) if isinstance(out_features, int) else tuple(int(n) for n in out_features)
        names = tuple(names) if names is not None else tuple(f"proj{i}" for i in range(len(sizes)))
        if not sizes or len(names) != len(sizes) or min(sizes) < 1 or in_features < 1:
            raise ValueError(f"SparseLinear needs in_features >= 1 and one name per output width "
                             f"(>= 1): got {in_features}, {sizes}, {names}")
        if gated and (len(sizes) != 2 or sizes[0] != sizes[1]):
            raise ValueError(f"a gated SparseLinear needs two equal widths (gate, up), got {sizes}")
        self.in_features = in_features
        self.sizes = sizes
        self.names = names
        self.gated = gated
        w = torch.empty(in_features, sum(sizes), device=device, dtype=dtype)
        nn.init.normal_(w, std=in_features ** -0.5)
        self.weight = nn.Parameter(w.t())
        self.register_buffer("threshold", torch.zeros(len(sizes), device=device), persistent=False)
        self.register_buffer("counts", torch.zeros(len(sizes), 2, dtype=torch.float64, device=device),
                             persistent=False)
        self.sparsity = [0.0] * len(sizes)
        self.sparse = False
        self.sparsify_prefill = False
        self.track = False
        self.kernel_policy: KernelPolicy = DEFAULT_POLICY
        self.tp_style: Optional[str] = None
        self._shared = True     # every projection has the same threshold (one mask suffices)
        self._launch = None     # the resolved decode kernel launch, or None (torch path)
        self._refresh_launch()

    # ----------------------------------------------------------------------- structure
    @property
    def out_features(self) -> int:
        """Output width: sum of the projections' widths (gated: F)."""
        return self.sizes[0] if self.gated else sum(self.sizes)

    def _offsets(self) -> list:
        out, a = [], 0
        for n in self.sizes:
            out.append((a, a + n))
            a += n
        return out

    def projection(self, i) -> "Projection":
        """The handle of projection `i` (an index or a name).

        Raises:
            ValueError: no such projection (the message lists them).
        """
        index = self.names.index(i) if i in self.names else i
        if not isinstance(index, int) or not 0 <= index < len(self.sizes):
            raise ValueError(f"no projection {i!r} here; it holds {', '.join(self.names)}")
        return Projection(self, index)

    def projections(self) -> list:
        return [Projection(self, i) for i in range(len(self.sizes))]

    def extra_repr(self) -> str:
        t = self.threshold
        th = t.tolist() if t.dim() == 1 and not t.is_meta else f"per-channel {tuple(t.shape)}"
        return (f"in_features={self.in_features}, projections={dict(zip(self.names, self.sizes))}, "
                f"gated={self.gated}, sparse={self.sparse}, threshold={th}")

    # ----------------------------------------------------------------------- moves, loading
    def _apply(self, fn, recurse=True):
        # `.to(dtype)` must not cast the fp32 thresholds / fp64 counters, and a move must keep
        # the weight input-channel major.
        super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold = self.threshold.float()
        if self.counts.dtype != torch.float64:
            self.counts = self.counts.double()
        if not self.weight.is_meta and not self.weight.t().is_contiguous():
            self.weight = nn.Parameter(self.weight.detach().t().contiguous().t(),
                                       requires_grad=self.weight.requires_grad)
        self._refresh_launch()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if torch.is_tensor(w) and w.dim() == 2 and not w.t().is_contiguous() and not w.is_meta:
            state_dict[key] = w.t().contiguous().t()  # assign=True keeps the kernel layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_launch()

    # ----------------------------------------------------------------------- thresholds
    def set_thresholds(self, thresholds: Sequence, sparsities: Optional[Sequence[float]] = None) -> None:
        """Set every projection's threshold (each a float, a 0-d tensor or a (K,) tensor) and,
        optionally, the sparsities they were calibrated for.

        The buffer is (S,) when every threshold is a scalar, else (S, K); it is updated in
        place when its shape does not change (so a captured CUDA graph sees new values).

        Raises:
            ValueError: wrong count or shape, negative or NaN values, sparsity outside [0, 1).
        """
        S, K = len(self.sizes), self.in_features
        if len(thresholds) != S:
            raise ValueError(f"{S} thresholds expected ({', '.join(self.names)}), got {len(thresholds)}")
        ts = [_as_threshold(t, K).cpu() for t in thresholds]
        if sparsities is not None:
            _check_sparsities(sparsities, len(self.sizes))
        new = torch.stack([t.expand(K) for t in ts]) if any(t.dim() for t in ts) else torch.stack(ts)
        self._store_thresholds(new)
        if sparsities is not None:
            self._set_sparsities(list(sparsities))

    def set_threshold(self, i: int, threshold, sparsity: Optional[float] = None) -> None:
        """Set projection i's threshold (float, 0-d or (K,) tensor) and optionally its
        calibrated sparsity; the other projections keep theirs (see `set_thresholds`)."""
        t = _as_threshold(threshold, self.in_features).cpu()
        s = list(self.sparsity)
        if sparsity is not None:
            s[i] = sparsity
            _check_sparsities(s, len(self.sizes))
        cur = self.threshold.detach().cpu()
        if t.dim() and cur.dim() == 1:
            cur = cur[:, None].expand(-1, self.in_features)
        new = cur.clone()
        new[i] = t
        self._store_thresholds(new)
        if sparsity is not None:
            self._set_sparsities(s)

    def _store_thresholds(self, new: Tensor) -> None:
        if new.shape == self.threshold.shape:
            self.threshold.copy_(new)
        else:
            self.threshold = new.to(self.threshold.device)
        self._shared = bool((new == new[:1]).all())

    def _set_sparsities(self, sparsities: list) -> None:
        _check_sparsities(sparsities, len(self.sizes))
        self.sparsity = [float(s) for s in sparsities]
        self._refresh_launch()

    def reset_counts(self) -> None:
        self.counts.zero_()

    # ----------------------------------------------------------------------- kernels
    def set_kernel_policy(self, policy: KernelPolicy) -> None:
        self.kernel_policy = policy
        self._refresh_launch()

    def _refresh_launch(self) -> None:
        """Resolve the decode kernel launch for this module's weight, thresholds and policy
        (None: the torch path), so a forward only reads it."""
        w, policy = self.weight, self.kernel_policy
        self._launch = None
        if (not policy.gemv or w.is_meta or w.dtype not in _KERNEL_DTYPES or not policy.allows(w.device)
                or not kernels.kernels_available(w.device)):
            return
        kind = "gated" if self.gated else "seg"
        self._launch = policy.launch(kind, self.in_features, self.sizes, w.dtype, "dense",
                                     min(self.sparsity), w.device)
        kernels.prepare(w.device)

    # ----------------------------------------------------------------------- forward
    def _sparse_for(self, x: Tensor) -> bool:
        return self.sparse and (self.sparsify_prefill or x.numel() == x.shape[-1] or x.shape[-2] == 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., sum N_s) (gated: (..., F)); dense when not sparse for x."""
        if not self._sparse_for(x):
            y = F.linear(x, self.weight)
        elif (self._launch is not None and not self.track and x.numel() == x.shape[-1]
              and x.dtype == self.weight.dtype and x.device == self.weight.device
              and self.weight.t().is_contiguous()
              and not (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))):
            # (the kernels are inference only: with autograd on, the torch path is taken)
            wt = self.weight.t()
            sparsity = min(self.sparsity)
            if self.gated:
                return kernels.sparse_gated_gemv(x, wt, self.threshold, sparsity=sparsity,
                                                 launch=self._launch)
            ends = [b for _, b in self._offsets()]
            return kernels.sparse_gemv(x, wt, self.threshold, ends, sparsity=sparsity,
                                       launch=self._launch)
        else:
            y = self._masked_linear(x)
        if self.gated:
            g, u = y.split(self.sizes, dim=-1)
            return F.silu(g) * u
        return y

    def _masked_linear(self, x: Tensor) -> Tensor:
        """The exact torch path: each projection's input with |x| <= t_s zeroed, then a
        matmul (one mask and one GEMM when every projection has the same threshold)."""
        ax = x.float().abs()  # compared in fp32, as the kernels do
        if self._shared:
            keep = ax > self.threshold[0]
            if self.track:
                self.counts[:, 0] += (~keep).sum()
                self.counts[:, 1] += keep.numel()
            return F.linear(x * keep, self.weight)
        ys = []
        for s, (a, b) in enumerate(self._offsets()):
            keep = ax > self.threshold[s]
            if self.track:
                self.counts[s, 0] += (~keep).sum()
                self.counts[s, 1] += keep.numel()
            ys.append(F.linear(x * keep, self.weight[a:b]))
        return torch.cat(ys, dim=-1)

    # ----------------------------------------------------------------------- tensor parallel
    @torch.no_grad()
    def tp_shard(self, style: str, rank: int, world: int) -> None:
        """Keep this rank's shard in place: "column" splits every projection's output rows
        (the full input, so thresholds stay), "row" splits the input channels (a per-channel
        threshold is sliced with them). Counters are reset.

        Raises:
            ValueError: unknown style, or a width `world` does not divide.
        """
        wt = self.weight.detach().t()  # (K, sum N), input-channel major
        if style == "column":
            if any(n % world for n in self.sizes):
                raise ValueError(f"{world} ranks do not divide the widths {self.sizes} of {self.names}")
            parts = [wt[:, a + rank * (b - a) // world: a + (rank + 1) * (b - a) // world]
                     for a, b in self._offsets()]
            wt = torch.cat(parts, dim=1)
            self.sizes = tuple(n // world for n in self.sizes)
            th = self.threshold.clone()
        elif style == "row":
            if self.in_features % world:
                raise ValueError(f"{world} ranks do not divide in_features {self.in_features} of {self.names}")
            k = self.in_features // world
            wt = wt[rank * k:(rank + 1) * k]
            self.in_features = k
            th = self.threshold
            th = (th[:, rank * k:(rank + 1) * k] if th.dim() == 2 else th).clone()
        else:
            raise ValueError(f"unknown tensor-parallel style {style!r}; use 'column' or 'row'")
        self.weight = nn.Parameter(wt.contiguous().t(), requires_grad=self.weight.requires_grad)
        self.threshold = th
        self.counts = torch.zeros_like(self.counts)
        self.tp_style = style
        self._refresh_launch()


class Projection:
    """Handle on projection `index` of a SparseLinear (no state of its own).

    Attributes: module, index, name; in_features, out_features; weight: its (N_s, K) rows of
    the module's weight (a view); threshold: () or (K,) (a view); sparsity; counts (a view of
    [zeroed, seen]); sparse: the module's flag.
    """

    __slots__ = ("module", "index")

    def __init__(self, module: SparseLinear, index: int):
        self.module, self.index = module, index

    def __repr__(self) -> str:
        return f"Projection({self.name}, in={self.in_features}, out={self.out_features})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Projection) and other.module is self.module and other.index == self.index

    def __hash__(self) -> int:
        return hash((id(self.module), self.index))

    @property
    def name(self) -> str:
        return self.module.names[self.index]

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.sizes[self.index]

    @property
    def weight(self) -> Tensor:
        a, b = self.module._offsets()[self.index]
        return self.module.weight[a:b]

    @property
    def threshold(self) -> Tensor:
        return self.module.threshold[self.index]

    @property
    def counts(self) -> Tensor:
        return self.module.counts[self.index]

    @property
    def sparsity(self) -> float:
        return self.module.sparsity[self.index]

    @property
    def sparse(self) -> bool:
        return self.module.sparse

    def set_threshold(self, threshold, sparsity: Optional[float] = None) -> None:
        """See `SparseLinear.set_threshold`."""
        self.module.set_threshold(self.index, threshold, sparsity)

    def effective_sparsity(self) -> float:
        """Fraction of input entries zeroed since the last `reset_counts` (NaN if none seen)."""
        zeroed, seen = self.counts.tolist()
        return zeroed / seen if seen else float("nan")

    def column_norms(self) -> Tensor:
        """||W[:, i]||_2 of every input channel i: fp32 (in_features,) (weight-informed scoring)."""
        return self.weight.detach().float().norm(dim=0)


# --------------------------------------------------------------------------- model-level
def sparse_linears(model: nn.Module) -> list:
    """All SparseLinear modules of a model."""
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def configure(model: nn.Module, *, sparse: Optional[bool] = None,
              sparsify_prefill: Optional[bool] = None, track: Optional[bool] = None) -> None:
    """Set the dispatch flags of every SparseLinear (None leaves a flag unchanged); setting
    `track` also resets the counters."""
    for m in sparse_linears(model):
        if sparse is not None:
            m.sparse = sparse
        if sparsify_prefill is not None:
            m.sparsify_prefill = sparsify_prefill
        if track is not None:
            m.track = track
            m.reset_counts()


@contextlib.contextmanager
def configured(model: nn.Module, **flags):
    """`configure(model, **flags)` for the duration of a with-block; every SparseLinear's
    sparse / sparsify_prefill / track flags are restored afterwards (counters are not)."""
    saved = [(m, m.sparse, m.sparsify_prefill, m.track) for m in sparse_linears(model)]
    for m in sparse_linears(model):
        for name, value in flags.items():
            setattr(m, name, value)
    try:
        yield model
    finally:
        for m, sparse, prefill, track in saved:
            m.sparse, m.sparsify_prefill, m.track = sparse, prefill, track


def set_kernel_policy(model: nn.Module, policy: KernelPolicy) -> nn.Module:
    """Hand `policy` to every module of `model` that has a `kernel_policy` (the SparseLinear
    modules and the model's attention); returns the model."""
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.set_kernel_policy(policy)
        elif hasattr(m, "kernel_policy"):
            m.kernel_policy = policy
    return model


def set_thresholds(values: dict) -> None:
    """Set thresholds and calibrated sparsities of many projections at once.

    Args:
        values: {Projection: (threshold, sparsity)}; each module whose projections all appear
            gets one `set_thresholds` call (so its buffer takes its canonical shape) and
            `sparse = any(sparsity > 0)`; the others are set projection by projection.
    """
    by_module: dict = {}
    for p, value in values.items():
        if not isinstance(p, Projection) or not isinstance(value, tuple) or len(value) != 2:
            raise ValueError(f"set_thresholds takes {{Projection: (threshold, sparsity)}}, got "
                             f"{p!r}: {value!r}")
        by_module.setdefault(id(p.module), (p.module, {}))[1][p.index] = value
    for module, items in by_module.values():
        if len(items) == len(module.sizes):
            module.set_thresholds([items[i][0] for i in range(len(items))],
                                  [items[i][1] for i in range(len(items))])
        else:
            for i, (t, s) in items.items():
                module.set_threshold(i, t, s)
        module.sparse = any(s > 0.0 for s in module.sparsity)


def install_state_dict_hooks(root: nn.Module) -> None:
    """Make the state dict of `root` (and of any sub-module) hold one nn.Linear-shaped
    `<owner>.<name>.weight` per projection (views of the fused weight), and `load_state_dict`
    accept them, merging each module's projections into its fused buffer.

    A SparseLinear at `<owner>.<attr>` keeps its projections at `<owner>.<name>.weight`
    (e.g. `layers.0.attention.qkv` -> `layers.0.attention.q_proj.weight`, ...). The hooks sit on
    each owner and read its children when called (copies and re-sharded modules stay right),
    so loading reports missing or mis-shaped projections by those names.
    """
    for owner in root.modules():
        if _fused_children(owner):
            owner._register_state_dict_hook(_split_projections)
            owner._register_load_state_dict_pre_hook(_merge_projections, with_module=True)
            owner.register_load_state_dict_post_hook(_report_projections)


def _fused_children(owner: nn.Module) -> dict:
    return {attr: m for attr, m in owner.named_children()
            if isinstance(m, SparseLinear) and m.names != (attr,)}


def _split_projections(owner, state_dict, prefix, local_metadata) -> None:
    # The owner's keys are the tail of the (shared) destination: re-add them in order, each
    # fused weight replaced by its projections' rows (views).
    fused = _fused_children(owner)
    tail = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
    for key, value in tail:
        m = fused.get(key[len(prefix):].removesuffix(".weight")) if key.endswith(".weight") else None
        if m is None:
            state_dict[key] = value
            continue
        for n, (a, b) in zip(m.names, m._offsets()):
            state_dict[f"{prefix}{n}.weight"] = value[a:b]


def _merge_projections(owner, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    owner._fused_missing = []  # (fused key, projection keys absent), for _report_projections
    for attr, m in _fused_children(owner).items():
        own = f"{prefix}{attr}.weight"
        keys = [f"{prefix}{n}.weight" for n in m.names]
        if own in state_dict or not any(k in state_dict for k in keys):
            continue  # already fused, or nothing of this module given (reported as own)
        absent = [k for k in keys if k not in state_dict]
        parts = [state_dict.pop(k) for k in keys if k in state_dict]
        bad = [f"size mismatch for {k}: copying a param with shape {tuple(p.shape)}, the shape in "
               f"current model is {(n, m.in_features)}."
               for k, p, n in zip(keys, parts, m.sizes) if tuple(p.shape) != (n, m.in_features)]
        if absent or bad:
            error_msgs.extend(bad)
            owner._fused_missing.append((own, absent))
            continue
        state_dict[own] = torch.cat([p.t() for p in parts], dim=1).contiguous().t()


def _report_projections(owner, incompatible_keys) -> None:
    # name the missing projections instead of the fused parameter they would have filled
    for own, absent in getattr(owner, "_fused_missing", ()):
        if own in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove(own)
        incompatible_keys.missing_keys.extend(absent)
    owner._fused_missing = []
