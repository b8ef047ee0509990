"""Tensor parallelism (Megatron-style) for the TEAL sparse transformer over torch.distributed.

Run one process per GPU under torchrun; every rank holds 1/N of each block projection:

    column-parallel (split the output rows of W (out, in)):  q_proj, k_proj, v_proj,
        gate_proj, up_proj. Each rank sees the full (replicated) input, so the TEAL mask
        |x| > t is the same on every rank and thresholds are used unchanged.
    row-parallel (split the input columns of W):  o_proj, down_proj. Each rank sees its
        shard of the input (its heads / its slice of the MLP hidden state); the threshold
        is applied element-wise to that shard (a per-channel vector (K,) is sliced with the
        input dimension, a scalar stays) and the partial outputs are summed by an
        all-reduce (a forward hook on the projection, so model.py stays unaware of TP).
    attention: each rank owns n_head / N query heads and n_local_heads / N KV heads (GQA
        groups stay on one rank); the KV cache holds only the local KV heads.
    output head (lm_head): vocab-parallel (split the vocab rows) + an all-gather of the
        logits, when N divides the vocabulary; the token embedding stays replicated.

Collectives use `torch.distributed._functional_collectives` (traceable by torch.compile with
fullgraph=True and capturable in CUDA graphs); on CPU the gloo backend runs the same code.

Which projection is column- or row-parallel comes from `teal.projections` (one fused module
per shared input: q/k/v and gate/up column-parallel, o and down row-parallel).

Supported order (generate.py):  maybe_init_dist() -> load the full model -> set thresholds
(teal.thresholds.apply_uniform_sparsity / apply_sparsities, or Projection.set_threshold)
-> apply_tp(model) -> setup_caches -> (compile) -> decode -> aggregate_counts -> report on
rank 0. Scalar thresholds may also be set after apply_tp (they apply unchanged to shards);
per-channel thresholds must be set before, on the full model, where apply_tp slices them.

References: Megatron-LM (Shoeybi et al., 2019, arXiv 1909.08053) for the column/row split;
gpt-fast's tp.py for the idea of hooking functional all-reduces after o/down projections.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from teal.projections import INPUT_SPECS, input_module
from teal.sparse_linear import SparseLinear, sparse_linears

TORCHRUN_HINT = ("run under torchrun --nproc_per_node N <script> ... (N processes, one per "
                 "GPU; N must divide the head, KV-head and MLP widths)")


def is_initialized() -> bool:
    """True when a default process group exists (i.e. after maybe_init_dist under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def require_dist() -> int:
    """Return the world size of the initialised process group.

    Raises:
        RuntimeError: no process group; the message says how to launch under torchrun.
    """
    if not is_initialized():
        raise RuntimeError(f"tensor parallelism needs torch.distributed; {TORCHRUN_HINT}")
    return dist.get_world_size()


# ----------------------------------------------------------------------------- collectives
def _all_reduce_sum(x: Tensor, group) -> Tensor:
    """Sum x over the ranks of `group`.

    Under torch.compile: the functional collective (traceable with fullgraph=True, capturable
    in CUDA graphs). Eager: in-place dist.all_reduce on x (a fresh projection output), which
    avoids the AsyncCollectiveTensor wrapper (measured ~10x slower per call with gloo).
    """
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol
        return funcol.all_reduce(x, "sum", group)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _all_gather_last_dim(x: Tensor, group, world: int) -> Tensor:
    """Concatenate x (..., n) of every rank along the last dim -> (..., world * n), rank order."""
    lead, n = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, n).contiguous()  # (M, n)
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol
        # Gather along dim 0, the form every backend supports, then permute back.
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        g = gather(flat, 0, group)  # (world * M, n)
        g = g.view(world, flat.shape[0], n).permute(1, 0, 2)  # (M, world, n)
        return g.reshape(*lead, world * n)
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=group)
    return torch.cat(parts, dim=-1).view(*lead, world * n)


class _ReduceHook:
    """Forward hook: all-reduce (sum) a row-parallel projection's partial output."""

    def __init__(self, group):
        self.group = group

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        return _all_reduce_sum(output, self.group)


class _GatherHook:
    """Forward hook: all-gather vocab-parallel logits along the last dim."""

    def __init__(self, group, world: int):
        self.group, self.world = group, world

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        return _all_gather_last_dim(output, self.group, self.world)


# ----------------------------------------------------------------------------- sharding
@dataclasses.dataclass(frozen=True)
class TPInfo:
    """What apply_tp did; stored as `model.tp_info`.

    Attributes:
        rank, world_size: this shard and the number of shards.
        full_config: the unsharded ModelArgs as a dict (model.config holds per-rank widths).
        sharded_output: the lm_head is vocab-parallel (logits are all-gathered).
    """

    rank: int
    world_size: int
    full_config: dict
    sharded_output: bool


