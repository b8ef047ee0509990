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

Supported order (generate.py):  maybe_init_dist() -> load the full model -> set thresholds
(teal.thresholds.apply_uniform_sparsity / apply_sparsities, or SparseLinear.set_threshold)
-> apply_tp(model) -> setup_caches -> (compile) -> decode -> aggregate_counts -> report on
rank 0. Scalar thresholds may also be set after apply_tp (they apply unchanged to shards);
per-channel thresholds must be set before, on the full model, where apply_tp slices them.

References: Megatron-LM (Shoeybi et al., 2019, arXiv 1909.08053) for the column/row split;
gpt-fast's tp.py for the idea of hooking functional all-reduces after o/down projections.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from teal.sparse_linear import SparseLinear, fuse_shared_inputs, to_kernel_layout

TORCHRUN_HINT = ("run under torchrun --nproc_per_node N <script> ... (N processes, one per "
                 "GPU; N must divide the head, KV-head and MLP widths)")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# NVLink multicast (NVLS) can take a shared host's GPUs out of service: keep it off.
_SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                  "NVSHMEM_DISABLE_NVLS": "1"}

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


# ----------------------------------------------------------------------------- process group
def set_safe_nccl_env() -> None:
    """Keep NVLink multicast off (NCCL_NVLS_ENABLE=0 etc.) unless the caller set them."""
    for k, v in _SAFE_NCCL_ENV.items():
        os.environ.setdefault(k, v)


def maybe_init_dist(backend: Optional[str] = None) -> Optional[int]:
    """Initialise torch.distributed from a torchrun environment; return this rank or None.

    Not under torchrun (no RANK / WORLD_SIZE in the environment): returns None and does
    nothing, so single-process runs need no special casing. Under torchrun: picks NCCL when
    CUDA is available (and binds this process to GPU LOCAL_RANK) and gloo otherwise (or
    `backend`), initialises the default process group once (later calls return the rank).

    Raises:
        RuntimeError: a partial torchrun environment (e.g. RANK without MASTER_ADDR), or more
            ranks on this node than visible GPUs.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    present = [k for k in _TORCHRUN_VARS if k in os.environ]
    if not present:
        return None
    missing = [k for k in _TORCHRUN_VARS if k not in os.environ]
    if missing:
        raise RuntimeError(f"incomplete torchrun environment (missing {', '.join(missing)}); "
                           f"{TORCHRUN_HINT}")
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed support")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        set_safe_nccl_env()
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {n_gpu} GPU(s) visible; use "
                               f"--nproc_per_node <= {n_gpu}")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank


def is_initialized() -> bool:
    """True when a default process group exists (i.e. after maybe_init_dist under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    """True on rank 0 and in single-process runs: the process that prints and writes files."""
    return get_rank() == 0


def require_dist() -> int:
    """Return the world size of the initialised process group.

    Raises:
        RuntimeError: no process group; the message says how to launch under torchrun.
    """
    if not is_initialized():
        raise RuntimeError(f"tensor parallelism needs torch.distributed; {TORCHRUN_HINT}")
    return dist.get_world_size()


def barrier() -> None:
    """dist.barrier() when distributed, else nothing."""
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    """Tear down the default process group if there is one (call at the end of a script)."""
    if is_initialized():
        dist.destroy_process_group()


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
def _shard_sparse_linear(lin: SparseLinear, style: str, r: int, world: int) -> None:
    """Keep this rank's slice of `lin` in place ('colwise': output rows; 'rowwise': input)."""
    if hasattr(lin, "tp_shard"):  # e.g. quantized subclasses that know their own layout
        lin.tp_shard(style, r, world)
        return
    if type(lin) is not SparseLinear:
        raise NotImplementedError(f"{type(lin).__name__} has no tp_shard(style, rank, world) "
                                  f"method; only plain SparseLinear is sharded by tp.py")
    wt = lin.weight.detach().t()  # (K, N), input-channel major
    req = lin.weight.requires_grad
    if style == "colwise":
        n = lin.out_features // world
        wt = wt[:, r * n:(r + 1) * n].contiguous()
        lin.out_features = n
        th = lin.threshold.clone()  # full input seen: threshold unchanged (detach from group)
    else:
        k = lin.in_features // world
        wt = wt[r * k:(r + 1) * k].contiguous()
        lin.in_features = k
        th = lin.threshold
        th = (th[r * k:(r + 1) * k] if th.dim() == 1 else th).clone()
    lin.weight = nn.Parameter(wt.t(), requires_grad=req)
    lin.threshold = th
    lin._group = None
    lin.tp_style = style


@torch.no_grad()
def apply_tp(model, rank: Optional[int] = None, world_size: Optional[int] = None,
             shard_output: bool = True):
    """Shard a `model.Transformer` in place for tensor parallelism; returns the model.

    Args:
        model: the full model (weights on any device, thresholds already set; see the module
            docstring for the supported order). Fused q/k/v and gate/up groups are re-fused.
        rank, world_size: default to the initialised process group (maybe_init_dist). Given
            explicitly, the model is sharded without a process group (e.g. to check shapes);
            forward calls then still need an initialised group of that size.
        shard_output: make the lm_head vocab-parallel (all-gathered logits) when world_size
            divides the vocabulary; otherwise it stays replicated.

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

    had_groups = any(getattr(m, "_group", None) is not None for _, _, m in model.sparse_linears())
    reduce_hook = _ReduceHook(group) if group is not None else _missing_group_hook
    for layer in model.layers:
        attn, mlp = layer.attention, layer.feed_forward
        for owner, name in [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                           [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]:
            lin = getattr(owner, name)
            style = "colwise" if name in COLWISE else "rowwise"
            _shard_sparse_linear(lin, style, rank, world_size)
            if style == "rowwise":
                lin.register_forward_hook(reduce_hook)
        attn.n_head = cfg.n_head // world_size
        attn.n_local_heads = cfg.n_local_heads // world_size

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

    to_kernel_layout(model)
    if had_groups:
        fuse_shared_inputs(model)
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
    """Sum every SparseLinear's `counts` ([zeroed, seen]) over the ranks, in place.

    A collective: every rank must call it (once per measurement; call configure(track=True)
    or reset_counts before the next one). Afterwards `lin.effective_sparsity()` on any rank
    gives the model-wide value for that projection. Column-parallel projections see the same
    full input (the same mask) on every rank, so their sums are divided by the world size
    and the counts equal those of a single-process run; row-parallel shards add up.

    Returns (zeroed, seen) summed over all projections (sparsity = zeroed / seen).
    Single-process: no communication, just the totals.
    """
    lins = [m for _, _, m in model.sparse_linears()]
    if not lins:
        return 0.0, 0.0
    if is_initialized() and world_size() > 1:
        stacked = torch.stack([m.counts.double() for m in lins])  # (P, 2)
        if dist.get_backend() == "nccl" and not stacked.is_cuda:
            stacked = stacked.cuda()
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked.cpu()
        ws = world_size()
        for m, c in zip(lins, stacked):
            if getattr(m, "tp_style", None) != "rowwise":
                c = c / ws
            m.counts.copy_(c.to(m.counts))
    tot = torch.stack([m.counts.double().cpu() for m in lins]).sum(0)
    return float(tot[0]), float(tot[1])
