"""Tensor parallelism, the launcher side: the process group of a torchrun run.

    torchrun --nproc_per_node 2 generate.py --sparsity 0.5 --compile --device cuda

`maybe_init_dist` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and starts the default process group (NCCL on GPUs with NVLink multicast kept
off, gloo on CPU); the model-side work (sharding the projections, the collectives, the
rank-summed counters) is `teal.tp`, re-exported here: `apply_tp`, `aggregate_counts`.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

from teal.tp import (TORCHRUN_HINT, TPInfo, aggregate_counts, apply_tp, check_divisible,  # noqa: F401
                     get_rank, is_initialized, require_dist, world_size)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# NVLink multicast (NVLS) can take a shared host's GPUs out of service: keep it off.
_SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                  "NVSHMEM_DISABLE_NVLS": "1"}


# ----------------------------------------------------------------------------- process group
def set_safe_nccl_env() -> None:
    """Keep NVLink multicast off (NCCL_NVLS_ENABLE=0 etc.) unless the caller set them."""
    for k, v in _SAFE_NCCL_ENV.items():
        os.environ.setdefault(k, v)


def maybe_init_dist(backend: Optional[str] = None, device: Optional[str] = None) -> Optional[int]:
    """Initialise torch.distributed from a torchrun environment; return this rank or None.

    Not under torchrun (no RANK / WORLD_SIZE in the environment): returns None and does
    nothing, so single-process runs need no special casing. Under torchrun: picks NCCL when
    CUDA is available (and binds this process to GPU LOCAL_RANK) and gloo otherwise (or
    `backend`), initialises the default process group once (later calls return the rank).
    `device` (a CLI's --device) is checked first (`teal.cli.check_device`, also when not under
    torchrun) and picks the backend: gloo for "cpu", NCCL for "cuda".

    Raises:
        ValueError: an unusable `device` (one line naming the fix).
        RuntimeError: a partial torchrun environment (e.g. RANK without MASTER_ADDR), or more
            ranks on this node than visible GPUs.
    """
    if device is not None:
        from teal.cli import check_device
        check_device(device)
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
        on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        backend = "nccl" if on_gpu else "gloo"
    if backend == "nccl":
        set_safe_nccl_env()
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {n_gpu} GPU(s) visible; use "
                               f"--nproc_per_node <= {n_gpu}")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank


def is_rank0() -> bool:
    """True on rank 0 and in single-process runs: the process that prints and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """dist.barrier() when distributed, else nothing."""
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    """Tear down the default process group if there is one (call at the end of a script)."""
    if is_initialized():
        dist.destroy_process_group()


def exit_on_config_error(message: str) -> None:
    """Under torchrun, end this rank cleanly on a configuration error; else return.

    Every rank meets the same configuration error (bad flags, a world size that does not
    divide the heads), so: rank 0 prints `error: <message>` (once for the whole run), the
    process group is destroyed, and every rank exits with status 0. torchrun prints its own
    traceback (ChildFailedError) for any non-zero exit of a worker, so status 0 is the only
    way to end with just the one line. Not under torchrun: returns (the caller exits 1).
    """
    if is_initialized():
        rank = get_rank()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # before the group started
        try:
            rank = int(os.environ["RANK"])
        except ValueError:
            return
    else:
        return
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    destroy()
    raise SystemExit(0)


def main(argv=None) -> int:
    """`python tp.py --help`: this module is not run directly; it explains how to launch."""
    import argparse

    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nNot a command of its own: launch a CLI "
        "under torchrun, e.g.\n\n    torchrun --nproc_per_node 2 generate.py --sparsity 0.5 "
        "--compile --device cuda\n\n(see `python generate.py --help` for its flags).",
        formatter_class=HelpFormatter)
    p.parse_args(argv)
    p.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
