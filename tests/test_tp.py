"""Tensor parallelism (tp.py) on CPU: gloo process groups started by the tests themselves.

Each multi-process test forks `world` processes and sets the torchrun environment variables
by hand (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free port), so
`tp.maybe_init_dist` runs exactly as under torchrun. For the tiny models every rank builds
the same seeded full model, computes the single-process reference itself, shards a copy with
`tp.apply_tp` and compares logits (fp32, 1e-5 relative), greedy KV-cache generations
(identical tokens) and the rank-aggregated effective sparsity (identical counts). For the
SmolLM2-135M checkpoint the parent computes the reference once and the ranks inherit it.
"""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import tp
from model import ModelArgs, Transformer
from teal.calibration import collect_histograms
from teal.projections import model_projection
from teal.sparse_linear import configure, sparse_linears
from teal.thresholds import Calibration, apply_uniform_sparsity

from fixtures_smollm2 import smollm2  # noqa: F401 (pytest fixture: prepares the checkpoint)


TINY = dict(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_local_heads=2, dim=64,
            intermediate_size=128)
# SmolLM2-like head layout (9 heads, 3 KV heads) for world size 3; vocab 128 is not a
# multiple of 3, so the lm_head stays replicated (the other output path).
TINY9 = dict(block_size=64, vocab_size=128, n_layer=2, n_head=9, n_local_heads=3, dim=72,
             intermediate_size=96)


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2-3 ranks share 2 cores
    assert tp.maybe_init_dist() == local_rank
    try:
        fn(*args)
    finally:
        tp.destroy()


def _spawn(world: int, fn, *args) -> None:
    # fork: the ranks inherit the imported modules and any model built by the parent (no
    # re-import or re-load per rank, which dominates the CPU time). Each rank sets one
    # intra-op thread before any torch work, so no OpenMP pool crosses the fork.
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True,
                       start_method="fork")


def _calibrate(model: Transformer, tokens: torch.Tensor) -> Calibration:
    """Histograms of the four projection inputs of every block over one forward of tokens."""
    return collect_histograms(model, tokens.reshape(-1), tokens.numel(), weighted=False,
                              progress=False)


def _per_channel_thresholds(model: Transformer, tokens: torch.Tensor, s: float) -> None:
    """Per-input-channel thresholds: the s-quantile of |x_i| over the tokens, per projection."""
    acts = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a: acts.__setitem__(id(mod), a[0].reshape(-1, a[0].shape[-1])))
        for m in sparse_linears(model)]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    for layer, name, p in model.projections():
        p.set_threshold(torch.quantile(acts[id(p.module)].abs(), s, dim=0))
        p.module.sparse = True


