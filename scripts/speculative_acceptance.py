"""Acceptance of greedy speculative decoding with TEAL self-drafts, on a real model.

    python scripts/speculative_acceptance.py --sparsities 0.4 0.5 0.65 0.8 --ks 2 3 4 5 6 \
        --draft_quant checkpoints/SmolLM2-135M-Instruct/model_int4-g32.pth --json out.json

Per prompt (prompts/generation.jsonl), the verifier (the checkpoint at --verifier_sparsity,
dense by default) makes its greedy continuation once. With greedy acceptance every
accepted token is the verifier's, so a draft's proposal at position j depends only on the
verifier's tokens before j while the proposals match: one forward of the draft over the
verifier's continuation (prompt prefilled densely, every generated position sparsified
with its own mask, as its decode steps would be) gives, for each position, whether the
draft's next-token argmax equals the verifier's token. The verify loop is then replayed
for every k: a step keeps the run of matching proposals (at most k) and adds one verifier
token. This is exactly the token accounting of `teal.speculative.speculative_generate`
(up to the rounding of batched against one-row products); `--check N` runs the real loop
for N prompts of the first draft at the first k and prints both counts side by side.

Prints one table (acceptance rate and tokens per verify step per draft and k) and writes
JSON (per draft and k: acceptance_rate, tokens_per_step, all_kept_fraction, steps) for
`scripts/bench_decode.py --speculate --acceptance FILE`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from teal.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from teal.cli import HelpFormatter  # noqa: E402

DEFAULT_PROMPTS = _ROOT / "prompts" / "generation.jsonl"


def replay(matches: list, k: int) -> dict:
    """Greedy speculative steps over one continuation.

    matches[j]: the draft's proposal for new token j + 1 equals the verifier's, given every
    earlier token (j = 0 .. n - 2 for n new tokens; new token 0 comes from the prefill).
    Returns dict(steps, accepted, proposed, all_kept, tokens) for proposals of k tokens."""
    n = len(matches) + 1
    j = steps = accepted = all_kept = 0
    made = 1
    while made < n:
        a = 0
        while a < k and j + a < len(matches) and matches[j + a]:
            a += 1
        steps += 1
        accepted += a
        all_kept += a == k
        step_tokens = min(a + 1, n - made)
        made += step_tokens
        j += step_tokens
    return dict(steps=steps, accepted=accepted, proposed=k * steps, all_kept=all_kept,
                tokens=n - 1)


@torch.no_grad()
def draft_matches(draft, prompt_ids: list, continuation: list) -> list:
    """matches[j] for the continuation (see `replay`): the draft prefills the prompt densely
    (its KV cache), then one forward over continuation[:-1], every position sparsified."""
    from teal.generation import dense_forward
    from teal.sparse_linear import configured
    device = draft.tok_embeddings.weight.device
    t, n = len(prompt_ids), len(continuation)
    if n < 2:
        return []
    with torch.device(device):
        draft.setup_caches(1, t + n)
    p = torch.tensor(prompt_ids, dtype=torch.int, device=device).view(1, -1)
    dense_forward(draft, p, torch.arange(t, device=device))
    x = torch.tensor(continuation[:-1], dtype=torch.int, device=device).view(1, -1)
    with configured(draft, sparsify_prefill=True):
        logits = draft(x, torch.arange(t, t + n - 1, device=device))[0]
    pred = logits.argmax(-1).tolist()
    return [a == b for a, b in zip(pred, continuation[1:])]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                    help="the verifier's checkpoint (and the self-draft's weights)")
    ap.add_argument("--draft_quant", type=Path, nargs="*", default=[],
                    help="quantized copies of the model (quantize.py) also tried as drafts")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.5, 0.65, 0.8],
                    help="draft sparsities (uniform, the checkpoint's calibration)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 5, 6],
                    help="proposals per verify step")
    ap.add_argument("--verifier_sparsity", type=float, default=0.0,
                    help="the verifier's sparsity (0: lossless against the dense model)")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="prompt file (jsonl)")
    ap.add_argument("--limit", type=int, default=16, help="prompts used (the first N)")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="verifier tokens per prompt")
    ap.add_argument("--check", type=int, default=0,
                    help="also run the real speculative loop on this many prompts (first "
                         "draft, first k) and print its counts beside the replay's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="activation dtype")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from generate import _load_tokenizer, apply_sparsity, load_sparse_model
    from teal.cli import check_device
    from teal.generation_eval import encode_prompt, greedy_continuation, load_prompts
    from teal.io import atomic_write_json
    from teal.provenance import environment
    from teal.speculative import share_weights, speculative_generate

    try:
        check_device(args.device)
        prompts = load_prompts(args.prompts)[:args.limit]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if min(args.ks) < 1 or not all(0.0 <= s < 1.0 for s in args.sparsities):
        raise SystemExit("error: --ks must be >= 1 and --sparsities in [0, 1)")
    dtype = getattr(torch, args.dtype)
    model, meta = load_sparse_model(args.checkpoint_path, args.device, dtype,
                                    args.verifier_sparsity)
    model.eval()
    tokenizer = _load_tokenizer(args.checkpoint_path)
    stop_ids = set(tokenizer.eos_ids) - {None}
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    conts = []
    for ids in tqdm(prompt_ids, desc="verifier greedy", unit="prompt", file=sys.stderr):
        new, _ = greedy_continuation(model, ids, args.max_new_tokens, stop_ids)
        conts.append(new)

    drafts = [("bf16", None)] + [(Path(q).stem.replace("model_", ""), q) for q in args.draft_quant]
    results = []
    for label, path in drafts:
        if path is None:
            base = share_weights(model)
        else:
            base, _ = load_sparse_model(path, args.device, dtype, 0.0)
            base.eval()
        for s in args.sparsities:
            if path is None:
                apply_sparsity(base, meta, args.checkpoint_path, s)
            else:
                apply_sparsity(base, {}, path, s)
            matches = [draft_matches(base, ids, c) for ids, c in
                       tqdm(list(zip(prompt_ids, conts)), desc=f"draft {label} {s:.0%}",
                            unit="prompt", file=sys.stderr, leave=False)]
            for k in args.ks:
                tot = dict(steps=0, accepted=0, proposed=0, all_kept=0, tokens=0)
                for m in matches:
                    for key, v in replay(m, k).items():
                        tot[key] += v
                results.append(dict(draft=label, sparsity=s, k=k, **tot,
                                    acceptance_rate=tot["accepted"] / max(tot["proposed"], 1),
                                    tokens_per_step=tot["tokens"] / max(tot["steps"], 1),
                                    all_kept_fraction=tot["all_kept"] / max(tot["steps"], 1)))
            if args.check and label == drafts[0][0] and s == args.sparsities[0]:
                k = args.ks[0]
                real = dict(steps=0, accepted=0, tokens=0)
                for ids, c in zip(prompt_ids[:args.check], conts[:args.check]):
                    p = torch.tensor(ids, dtype=torch.int, device=args.device)
                    seq, st = speculative_generate(model, base, p, args.max_new_tokens, k,
                                                   stop_ids=stop_ids)
                    real["steps"] += st["verify_steps"]
                    real["accepted"] += st["accepted"]
                    real["tokens"] += st["decode_tokens"]
                    real.setdefault("identical", 0)
                    real["identical"] += seq[len(ids):].tolist() == c
                sim = dict(steps=0, accepted=0, tokens=0)
                for m in matches[:args.check]:
                    r = replay(m, k)
                    for key in sim:
                        sim[key] += r[key]
                print(f"check ({label} {s:.0%}, k={k}, {args.check} prompts): real loop {real}, "
                      f"replay {sim}", file=sys.stderr)
                results.append(dict(check=dict(draft=label, sparsity=s, k=k, real=real,
                                               replay=sim)))
    env = environment(_ROOT)
    if args.json:
        cli = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        cli["draft_quant"] = [str(q) for q in args.draft_quant]
        atomic_write_json(args.json, dict(env=env, args=cli, rows=results), make_parents=True)
    print(f"\n{len(prompts)} prompts x up to {args.max_new_tokens} verifier tokens "
          f"(verifier at {args.verifier_sparsity:.0%}, {args.dtype}, {args.device})")
    print(f"{'draft':<12} {'sparsity':>8} " + " ".join(f"{'k=' + str(k):>13}" for k in args.ks))
    print(f"{'':<12} {'':>8} " + " ".join(f"{'acc  tok/step':>13}" for _ in args.ks))
    for label, _ in drafts:
        for s in args.sparsities:
            cells = [r for r in results if r.get("draft") == label and r.get("sparsity") == s]
            print(f"{label:<12} {s:>8.0%} " + " ".join(
                f"{r['acceptance_rate']:>6.1%} {r['tokens_per_step']:>5.2f}" for r in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
