"""TEAL sparse linear layers: y = W (x * [|x| > t]), the projections of TEAL Section 3.

`SparseLinear` holds the S >= 1 projections of a block that read the same input x (fused
q/k/v: S = 3; o_proj: S = 1; gate/up: S = 2 with the SwiGLU epilogue; down_proj: S = 1) in
one weight buffer, with one threshold per projection, and dispatches:
- sparsity off (`sparse = False`): one dense GEMM over the fused buffer;
- prefill (more than one token) with `sparsify_prefill = False`: dense, as TEAL does at
  inference;
- a decode step (one token) that its `KernelPolicy` runs on a kernel (CUDA, fp16/bf16): one
  fused sparse GEMV launch that skips the weight rows of dropped input channels, each
  projection with its own threshold (`teal.kernels`); a sparse call of 2 to
  `KernelPolicy.max_rows` tokens (batch decoding; a speculative verify step with
  `sparsify_prefill`) runs the several-row kernel, each token with its own mask, dense and
  int8 weights;
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

from teal import kernels, quant
from teal.kernels.cpu import cpu_sparse_gemm
from teal.kernels.dispatch import DEFAULT_POLICY, KernelPolicy
from teal.kernels.formats import get_format

__all__ = ["SparseLinear", "QuantizedSparseLinear", "Projection", "quantize_model", "configure", "configured", "sparse_linears", "set_kernel_policy",
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
        self._init_storage(device, dtype)
        self.register_buffer("threshold", torch.zeros(len(sizes), device=device), persistent=False)
        self.register_buffer("_zero_threshold", torch.zeros(len(sizes), device=device),
                             persistent=False)
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
        self._rows_launch = None  # the launch of a sparse call of 2..max_rows tokens, or None
        self._dense_launch = None  # quantized formats: the launch of a dense (t = 0) decode
        self._refresh_launch()

    wformat = "dense"  # the weight format (teal.kernels.formats); see QuantizedSparseLinear
    _STATE = ("weight",)  # the state-dict entries that hold the weight
    _EXACT_BUFFERS = ("threshold", "_zero_threshold", "counts")  # moved, never cast

    def _init_storage(self, device, dtype) -> None:
        w = torch.empty(self.in_features, sum(self.sizes), device=device, dtype=dtype)
        nn.init.normal_(w, std=self.in_features ** -0.5)
        self.weight = nn.Parameter(w.t())

    @property
    def act_dtype(self) -> torch.dtype:
        """The activation dtype this module computes in (the weight's, for dense)."""
        return self.weight.dtype

    def _kernel_weight(self) -> tuple:
        """(stored weight (K, ...) input-channel major, scales or None) for the kernels."""
        return self.weight.t(), None

    # per-projection state-dict entries (install_state_dict_hooks): nn.Linear-shaped weights
    def _state_parts(self, entry: str, value: Tensor) -> list:
        return [value[a:b] for a, b in self._offsets()]

    def _state_merge(self, entry: str, parts: list) -> Tensor:
        return torch.cat([p.t() for p in parts], dim=1).contiguous().t()

    def _state_shape(self, entry: str, i: int) -> tuple:
        return (self.sizes[i], self.in_features)

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
        # `.to(dtype)` must not cast the fp32 thresholds, fp64 counters or a quantized
        # format's scales (they are only moved), and a move must keep the weight
        # input-channel major.
        exact = {n: self._buffers.pop(n) for n in self._EXACT_BUFFERS if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            if exact:
                ref = next(iter(exact.values()))
                device = fn(torch.empty(0, device=ref.device)).device
                for n, b in exact.items():
                    self._buffers[n] = b if b.is_meta and device.type == "meta" else b.to(device)
        self._after_apply(fn)
        self._refresh_launch()
        return self

    def _after_apply(self, fn) -> None:
        if not self.weight.is_meta and not self.weight.t().is_contiguous():
            self.weight = nn.Parameter(self.weight.detach().t().contiguous().t(),
                                       requires_grad=self.weight.requires_grad)

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
        w, policy = self._kernel_weight()[0], self.kernel_policy
        dtype = self.act_dtype
        self._launch = self._dense_launch = self._rows_launch = None
        if (not policy.gemv or w.is_meta or dtype not in _KERNEL_DTYPES or not policy.allows(w.device)
                or not kernels.kernels_available(w.device)):
            return
        kind = "gated" if self.gated else "seg"
        self._launch = policy.launch(kind, self.in_features, self.sizes, dtype, self.wformat,
                                     min(self.sparsity), w.device)
        if policy.takes_rows(self.wformat):
            self._rows_launch = policy.launch(kind, self.in_features, self.sizes, dtype,
                                              self.wformat, min(self.sparsity), w.device, rows=2)
        if self.wformat != "dense":
            self._dense_launch = policy.launch(kind, self.in_features, self.sizes, dtype,
                                               self.wformat, 0.0, w.device)
        kernels.prepare(w.device)

    # ----------------------------------------------------------------------- forward
    def _sparse_for(self, x: Tensor) -> bool:
        return self.sparse and (self.sparsify_prefill or x.numel() == x.shape[-1] or x.shape[-2] == 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., sum N_s) (gated: (..., F)); dense when not sparse for x.

        A quantized format's decode step runs its kernel even when dense (threshold 0)."""
        if not self._sparse_for(x):
            if self._dense_launch is not None and self._kernel_ok(x) and self._rows(x) == 1:
                return self._kernel(x, self._zero_threshold, self._dense_launch, 0.0)
            if self._cpu_ok(x, dense=True):
                return self._cpu_kernel(x, dense=True)
            y = F.linear(x, self.weight)
        elif not self.track and (launch := self._sparse_launch(x)) is not None:
            return self._kernel(x, self.threshold, launch, min(self.sparsity))
        elif not self.track and self._cpu_ok(x, dense=False):
            return self._cpu_kernel(x, dense=False)
        else:
            y = self._masked_linear(x)
        if self.gated:
            g, u = y.split(self.sizes, dim=-1)
            return F.silu(g) * u
        return y

    def _rows(self, x: Tensor) -> int:
        return x.numel() // x.shape[-1] if x.shape[-1] else 0

    def _sparse_launch(self, x: Tensor):
        """The kernel launch of a sparse call on x: one token `_launch`, 2..max_rows tokens
        `_rows_launch`; None (the torch path) otherwise."""
        rows = self._rows(x)
        launch = self._launch if rows == 1 else self._rows_launch
        if (launch is None or rows < 1 or rows > self.kernel_policy.max_rows
                or not self._kernel_ok(x)):
            return None
        return launch

    def _kernel_ok(self, x: Tensor) -> bool:
        """x in the module's dtype and device, the weight in kernel layout, and no autograd
        (the kernels are inference only: with autograd on, the torch path runs)."""
        w = self._kernel_weight()[0]
        return (x.dtype == self.act_dtype and x.device == w.device
                and w.is_contiguous()
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)))

    def _kernel(self, x: Tensor, thresholds: Tensor, launch, sparsity: float) -> Tensor:
        wt, scales = self._kernel_weight()
        if self.gated:
            return kernels.sparse_gated_gemv(x, wt, thresholds, sparsity=sparsity, launch=launch,
                                             wformat=self.wformat, scales=scales)
        ends = [b for _, b in self._offsets()]
        return kernels.sparse_gemv(x, wt, thresholds, ends, sparsity=sparsity, launch=launch,
                                   wformat=self.wformat, scales=scales)

    def cpu_kernel_applies(self) -> bool:
        """One-token decode of this module runs the CPU kernel (`teal.kernels.cpu`, kept rows
        only): a dense-format weight on the CPU and a policy with `gemv` and `cpu` set, without
        the interpreter."""
        policy = self.kernel_policy
        return (self.wformat == "dense" and self.weight.device.type == "cpu" and policy.gemv
                and policy.cpu is not None and not policy.interpreter)

    def _cpu_ok(self, x: Tensor, dense: bool) -> bool:
        """The CPU kernels (teal.kernels.cpu) take this call: a dense-format weight on the CPU,
        the policy's `cpu` implementation set, no autograd, and a call they measured faster
        than torch's: one token at any dtype (sparse; dense bf16/fp16), or several tokens in
        bf16/fp16 (torch's CPU GEMM on the input-channel-major layout is slow there)."""
        if not self.cpu_kernel_applies():
            return False
        policy, w = self.kernel_policy, self.weight
        if (x.device.type != "cpu" or x.dtype != w.dtype
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return False
        half = x.dtype in (torch.bfloat16, torch.float16)
        one = x.numel() == x.shape[-1]
        if policy.cpu == "gather":
            return one and (half or not dense)
        return half or (one and not dense)

    def _cpu_kernel(self, x: Tensor, dense: bool) -> Tensor:
        ends, t = [b for _, b in self._offsets()], self.threshold
        if self._shared and not self.gated:  # one mask: whole rows, one kept list
            ends, t = ends[-1:], t[:1]
        y = cpu_sparse_gemm(x.reshape(-1, self.in_features), self.weight.t(), t,
                            ends, gated=self.gated, dense=dense, impl=self.kernel_policy.cpu)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _masked_linear(self, x: Tensor) -> Tensor:
        """The exact torch path: each projection's input with |x| <= t_s zeroed, then a
        matmul (one mask and one GEMM when every projection has the same threshold)."""
        ax = x.float().abs()  # compared in fp32, as the kernels do
        weight = self.weight
        if self._shared:
            keep = ax > self.threshold[0]
            if self.track:
                self.counts[:, 0] += (~keep).sum()
                self.counts[:, 1] += keep.numel()
            return F.linear(x * keep, weight)
        ys = []
        for s, (a, b) in enumerate(self._offsets()):
            keep = ax > self.threshold[s]
            if self.track:
                self.counts[s, 0] += (~keep).sum()
                self.counts[s, 1] += keep.numel()
            ys.append(F.linear(x * keep, weight[a:b]))
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



class QuantizedSparseLinear(SparseLinear):
    """A `SparseLinear` whose weight is stored as int8 or int4 codes (teal.quant): the
    same projections, thresholds and dispatch, with the weight-only quantized formats of
    `teal.kernels.formats` ("int8", "int4-g32", "int4-g64", "int4-g128").

    Args:
        in_features, out_features, names, gated: as for SparseLinear (int4: even widths).
        wformat: the weight format.
        dtype: the activation dtype (default: torch's default dtype); it follows
            `.to(dtype)` like a floating weight would.

    Attributes:
        qweight: codes, input-channel major: int8 (K, sum N_s), or int4 uint8 (K, sum N_s / 2)
            (two columns per byte along N).
        scales: int8: fp32 (sum N_s,); int4: bf16 (ceil(K / group), 4, sum N_s / 2) (scales and
            biases of even and odd columns by byte column, teal.quant).
            Moved with the module, never cast.
        weight: (read-only) the dequantized weight, (sum N_s, K) in the activation dtype, the
            transposed view of a contiguous (K, sum N_s): what the torch path multiplies by
            (prefill, CPU, tracking); decode steps on a GPU run the quantized kernels, also
            when not sparse (threshold 0).
    The state dict holds `<owner>.<name>.qweight` (K, N_s or N_s / 2) and `.scales` per
    projection. Source: TEAL Section 4 (thresholds) with weight-only quantization (teal.quant).

    Raises:
        ValueError: an unknown or dense format, or odd widths under int4.
    """

    _STATE = ("qweight", "scales")
    _EXACT_BUFFERS = SparseLinear._EXACT_BUFFERS + ("scales",)

    def __init__(self, in_features: int, out_features, names: Optional[Sequence[str]] = None,
                 gated: bool = False, *, wformat: str, device=None, dtype=None):
        fmt = get_format(wformat)
        if not fmt.quantized:
            raise ValueError(f"QuantizedSparseLinear needs a quantized weight format, got {wformat!r}")
        self._fmt = fmt
        self._act_dtype = dtype or torch.get_default_dtype()
        super().__init__(in_features, out_features, names, gated, device=device, dtype=dtype)

    @property
    def wformat(self) -> str:
        return self._fmt.name

    def _init_storage(self, device, dtype) -> None:
        fmt, K, N = self._fmt, self.in_features, sum(self.sizes)
        if fmt.wfmt == 2 and any(n % 2 for n in self.sizes):
            raise ValueError(f"int4 packs two output columns per byte: the widths {self.sizes} of "
                             f"{', '.join(self.names)} must be even; quantize them with --mode int8")
        self.register_buffer("qweight", torch.zeros(K, fmt.columns_per_row(N), device=device,
                                                    dtype=fmt.storage_dtype(torch.bfloat16)))
        self.register_buffer("scales", torch.ones(fmt.scale_shape(K, N), device=device,
                                                  dtype=fmt.scale_dtype()))

    @property
    def act_dtype(self) -> torch.dtype:
        return self._act_dtype

    @property
    def weight(self) -> Tensor:
        if self.qweight.is_meta:
            return torch.empty(sum(self.sizes), self.in_features, device="meta", dtype=self._act_dtype)
        w = quant.dequantize(self.wformat, self.qweight, self.scales)
        return w.to(self._act_dtype).t()

    def _kernel_weight(self) -> tuple:
        return self.qweight, self.scales

    def _after_apply(self, fn) -> None:
        probe = fn(torch.empty(0, dtype=self._act_dtype, device=self.qweight.device))
        self._act_dtype = probe.dtype

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for entry in self._STATE:
            v = state_dict.get(prefix + entry)
            want = getattr(self, entry).dtype
            if torch.is_tensor(v) and v.dtype != want:  # assign=True would keep any dtype
                kwargs.get("error_msgs", args[-1]).append(
                    f"dtype mismatch for {prefix}{entry} ({', '.join(self.names)}): {self.wformat} "
                    f"stores {str(want).removeprefix('torch.')}, the checkpoint holds "
                    f"{str(v.dtype).removeprefix('torch.')}.")
                state_dict.pop(prefix + entry)
                continue
            if torch.is_tensor(v) and not v.is_meta and not v.is_contiguous():
                state_dict[prefix + entry] = v.contiguous()
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        self._refresh_launch()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, wformat={self.wformat}"

    # ------------------------------------------------------------------- state dict
    def _col_bounds(self) -> list:
        """Column ranges of the projections along the last dim of the codes and the scales
        (int4: byte columns, N_s / 2 each)."""
        div = 2 if self._fmt.wfmt == 2 else 1
        return [(a // div, b // div) for a, b in self._offsets()]

    def _state_parts(self, entry: str, value: Tensor) -> list:
        return [value[..., a:b] for a, b in self._col_bounds()]

    def _state_merge(self, entry: str, parts: list) -> Tensor:
        return torch.cat(parts, dim=-1).contiguous()

    def _state_shape(self, entry: str, i: int) -> tuple:
        n = self.sizes[i]
        if entry == "qweight":
            return (self.in_features, self._fmt.columns_per_row(n))
        return tuple(self._fmt.scale_shape(self.in_features, n))

    # ------------------------------------------------------------------- construction
    @classmethod
    @torch.no_grad()
    def from_module(cls, m: SparseLinear, spec: "quant.QuantSpec") -> "QuantizedSparseLinear":
        """Quantize a dense SparseLinear (weights, thresholds, sparsities, flags and policy
        carried over); on the meta device only the structure is built (for loading).

        Raises:
            ValueError: odd widths under int4, or a weight holding inf / NaN.
        """
        meta = m.weight.is_meta
        q = cls(m.in_features, m.sizes, m.names, m.gated, wformat=spec.wformat,
                device="meta" if meta else m.weight.device, dtype=m.weight.dtype)
        if not meta:
            parts = [quant.quantize(w, spec) for w in (m.weight[a:b] for a, b in m._offsets())]
            q.qweight = torch.cat([c for c, _ in parts], dim=1).contiguous()
            q.scales = torch.cat([sc for _, sc in parts], dim=-1).contiguous()
            q.threshold = m.threshold.clone()
            q._zero_threshold = m._zero_threshold.clone()
            q.counts = m.counts.clone()
        q.sparsity = list(m.sparsity)
        q._shared = m._shared
        q.sparse, q.sparsify_prefill, q.track = m.sparse, m.sparsify_prefill, m.track
        q.kernel_policy, q.tp_style = m.kernel_policy, m.tp_style
        q._refresh_launch()
        return q

    # ------------------------------------------------------------------- tensor parallel
    @torch.no_grad()
    def tp_shard(self, style: str, rank: int, world: int) -> None:
        """As `SparseLinear.tp_shard`, on the codes and scales: "column" keeps each
        projection's slice of output columns (int4: even slices); "row" keeps a slice of
        input channels, on int4 group boundaries.

        Raises:
            ValueError: unknown style, a width `world` does not divide, or (int4, row) a
                shard that does not start on a scale-group boundary.
        """
        fmt = self._fmt
        if style == "column":
            if any(n % world or (fmt.wfmt == 2 and (n // world) % 2) for n in self.sizes):
                raise ValueError(f"{world} ranks do not divide the widths {self.sizes} of "
                                 f"{self.names} into {'even ' if fmt.wfmt == 2 else ''}shards")
            qw = torch.cat([p.chunk(world, dim=-1)[rank] for p in self._state_parts("qweight", self.qweight)], dim=-1)
            sc = torch.cat([p.chunk(world, dim=-1)[rank] for p in self._state_parts("scales", self.scales)], dim=-1)
            self.sizes = tuple(n // world for n in self.sizes)
            th = self.threshold.clone()
        elif style == "row":
            K = self.in_features
            if K % world:
                raise ValueError(f"{world} ranks do not divide in_features {K} of {self.names}")
            k = K // world
            if fmt.group and k % fmt.group:
                raise ValueError(f"row-parallel shards of {self.names} hold {k} input channels, "
                                 f"not a multiple of the int4 group size {fmt.group}: quantize "
                                 f"with a smaller --groupsize or use fewer ranks")
            qw = self.qweight[rank * k:(rank + 1) * k]
            sc = self.scales[rank * k // fmt.group:(rank + 1) * k // fmt.group] if fmt.group else self.scales
            self.in_features = k
            th = self.threshold
            th = (th[:, rank * k:(rank + 1) * k] if th.dim() == 2 else th).clone()
        else:
            raise ValueError(f"unknown tensor-parallel style {style!r}; use 'column' or 'row'")
        self.qweight, self.scales = qw.contiguous(), sc.contiguous()
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
    # fused entry (weight, or a quantized format's qweight / scales) replaced by its
    # projections' parts (views).
    fused = _fused_children(owner)
    tail = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
    for key, value in tail:
        attr, _, entry = key[len(prefix):].rpartition(".")
        m = fused.get(attr)
        if m is None or entry not in m._STATE:
            state_dict[key] = value
            continue
        for n, part in zip(m.names, m._state_parts(entry, value)):
            state_dict[f"{prefix}{n}.{entry}"] = part


def _merge_projections(owner, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    owner._fused_missing = []  # (fused key, projection keys absent), for _report_projections
    for attr, m in _fused_children(owner).items():
        for entry in m._STATE:
            own = f"{prefix}{attr}.{entry}"
            keys = [f"{prefix}{n}.{entry}" for n in m.names]
            if own in state_dict or not any(k in state_dict for k in keys):
                continue  # already fused, or nothing of this module given (reported as own)
            absent = [k for k in keys if k not in state_dict]
            present = [(i, k) for i, k in enumerate(keys) if k in state_dict]
            parts = [state_dict.pop(k) for _, k in present]
            bad = [f"size mismatch for {k}: copying a param with shape {tuple(p.shape)}, the shape "
                   f"in current model is {m._state_shape(entry, i)}."
                   for (i, k), p in zip(present, parts)
                   if tuple(p.shape) != m._state_shape(entry, i)]
            if absent or bad:
                error_msgs.extend(bad)
                owner._fused_missing.append((own, absent))
                continue
            state_dict[own] = m._state_merge(entry, parts)


def _report_projections(owner, incompatible_keys) -> None:
    # name the missing projections instead of the fused parameter they would have filled
    for own, absent in getattr(owner, "_fused_missing", ()):
        if own in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove(own)
        incompatible_keys.missing_keys.extend(absent)
    owner._fused_missing = []


def quantize_model(model: nn.Module, spec: "quant.QuantSpec", head: str = "output",
                   progress=None) -> dict:
    """Replace every SparseLinear of `model` by its QuantizedSparseLinear (in place) and,
    with `spec.head`, the nn.Linear output head at attribute `head` too (a one-projection
    module; a tied embedding keeps its own dense copy). On the meta device only the
    structure is built (loading a quantized checkpoint). `progress`: called with each
    module's name after it is quantized (e.g. a progress bar's update).

    Returns:
        {"quantized": modules quantized, "projections": projections in them, "padded":
        projections whose K is not a multiple of the int4 group (the last group is short),
        "head": bool}.
    Raises:
        ValueError: a module that cannot take the format, named (e.g. odd int4 widths).
    """
    report = {"quantized": 0, "projections": 0, "padded": 0, "head": False}
    group = get_format(spec.wformat).group

    def count(m):
        report["quantized"] += 1
        report["projections"] += len(m.sizes)
        report["padded"] += len(m.sizes) if group and m.in_features % group else 0

    for name, m in list(model.named_modules()):
        if type(m) is not SparseLinear:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, attr, QuantizedSparseLinear.from_module(m, spec))
        except ValueError as e:
            raise ValueError(f"{name} ({', '.join(m.names)}): {e}") from None
        count(m)
        if progress is not None:
            progress(name)
    if spec.head:
        out = getattr(model, head, None)
        if not isinstance(out, nn.Linear) or out.bias is not None:
            raise ValueError(f"the model has no bias-free nn.Linear head at {head!r} to quantize")
        dense = SparseLinear(out.in_features, out.out_features, names=(head,), device="meta",
                             dtype=out.weight.dtype)
        dense.weight = nn.Parameter(out.weight.detach(), requires_grad=False)
        for n, b in list(dense._buffers.items()):  # the small buffers where the weight is
            dense._buffers[n] = torch.zeros(b.shape, dtype=b.dtype, device=out.weight.device)
        try:
            q = QuantizedSparseLinear.from_module(dense, spec)
        except ValueError as e:
            raise ValueError(f"{head}: {e} (or keep the head unquantized: --no-quantize_head)") from None
        setattr(model, head, q)
        count(q)
        if progress is not None:
            progress(head)
        report["head"] = True
    return report