@torch.no_grad()
def _greedy(model: Transformer, prompt: torch.Tensor, n_new: int, step=None) -> torch.Tensor:
    """Prefill `prompt` (1, T) through the KV cache, then `n_new` greedy decode steps."""
    step = model if step is None else step
    t = prompt.shape[1]
    logits = model(prompt, torch.arange(t))
    tok = logits[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    for i in range(n_new - 1):
        tok = step(tok, torch.tensor([t + i])).argmax(-1)[:, -1:]
        out.append(tok)
    return torch.cat(out, dim=1)


def _assert_logits_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _compare(ref_model: Transformer, prompt: torch.Tensor, n_new: int, what: str) -> None:
    """Shard a copy of ref_model over the process group; logits, tokens and counts must match."""
    tp_model = copy.deepcopy(ref_model)
    tp.apply_tp(tp_model)
    for m in (ref_model, tp_model):
        configure(m, track=True)  # also resets the counters
    with torch.no_grad():
        ref_logits, got_logits = ref_model(prompt), tp_model(prompt)
    _assert_logits_close(got_logits, ref_logits, f"{what} logits")
    ref_zero, ref_seen = _totals(ref_model)
    got_zero, got_seen = tp.aggregate_counts(tp_model)
    assert (got_zero, got_seen) == (ref_zero, ref_seen), f"{what}: effective sparsity counts"
    if ref_zero:
        assert 0.3 < ref_zero / ref_seen < 0.7, f"{what}: sparsity {ref_zero / ref_seen}"

    configure(ref_model, track=False)
    configure(tp_model, track=False)
    ref_model.setup_caches(1, prompt.shape[1] + n_new)
    tp_model.setup_caches(1, prompt.shape[1] + n_new)
    assert tp_model.layers[0].attention.kv_cache.k_cache.shape[1] == \
        ref_model.config.n_local_heads // tp.world_size()
    ref_tokens, got_tokens = _greedy(ref_model, prompt, n_new), _greedy(tp_model, prompt, n_new)
    assert torch.equal(got_tokens, ref_tokens), f"{what}: {got_tokens} != {ref_tokens}"


def _totals(model: Transformer) -> tuple[float, float]:
    c = torch.cat([m.counts for m in sparse_linears(model)]).sum(0)
    return float(c[0]), float(c[1])


# ----------------------------------------------------------------------------- workers
def _worker_tiny(cfg: dict, compile_check: bool) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**cfg)).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (1, 12))
    calib_tokens = torch.randint(0, cfg["vocab_size"], (1, 48))

    _compare(model, prompt, 6, "dense")

    apply_uniform_sparsity(model, _calibrate(model, calib_tokens), 0.5)
    configure(model, sparsify_prefill=True)
    _compare(model, prompt, 6, "scalar 50%")

    _per_channel_thresholds(model, calib_tokens, 0.5)
    _compare(model, prompt, 6, "per-channel 50%")

    if compile_check:
        # fullgraph capture of the hooked functional collectives (aot_eager: no C++ build).
        tp_model = tp.apply_tp(copy.deepcopy(model))
        tp_model.setup_caches(1, 20)
        model.setup_caches(1, 20)
        step = torch.compile(tp_model, backend="aot_eager", fullgraph=True)
        got = _greedy(tp_model, prompt, 5, step=step)
        assert torch.equal(got, _greedy(model, prompt, 5)), "compiled TP decode differs"


def _worker_checkpoint(model: Transformer, ref: dict, prompt: torch.Tensor, n_new: int) -> None:
    """Shard the (fork-inherited) full model once, then set each sparsity's scalar thresholds
    on the shards (a supported order for scalar thresholds) and compare with the reference."""
    tp.apply_tp(model)
    model.setup_caches(1, prompt.shape[1] + n_new)
    for s, (thresholds, ref_logits, ref_tokens) in ref.items():
        for layer, name, p in model.projections():
            p.set_threshold(thresholds[(layer, name)])
            p.module.sparse = s > 0
        with torch.no_grad():
            _assert_logits_close(model(prompt), ref_logits, f"SmolLM2 sparsity {s} logits")
        got = _greedy(model, prompt, n_new)
        assert torch.equal(got, ref_tokens), f"SmolLM2 sparsity {s}: {got} != {ref_tokens}"


# ----------------------------------------------------------------------------- tests
def test_tp2_matches_single_process():
    """World size 2, GQA 4/2 heads, vocab-parallel lm_head; dense, scalar and per-channel 50%;
    fused q/k/v and gate/up sharded per projection; torch.compile(fullgraph=True) traces the
    collectives."""
    _spawn(2, _worker_tiny, TINY, True)


def test_tp3_smollm2_layout():
    """World size 3 on SmolLM2's head layout (9 heads, 3 KV heads), replicated lm_head."""
    _spawn(3, _worker_tiny, TINY9, False)


def test_tp3_smollm2_checkpoint(smollm2):
    """The real SmolLM2-135M over 3 ranks: logits and a few greedy tokens, dense and 50%."""
    from model import load_model
    model, _ = load_model(smollm2.checkpoint)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 6), generator=gen)
    calib = _calibrate(model, torch.randint(0, vocab, (1, 32), generator=gen))
    configure(model, sparsify_prefill=True)  # the compared logits are sparse too
    n_new, ref = 3, {}
    for s in (0.0, 0.5):
        apply_uniform_sparsity(model, calib, s)
        thresholds = {(layer, name): p.threshold.clone()
                      for layer, name, p in model.projections()}
        with torch.no_grad():
            logits = model(prompt)
        model.setup_caches(1, prompt.shape[1] + n_new)
        ref[s] = (thresholds, logits, _greedy(model, prompt, n_new))
    model.max_batch_size = model.max_seq_length = -1  # ranks re-allocate local caches
    for b in model.layers:
        b.attention.kv_cache = None
    _spawn(3, _worker_checkpoint, model, ref, prompt, n_new)