def check_divisible(config, world: int) -> None:
    """Raise ValueError unless `world` ranks can split the heads, KV heads and MLP width."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    bad = [f"{name}={val}" for name, val in (("n_head", config.n_head),
                                             ("n_local_heads (KV heads)", config.n_local_heads),
                                             ("intermediate_size", config.intermediate_size))
           if val % world]
    if bad:
        raise ValueError(f"tensor parallelism over {world} ranks needs {world} to divide the "
                         f"number of heads, KV heads and the MLP width; not divisible: "
                         f"{', '.join(bad)}")


@torch.no_grad()
def apply_tp(model, rank: Optional[int] = None, world_size: Optional[int] = None,
             shard_output: bool = True):
    """Shard a `model.Transformer` in place for tensor parallelism; returns the model.

    Args:
        model: the full model (weights on any device, thresholds already set; see the module
            docstring for the supported order).
        rank, world_size: default to the initialised process group (maybe_init_dist). Given
            explicitly, the model is sharded without a process group (e.g. to check shapes);
            forward calls then still need an initialised group of that size.
        shard_output: make the lm_head vocab-parallel (all-gathered logits) when world_size
            divides the vocabulary; otherwise it stays replicated.
        Fused modules are sharded in place (`SparseLinear.tp_shard`).

    After the call, `model.config` is a copy with per-rank widths (n_head, n_local_heads,
    intermediate_size), so `setup_caches` allocates local KV heads (existing caches are
    re-allocated); `model.tp_info.full_config` keeps the original. world_size 1: no change.

    Raises:
        RuntimeError: rank/world_size not given and no process group (not under torchrun).
        ValueError: world_size does not divide n_head, the KV heads or intermediate_size;
            the model is already sharded; rank out of range.
    """
    if world_size is None:
        world_size = require_dist()
    if rank is None:
        rank = get_rank()
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if getattr(model, "tp_info", None) is not None:
        raise ValueError("model is already sharded (apply_tp was called before)")
    if is_initialized() and world_size != dist.get_world_size():
        raise ValueError(f"world_size={world_size} but the process group has "
                         f"{dist.get_world_size()} ranks")
    cfg = model.config
    check_divisible(cfg, world_size)
    if world_size == 1:
        return model
    group = dist.group.WORLD if is_initialized() else None

    reduce_hook = _ReduceHook(group) if group is not None else _missing_group_hook
    for layer in model.layers:
        for spec in INPUT_SPECS:
            module = input_module(layer, spec.name)
            if type(module) is not SparseLinear and not hasattr(module, "tp_shard"):
                raise NotImplementedError(f"{type(module).__name__} has no tp_shard(style, rank, "
                                          f"world) method; tp.py shards SparseLinear modules")
            module.tp_shard(spec.parallel, rank, world_size)
            if spec.parallel == "row":
                module.register_forward_hook(reduce_hook)
        layer.attention.n_head = cfg.n_head // world_size
        layer.attention.n_local_heads = cfg.n_local_heads // world_size

    sharded_output = False
    out = model.output
    if shard_output and type(out) is nn.Linear and cfg.vocab_size % world_size == 0:
        v = cfg.vocab_size // world_size
        w = out.weight.detach()[rank * v:(rank + 1) * v].clone()  # unties a shared embedding
        new = nn.Linear(w.shape[1], v, bias=False, device="meta", dtype=w.dtype)
        new.weight = nn.Parameter(w, requires_grad=out.weight.requires_grad)
        new.register_forward_hook(_GatherHook(group, world_size) if group is not None
                                  else _missing_group_hook)
        model.output = new
        sharded_output = True

    full = cfg.to_dict()
    model.config = dataclasses.replace(cfg, n_head=cfg.n_head // world_size,
                                       n_local_heads=cfg.n_local_heads // world_size,
                                       intermediate_size=cfg.intermediate_size // world_size,
                                       head_dim=cfg.head_dim)
    model.tp_info = TPInfo(rank, world_size, full, sharded_output)

    if getattr(model, "max_seq_length", -1) > 0:  # caches set up before: re-allocate local ones
        b, s = model.max_batch_size, model.max_seq_length
        dtype = model.layers[0].attention.kv_cache.k_cache.dtype
        model.max_batch_size = model.max_seq_length = -1
        model.setup_caches(b, s, dtype=dtype)
    return model


def _missing_group_hook(module, args, output):
    raise RuntimeError(f"this model was sharded by apply_tp without a process group; "
                       f"{TORCHRUN_HINT}")


# ----------------------------------------------------------------------------- reporting
@torch.no_grad()
def aggregate_counts(model) -> tuple[float, float]:
    """Sum every projection's `counts` ([zeroed, seen]) over the ranks, in place.

    A collective: every rank must call it (once per measurement; call configure(track=True)
    or reset_counts before the next one). Afterwards `Projection.effective_sparsity()` on any
    rank gives the model-wide value for that projection. Column-parallel projections see the
    same full input (the same mask) on every rank, so their sums are divided by the world
    size and the counts equal those of a single-process run; row-parallel shards add up.

    Returns (zeroed, seen) summed over all projections (sparsity = zeroed / seen).
    Single-process: no communication, just the totals.
    """
    mods = sparse_linears(model)
    if not mods:
        return 0.0, 0.0
    if is_initialized() and world_size() > 1:
        stacked = torch.cat([m.counts.double() for m in mods])  # (sum S, 2)
        if dist.get_backend() == "nccl" and not stacked.is_cuda:
            stacked = stacked.cuda()
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked.cpu()
        ws, i = world_size(), 0
        for m in mods:
            c = stacked[i:i + m.counts.shape[0]]
            i += m.counts.shape[0]
            m.counts.copy_((c if m.tp_style == "row" else c / ws).to(m.counts))
    tot = torch.cat([m.counts.double().cpu() for m in mods]).sum(0)
    return float(tot[0]), float(tot[1])