def _small(**over) -> Transformer:
    return Transformer(ModelArgs(**{**TINY, **over}))


@pytest.mark.parametrize("over, world, what", [
    (dict(), 3, "n_head=4"),
    (dict(n_head=6, n_local_heads=2, dim=48), 3, "KV heads"),
    (dict(n_head=8, n_local_heads=1, dim=64), 2, "KV heads"),
    (dict(intermediate_size=129), 2, "intermediate_size=129"),
])
def test_indivisible_world_size(over, world, what):
    model = _small(**over)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=what):
        tp.apply_tp(model, rank=0, world_size=world)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model changed on error"


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_missing_torchrun_env(monkeypatch):
    for k in _TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    assert tp.maybe_init_dist() is None
    assert tp.world_size() == 1 and tp.is_rank0()
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        tp.apply_tp(_small())
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        tp.require_dist()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="incomplete torchrun environment"):
        tp.maybe_init_dist()


def test_shard_shapes_without_process_group(monkeypatch):
    """Explicit rank/world_size shards shapes (incl. per-channel thresholds) with no group;
    a forward then says how to launch."""
    for k in _TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    model = _small()
    down_t = torch.rand(TINY["intermediate_size"])
    q_t = torch.rand(TINY["dim"])
    model_projection(model, 0, "down_proj").set_threshold(down_t)
    model_projection(model, 0, "q_proj").set_threshold(q_t)
    model.setup_caches(1, 16)
    tp.apply_tp(model, rank=1, world_size=2)
    a, f = model.layers[0].attention, model.layers[0].feed_forward
    q, k, v = a.qkv.projections()
    assert (a.n_head, a.n_local_heads) == (2, 1)
    assert tuple(q.weight.shape) == (32, 64) and tuple(k.weight.shape) == (16, 64)
    assert tuple(a.o_proj.weight.shape) == (64, 32)
    assert tuple(f.down_proj.weight.shape) == (64, 64) and f.down_proj.in_features == 64
    assert all(m.weight.t().is_contiguous() for m in sparse_linears(model))
    assert torch.equal(f.down_proj.projection(0).threshold, down_t[64:])
    assert torch.equal(q.threshold, q_t)
    assert a.kv_cache.k_cache.shape == (1, 1, 16, 16)
    assert model.config.n_head == 2 and model.tp_info.full_config["n_head"] == 4
    assert tuple(model.output.weight.shape) == (64, 64)
    with pytest.raises(ValueError, match="already sharded"):
        tp.apply_tp(model, rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="torchrun"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_torchrun_configuration_error_is_one_line_from_rank0(tmp_path):
    """Issue 14 item 20: under torchrun a configuration error (3 ranks for 4 heads) is
    printed once, by rank 0, and every rank ends cleanly: no launcher traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tiny_models import tiny_model, write_checkpoint
    root = Path(__file__).resolve().parents[1]
    ckpt = write_checkpoint(tmp_path / "ck", tiny_model())  # 4 heads, 2 KV heads
    env = dict(os.environ, PYTHONPATH=str(root), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "3", str(root / "generate.py"), "--device", "cpu",
                        "--checkpoint_path", str(ckpt), "--prompt", "w1 w2",
                        "--max_new_tokens", "2"],
                       capture_output=True, text=True, cwd=root, env=env, timeout=300)
    text = r.stdout + r.stderr
    assert "Traceback" not in text and "ChildFailedError" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "3" in errors[0] and "divide" in errors[0], text
    assert r.returncode == 0, text
