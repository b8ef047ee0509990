"""Generate text with TEAL sparse decoding (GPT-Fast-style CLI).

    python generate.py --sparsity 0.5 --prompt "Tell me about the moon." --chat

Loads a checkpoint (default: SmolLM2-135M-Instruct made by `scripts/prepare.py`), applies
TEAL thresholds for the requested sparsity from the calibration file next to it, prefills
the prompt densely (as TEAL does at inference), decodes token by token with sparse
projections, and prints the text, decode tokens/s, achieved GB/s (on the bytes actually
read), peak memory, and the measured effective sparsity per projection type.

The prompt: `--prompt TEXT`, `--prompt_file PATH` ("-": stdin) or, with `--interactive`,
one line of stdin per prompt; text that is not valid UTF-8 is a one-line error. A checkpoint
with a chat format (instruct models) gets the prompt wrapped in it unless `--no-chat` (a
prompt already written in that format is used as it is). The text is streamed as it is made;
what is printed is the decoded id sequence (a plain prompt's text, then the continuation),
without the end token that stopped generation. One untimed warm-up run precedes the timed
samples; tokens/s is the median over samples, and GB/s uses the bytes the decode path really
reads (the torch path on CPU, or `--kernels off`, reads every weight at any sparsity).

Runs under `torchrun --nproc_per_node N generate.py ...` for tensor parallelism (tp.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import teal
from model import load_model
from teal.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, default_thresholds, greedy_beside
from teal.cli import HelpFormatter, TextInputError, check_utf8, decode_utf8, read_line
from teal.dtypes import DTYPES
from teal.generation import (bytes_per_decode_step, decode_one_token, generate,  # noqa: F401
                             measure_effective_sparsity, skips_weight_rows)
from teal.tokenizer import TextStream
from teal.projections import PROJECTIONS
from teal.thresholds import ThresholdsError

DEFAULT_CALIB_TEXT = (Path(__file__).resolve().parent.parent / "shared" / "data"
                      / "wikitext-2-valid-tokenized.txt")
DEFAULT_PROMPT = "What are the three primary colors?"
WARMUP_TOKENS = 16  # new tokens of the untimed warm-up run (compile, CUDA graphs, allocator)
NO_DECODE_STEP = ("Decode: no decode step ran (generation ended with the prefill's token); "
                  "use --max_new_tokens 2 or more, or a prompt the model does not end at once")


# ----------------------------------------------------------------------------- setup
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fail(msg: str) -> None:
    """Exit with a one-line error (no traceback); under torchrun printed once, by rank 0,
    and the process group ends cleanly (tp.exit_on_config_error)."""
    from tp import exit_on_config_error
    exit_on_config_error(msg)
    raise SystemExit(f"error: {msg}")


def load_sparse_model(checkpoint_path, device, dtype, sparsity: float,
                      thresholds: Optional[Path] = None, allocation: str = "uniform",
                      scoring: str = "magnitude", calibration: str = "dense",
                      calib_text: Optional[Path] = None, calib_tokens: int = 8192,
                      progress: bool = False):
    """Load a checkpoint and apply TEAL thresholds for `sparsity`. Returns (model, meta).

    `calibration="sequential"` re-derives the thresholds on the sparsified model's own
    activations over `calib_tokens` of `calib_text` (teal.allocation.calibrate_sequentially),
    so the measured sparsity matches the target; "dense" uses the file's dense histograms
    (TEAL's recipe), which overshoot downstream projections at high sparsity.

    Raises SystemExit with a one-line message for bad input (missing/corrupt checkpoint,
    thresholds for another model, sparsity outside [0, 1)). `progress`: say on stderr what
    runs (loading, sequential calibration with a bar over the blocks).
    """
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if not 0.0 <= sparsity < 1.0:
        fail(f"--sparsity must be in [0, 1), got {sparsity}")
    say(f"Loading {checkpoint_path} onto {device} ...")
    try:
        model, meta = load_model(checkpoint_path, device=device, dtype=dtype)
    except CheckpointError as e:
        fail(str(e))
    apply_sparsity(model, meta, checkpoint_path, sparsity, thresholds, allocation, scoring,
                   calibration, calib_text, calib_tokens, progress)
    return model, meta


def apply_sparsity(model, meta: dict, checkpoint_path, sparsity: float,
                   thresholds: Optional[Path] = None, allocation: str = "uniform",
                   scoring: str = "magnitude", calibration: str = "dense",
                   calib_text: Optional[Path] = None, calib_tokens: int = 8192,
                   progress: bool = False) -> None:
    """Set the thresholds of a loaded model for `sparsity` (arguments as `load_sparse_model`;
    `checkpoint_path` locates the default calibration file and the tokenizer)."""
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if sparsity > 0 or allocation != "uniform" or scoring != "magnitude":
        path = Path(thresholds) if thresholds else default_thresholds(checkpoint_path)
        from teal.allocation import apply_config, calibrate_sequentially
        from teal.calibration import load_token_ids
        from teal.thresholds import Calibration
        try:
            calib = Calibration.load(path, model.config.to_dict())
            applied = apply_config(
                model, calib, sparsity, allocation=allocation, scoring=scoring,
                greedy=greedy_beside(path) if allocation == "greedy" else None,
                tuned=greedy_beside(path, kind="tuned") if allocation == "tuned" else None)
            if calibration == "sequential" and sparsity > 0:
                text = Path(calib_text or DEFAULT_CALIB_TEXT)
                if not text.exists():
                    fail(f"calibration text {text} not found; pass --calib_text")
                ids = load_token_ids(text, checkpoint_path, meta)
                seq_len = min(2048, model.config.block_size)
                if min(ids.numel(), calib_tokens) < seq_len:
                    fail(f"--calibration sequential needs at least {seq_len} calibration tokens (one "
                         f"window); --calib_text {text} has {ids.numel()} and --calib_tokens is "
                         f"{calib_tokens}: raise --calib_tokens or pass a longer text")
                say(f"Sequential calibration on {min(ids.numel(), calib_tokens)} tokens of "
                    f"{text} ...")
                calibrate_sequentially(model, calib, ids, applied, scoring,
                                       seq_len=seq_len, n_tokens=calib_tokens, progress=progress)
        except (ThresholdsError, ValueError, FileNotFoundError) as e:
            fail(str(e))


def _interactive_prompts(out=print):
    """Prompts read from stdin until an empty line or end of input.

    From a terminal the line is typed after "Prompt: "; from piped input (not a terminal,
    nothing is echoed) the line read is printed after "Prompt: ", so the transcript shows
    each prompt above its answer. A line that is not valid UTF-8 is a one-line error."""
    stdin = sys.stdin
    tty = bool(getattr(stdin, "isatty", lambda: False)())
    while True:
        try:
            if tty:
                try:
                    line = check_utf8(input("Prompt: "), "stdin")
                except UnicodeDecodeError as e:
                    raise TextInputError(f"stdin is not valid UTF-8 text (byte "
                                         f"0x{e.object[e.start]:02x}); pass UTF-8 text") from None
            else:
                out("Prompt: ", end="", flush=True)
                line = read_line(stdin, "stdin")
                out("" if line is None else line, flush=True)
        except EOFError:
            return
        except TextInputError as e:
            fail(str(e))
        if not line:
            return
        yield line


def read_prompt_file(path) -> str:
    """The prompt in a UTF-8 file (one final newline dropped); "-" reads stdin to its end.
    One-line errors (SystemExit) for a missing file or text that is not UTF-8."""
    source = "stdin (--prompt_file -)" if str(path) == "-" else f"--prompt_file {path}"
    try:
        if str(path) == "-":
            buf = getattr(sys.stdin, "buffer", None)
            text = decode_utf8(buf.read(), source) if buf is not None else \
                check_utf8(sys.stdin.read(), source)
        else:
            text = decode_utf8(Path(path).read_bytes(), source)
    except FileNotFoundError:
        fail(f"prompt file {path} not found")
    except IsADirectoryError:
        fail(f"--prompt_file {path} is a directory; pass a text file")
    except OSError as e:
        fail(f"cannot read prompt file {path} ({e.strerror or e})")
    except (TextInputError, UnicodeDecodeError) as e:
        fail(str(e))
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _load_tokenizer(checkpoint_path):
    """The checkpoint's tokenizer, or a one-line error (missing/corrupt files)."""
    from teal.checkpoint import CheckpointError, load_checkpoint
    from teal.tokenizer import load_tokenizer
    try:
        meta = load_checkpoint(checkpoint_path).get("meta", {})
    except CheckpointError as e:
        fail(str(e))
    try:
        return load_tokenizer(Path(checkpoint_path).parent, meta)
    except Exception as e:  # noqa: BLE001 - any tokenizer-library failure is a bad file
        fail(f"cannot load the tokenizer next to {checkpoint_path} ({e}); "
             f"convert the model again")


def check_args(args) -> None:
    """One-line errors for arguments that would otherwise fail deep inside."""
    if args.max_new_tokens < 1:
        fail(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        fail(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.top_k < 1:
        fail(f"--top_k must be at least 1, got {args.top_k}")
    if not (args.temperature >= 0.0) or args.temperature == float("inf"):
        fail(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.calib_tokens < 1:
        fail(f"--calib_tokens must be at least 1, got {args.calib_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        fail(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.speculate_k < 1:
        fail(f"--speculate_k must be at least 1, got {args.speculate_k}")
    if args.self_draft is not None and not 0.0 <= args.self_draft < 1.0:
        fail(f"--self_draft must be a sparsity in [0, 1), got {args.self_draft}")
    if args.draft_checkpoint_path is not None and args.draft_quant is not None:
        fail("--draft_checkpoint_path and --draft_quant both name the draft; pass one of them")
    from teal.cli import check_device
    try:
        for text in args.prompt or ():
            check_utf8(text, "--prompt")
    except TextInputError as e:
        fail(str(e))
    try:
        check_device(args.device)  # the one --device check of every CLI
    except ValueError as e:
        fail(str(e))


def resolve_prompts(args) -> list:
    """The prompts of this run: repeated --prompt, --prompt_file (one prompt, or one per
    non-empty line with --batch_size > 1), or the default; one prompt with --batch_size B
    is repeated B times (gpt-fast's batch). One-line errors for a count that is not B."""
    if args.prompt_file is not None:
        if args.interactive:
            fail("--prompt_file and --interactive both read the prompt; pass one of them")
        text = read_prompt_file(args.prompt_file)
        if (args.batch_size or 1) > 1:
            prompts = [line for line in text.splitlines() if line.strip()]
            if not prompts:
                fail(f"--prompt_file {args.prompt_file} has no non-empty line")
        else:
            prompts = [text]
    else:
        prompts = list(args.prompt or [DEFAULT_PROMPT])
    b = args.batch_size
    if b is not None and len(prompts) != b:
        if len(prompts) != 1:
            fail(f"{len(prompts)} prompts for --batch_size {b}: give one prompt (repeated) or "
                 f"exactly {b}")
        prompts = prompts * b
    return prompts


def _encode_prompt(tokenizer, text: str, chat: bool, max_new_tokens: int, model) -> list:
    """Token ids of one prompt (chat-wrapped when `chat`), or a one-line error."""
    if not text:
        fail("the prompt is empty; pass --prompt TEXT")
    try:
        text = tokenizer.apply_chat_template(text) if chat else text
    except ValueError as e:  # a model without a chat template
        fail(str(e))
    ids = tokenizer.encode(text, special=True)
    if not ids:
        fail("the prompt is empty; pass --prompt TEXT")
    if len(ids) + max_new_tokens > model.config.block_size:
        fail(f"prompt ({len(ids)} tokens) + --max_new_tokens ({max_new_tokens}) exceeds "
             f"the context length {model.config.block_size}; shorten one of them")
    return ids


def _shown(tokenizer, ids: list) -> list:
    return ids[1:] if tokenizer.add_bos and ids and ids[0] == tokenizer.bos_id else ids


def _sparsity_report(model, runs, out, target: float) -> None:
    """Print the measured sparsity per projection type over the generated tokens of `runs`
    [(ids tensor, prompt length)], weighted by their token counts."""
    if not any(p.sparse for _, _, p in model.projections()):
        return
    totals, weight = {}, 0
    for seq, plen in runs:
        n = seq.numel() - 1 - plen
        if n <= 0:
            continue
        for proj, v in measure_effective_sparsity(model, seq, plen).items():
            totals[proj] = totals.get(proj, 0.0) + v * n
        weight += n
    if not weight:
        return
    eff = {p: v / weight for p, v in totals.items()}
    parts = ", ".join(f"{p.replace('_proj', '')} {eff[p]:.1%}" for p in PROJECTIONS if p in eff)
    out(f"Effective sparsity (generated tokens): {parts}")
    sizes = {}
    for _, proj, p in model.projections():
        sizes[proj] = sizes.get(proj, 0) + p.in_features * p.out_features
    pw = sum(eff.get(p, 0.0) * n for p, n in sizes.items()) / sum(sizes.values())
    out(f"Parameter-weighted model-level sparsity: {pw:.1%} (target {target:.0%})")


def run_batch(args, model, tokenizer, prompts, chat, stop_ids, decode_fn, device) -> None:
    """--batch_size B: B prompts decoded together (teal.generation.generate_batch); prints
    each sequence's text and tokens/s, and the aggregate tokens/s (median of samples)."""
    from teal.generation import generate_batch
    encoded = [_encode_prompt(tokenizer, p, chat, args.max_new_tokens, model) for p in prompts]
    tensors = [torch.tensor(ids, dtype=torch.int, device=device) for ids in encoded]
    B = len(tensors)
    t_w = time.perf_counter()
    n_warm = min(args.max_new_tokens, WARMUP_TOKENS)
    generate_batch(model, tensors, n_warm, decode_fn, args.temperature, args.top_k)
    print(f"Warm-up ({n_warm} tokens x {B} sequences{', compiling' if args.compile else ''}, "
          f"untimed) in {time.perf_counter() - t_w:.1f} s", file=sys.stderr)
    torch.manual_seed(args.seed)
    rates, last = [], None
    for i in range(args.num_samples):
        seqs, tm = generate_batch(model, tensors, args.max_new_tokens, decode_fn,
                                  args.temperature, args.top_k, stop_ids)
        total = sum(tm["decode_tokens"])
        rate = total / tm["decode_s"] if total else float("nan")
        rates.append(rate)
        print(f"[sample {i + 1}] batch of {B}: {total} decode tokens in {tm['steps']} steps, "
              f"prefill {tm['prefill_s']:.3f} s, {rate:.2f} tokens/s aggregate", file=sys.stderr)
        last = (seqs, tm)
    seqs, tm = last
    for b, (ids, seq) in enumerate(zip(encoded, seqs)):
        new = [t for t in seq[len(ids):].tolist() if t not in stop_ids]
        text = tokenizer.decode(new) if chat else tokenizer.decode(_shown(tokenizer, ids) + new)
        n, s_b = tm["decode_tokens"][b], tm["sequence_decode_s"][b]
        rate_b = f"{n / s_b:.2f} tokens/s" if n else "no decode step"
        print(f"\n[sequence {b + 1}] {n + 1} tokens, {rate_b}\n{text}")
    timed = [r for r in rates if r == r]
    print("\n" + "-" * 60)
    if timed:
        gbytes = bytes_per_decode_step(model) / 1e9  # the union of B masks: every row, counted
        med = statistics.median(timed)
        print(f"Decode: {med:.2f} tokens/s aggregate over {B} sequences (median of "
              f"{len(timed)}); {gbytes * med / B:.2f} GB/s "
              f"counting every weight row once per step ({gbytes:.3f} GB)")
    else:
        print(NO_DECODE_STEP)
    _sparsity_report(model, [(seq, len(ids)) for ids, seq in zip(encoded, seqs)], print,
                     args.sparsity)


def _load_draft(args, model, meta, device, dtype):
    """The draft model of a speculative run: --draft_checkpoint_path / --draft_quant loaded at
    the --self_draft sparsity (default 0), or the model itself (shared weights) at
    --self_draft."""
    from teal.sparse_linear import QuantizedSparseLinear
    from teal.speculative import share_weights
    sparsity = args.self_draft if args.self_draft is not None else 0.0
    path = args.draft_checkpoint_path or args.draft_quant
    if path is not None:
        flag = "--draft_checkpoint_path" if args.draft_checkpoint_path else "--draft_quant"
        if not Path(path).is_file():
            fail(f"{flag} {path} not found; pass an existing checkpoint"
                 + (" (quantize.py writes one next to the model)" if args.draft_quant else ""))
        draft, _ = load_sparse_model(path, device, dtype, sparsity)
        quantized = any(isinstance(m, QuantizedSparseLinear) for m in draft.modules())
        if args.draft_quant and not quantized:
            fail(f"--draft_quant {path} holds no quantized weights; quantize the model with "
                 f"quantize.py, or pass a smaller model as --draft_checkpoint_path")
        if draft.config.vocab_size != model.config.vocab_size:
            fail(f"the draft {path} has {draft.config.vocab_size} tokens, the model "
                 f"{model.config.vocab_size}; use a draft with the same tokenizer")
        name = f"{path} at {sparsity:.0%}"
    else:
        draft = share_weights(model)
        allocation, _ = resolve_allocation(args, sparsity)
        apply_sparsity(draft, meta, args.checkpoint_path, sparsity, args.thresholds,
                       allocation, args.scoring, args.calibration, args.calib_text,
                       args.calib_tokens)
        name = f"the model itself at {sparsity:.0%} ({allocation}, shared weights)"
    if args.kernels == "off":
        teal.set_kernel_policy(draft, teal.KernelPolicy(gemv=False, attention=False))
    return draft.eval(), name


def run_speculative(args, model, meta, tokenizer, chat, stop_ids, device, dtype) -> None:
    """Speculative decoding (teal.speculative): the draft proposes --speculate_k tokens, the
    model verifies them in one forward; prints the text, tokens/s, acceptance rate and
    tokens per verify step (median tokens/s over samples)."""
    from teal.speculative import draft_step, speculative_generate, verify_step
    draft, name = _load_draft(args, model, meta, device, dtype)
    k = args.speculate_k
    draft_fn, verify_fn = draft_step, verify_step
    if args.compile:
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        draft_fn = torch.compile(draft_step, mode=mode, fullgraph=True)
        verify_fn = torch.compile(verify_step, mode=mode, fullgraph=True)
    print(f"Speculative decoding: draft = {name}, k = {k}, verifier at {args.sparsity:.0%}",
          file=sys.stderr)
    ids = _encode_prompt(tokenizer, args.prompt, chat, args.max_new_tokens, model)
    for m, who in ((model, "the model"), (draft, "the draft")):
        if len(ids) + args.max_new_tokens + k + 1 > m.config.block_size:
            fail(f"prompt ({len(ids)} tokens) + --max_new_tokens ({args.max_new_tokens}) + "
                 f"--speculate_k ({k}) + 1 exceeds {who}'s context length "
                 f"{m.config.block_size}; shorten the prompt or lower one of them")
    prompt = torch.tensor(ids, dtype=torch.int, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t_w = time.perf_counter()
    speculative_generate(model, draft, prompt, min(args.max_new_tokens, WARMUP_TOKENS), k,
                         temperature=args.temperature, top_k=args.top_k, draft_fn=draft_fn,
                         verify_fn=verify_fn, generator=gen)
    print(f"Warm-up (untimed) in {time.perf_counter() - t_w:.1f} s", file=sys.stderr)
    gen.manual_seed(args.seed)
    rates, st, seq = [], None, None
    for i in range(args.num_samples):
        stream = TextStream(tokenizer, _shown(tokenizer, ids))
        if not chat:
            print(tokenizer.decode(_shown(tokenizer, ids)), end="", flush=True)

        def on_token(tok, stream=stream):
            if tok not in stop_ids:
                print(stream.push(tok), end="", flush=True)

        seq, st = speculative_generate(model, draft, prompt, args.max_new_tokens, k,
                                       temperature=args.temperature, top_k=args.top_k,
                                       stop_ids=stop_ids, on_token=on_token, draft_fn=draft_fn,
                                       verify_fn=verify_fn, generator=gen)
        print(stream.flush(), flush=True)
        rate = st["decode_tokens"] / st["decode_s"] if st["decode_tokens"] else float("nan")
        rates.append(rate)
        accept = (f"acceptance {st['acceptance_rate']:.1%}, {st['tokens_per_step']:.2f} tokens "
                  f"per verify step" if st["proposed"] else "no token drafted")
        print(f"\n[sample {i + 1}] {st['decode_tokens'] + 1} tokens, {rate:.2f} tokens/s, "
              f"{accept} ({st['verify_steps']} steps)", file=sys.stderr)
    timed = [r for r in rates if r == r]
    print("\n" + "-" * 60)
    if timed:
        print(f"Decode: {statistics.median(timed):.2f} tokens/s (median of {len(timed)}), "
              f"speculative k = {k}")
    else:
        print(NO_DECODE_STEP)
    if not st["proposed"]:
        print("Acceptance rate: no token was drafted")
    else:
        print(f"Acceptance rate: {st['acceptance_rate']:.1%} of {st['proposed']} drafted "
              f"tokens; {st['tokens_per_step']:.2f} tokens per verify step; kept per step "
              f"(0..{k}): {st['accepted_histogram']}")
    _sparsity_report(model, [(seq, len(ids))], print, args.sparsity)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None,
                     help=f"input prompt; repeat it for a batch of distinct prompts (default: "
                          f"{DEFAULT_PROMPT!r})")
    src.add_argument("--prompt_file", type=Path, default=None,
                     help="read the prompt from this UTF-8 file instead (\"-\": stdin; one "
                          "final newline dropped); with --batch_size > 1, one prompt per "
                          "non-empty line (default: use --prompt)")
    ap.add_argument("--batch_size", type=int, default=None,
                    help="sequences decoded together, each at its own position in the KV "
                         "cache; one prompt is repeated B times, else give B prompts (default: "
                         "the number of --prompt flags)")
    spec = ap.add_argument_group("speculative decoding (lossless: greedy output = the "
                                 "verifier's own greedy output)")
    spec.add_argument("--draft_checkpoint_path", type=Path, default=None,
                      help="a smaller model of the same tokenizer drafts the tokens")
    spec.add_argument("--self_draft", type=float, default=None, metavar="SPARSITY",
                      help="the model itself drafts at this TEAL sparsity (sharing its weights); "
                           "with --draft_quant or --draft_checkpoint_path: that draft's sparsity")
    spec.add_argument("--draft_quant", type=Path, default=None,
                      help="a quantized copy of this model (quantize.py) drafts, at the "
                           "--self_draft sparsity (default 0)")
    spec.add_argument("--speculate_k", type=int, default=5,
                      help="tokens drafted per verify step")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap the prompt in the model's chat format; --no-chat: a plain prompt "
                         "(default: chat when the checkpoint has a chat format, e.g. an "
                         "instruct model)")
    ap.add_argument("--interactive", action="store_true",
                    help="read prompts from stdin, one per line, until an empty line")
    ap.add_argument("--num_samples", type=int, default=1, help="number of timed samples")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="new tokens per sample")
    ap.add_argument("--top_k", type=int, default=200, help="top-k sampling")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="sampling temperature; 0 = greedy")
    ap.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                    help="model.pth made by scripts/prepare.py or scripts/convert_*.py")
    ap.add_argument("--sparsity", type=float, default=0.0,
                    help="TEAL target sparsity in [0, 1) for every projection input")
    ap.add_argument("--thresholds", type=Path, default=None,
                    help="calibration file (default: thresholds.safetensors next to the checkpoint; "
                         "a quantized one's thresholds.<format>.safetensors when present)")
    ap.add_argument("--allocation", choices=["auto", "uniform", "greedy", "tuned"],
                    default="auto",
                    help="uniform sparsity, TEAL's block-wise greedy per-projection allocation "
                         "(greedy.json), per-block budgets tuned end to end (tuned.json), or "
                         "auto: tuned where tuned.json covers the target, else greedy from "
                         "40%% when greedy.json exists, else uniform (the run says which)")
    ap.add_argument("--scoring", choices=["magnitude", "weight"], default="magnitude",
                    help="keep by |x| (TEAL) or by |x|*||W[:,i]|| (weight-informed, WINA)")
    ap.add_argument("--calibration", choices=["dense", "sequential"], default="dense",
                    help="thresholds from the dense model's histograms (TEAL), or re-derived on "
                         "the sparsified model's own activations (measured sparsity = target)")
    ap.add_argument("--calib_text", type=Path, default=None,
                    help="calibration text for --calibration sequential "
                         "(default: ../shared/data/wikitext-2-valid-tokenized.txt)")
    ap.add_argument("--calib_tokens", type=int, default=8192,
                    help="calibration tokens for --calibration sequential")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (CUDA graphs on GPU)")
    ap.add_argument("--device", default=default_device(),
                    help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                    help="weight dtype (a quantized checkpoint: the activation dtype; its "
                         "codes stay int8/int4)")
    ap.add_argument("--kernels", choices=["on", "off"], default="on",
                    help="decode through the Triton sparse GEMV and attention kernels where they "
                         "apply (on), or the exact torch path everywhere (off)")
    ap.add_argument("--seed", type=int, default=1234, help="random seed")
    return ap


def resolve_allocation(args, sparsity: float) -> tuple[str, str]:
    """(allocation, reason) that `--allocation` means for `sparsity` on this checkpoint:
    itself with reason "" unless it is auto, which `teal.allocation.choose_allocation`
    resolves over the greedy.json / tuned.json beside the thresholds."""
    if args.allocation_requested != "auto":
        return args.allocation_requested, ""
    from teal.allocation import choose_allocation
    from teal.greedy import AllocationError, GreedyAllocation
    path = Path(args.thresholds) if args.thresholds else default_thresholds(args.checkpoint_path)
    tables = {}
    for kind in ("greedy", "tuned"):
        table = greedy_beside(path, kind=kind)
        if table.exists():
            try:
                tables[kind] = GreedyAllocation.load(table, kind=kind)
            except AllocationError as e:
                fail(str(e))
    return choose_allocation(sparsity, args.scoring, tables.get("greedy"), tables.get("tuned"))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    args.allocation_requested = args.allocation
    args.allocation, auto_reason = resolve_allocation(args, args.sparsity)
    prompt_list = resolve_prompts(args)
    speculative = (args.draft_checkpoint_path is not None or args.self_draft is not None
                   or args.draft_quant is not None)
    batched = len(prompt_list) > 1
    if batched and (args.interactive or speculative):
        fail(f"{len(prompt_list)} prompts (--batch_size / repeated --prompt) cannot be combined "
             f"with {'--interactive' if args.interactive else 'speculative decoding'}; "
             f"pass one prompt")
    if speculative and args.interactive:
        fail("--interactive cannot be combined with speculative decoding (--self_draft / "
             "--draft_checkpoint_path / --draft_quant); pass --prompt")
    args.prompt = prompt_list[0]

    from tp import aggregate_counts, apply_tp, is_rank0, maybe_init_dist  # noqa: F401
    rank = maybe_init_dist(device=args.device)
    device = args.device
    if rank is not None and torch.device(device).type == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    out = print if rank in (None, 0) else (lambda *a, **k: None)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    tokenizer = _load_tokenizer(args.checkpoint_path)
    dtype = DTYPES[args.dtype]
    if dtype == torch.float16:  # refused (bfloat16) where calibration saw activations beyond it
        from teal.checkpoint import load_checkpoint
        from teal.fp16 import choose_dtype
        try:
            dtype, note = choose_dtype(dtype, args.thresholds or default_thresholds(
                args.checkpoint_path), load_checkpoint(args.checkpoint_path)["config"])
        except (CheckpointError, ThresholdsError) as e:
            fail(str(e))
        if note:
            out(note, file=sys.stderr)
        args.dtype = "bfloat16" if dtype == torch.bfloat16 else args.dtype
    model, meta = load_sparse_model(args.checkpoint_path, device, dtype,
                                    args.sparsity, args.thresholds, args.allocation, args.scoring,
                                    args.calibration, args.calib_text, args.calib_tokens,
                                    progress=rank in (None, 0))
    if rank is not None:
        if batched or speculative:
            fail("batched and speculative decoding do not run under torchrun yet; run one "
                 "process")
        try:
            apply_tp(model)
        except ValueError as e:
            fail(str(e))
    if args.kernels == "off":
        teal.set_kernel_policy(model, teal.KernelPolicy(gemv=False, attention=False))
    model.eval()
    q = meta.get("quantization")
    weights = (f"{q['mode']}{'-g' + str(q['group_size']) if q.get('group_size') else ''} weights"
               f"{' + head' if q.get('head') else ''}, {args.dtype} activations") if q else args.dtype
    out(f"Loaded {args.checkpoint_path} ({weights}, {device}) in "
        f"{time.perf_counter() - t0:.2f} s; sparsity {args.sparsity:.0%} "
        f"({args.allocation}{' [auto: ' + auto_reason + ']' if auto_reason else ''}, "
        f"{args.scoring}, {args.calibration} calibration)", file=sys.stderr)

    chat = args.chat
    if chat is None:
        chat = tokenizer.chat_template is not None
        if chat:
            out(f"Chat format: {tokenizer.chat_template} (the checkpoint's); --no-chat for a "
                f"plain prompt", file=sys.stderr)
    stop_ids = set(tokenizer.eos_ids) - {None}

    decode_fn = decode_one_token
    if args.compile:
        if torch.device(device).type != "cuda":
            out("note: --compile on CPU uses the inductor C++ backend (no CUDA graphs)",
                file=sys.stderr)
            decode_fn = torch.compile(decode_one_token, fullgraph=True)
        else:
            decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)

    if batched:
        return run_batch(args, model, tokenizer, prompt_list, chat, stop_ids, decode_fn, device)
    if speculative:
        return run_speculative(args, model, meta, tokenizer, chat, stop_ids, device, dtype)
    from teal.fp16 import OverflowGuard
    guard = OverflowGuard(model) if dtype == torch.float16 else None
    if guard is not None:
        guard.__enter__()
    prompts = _interactive_prompts(out) if args.interactive else [args.prompt] * args.num_samples
    stats, warmed = [], False
    for i, prompt_text in enumerate(prompts):
        if not prompt_text:
            fail("the prompt is empty; pass --prompt TEXT")
        try:
            text = tokenizer.apply_chat_template(prompt_text) if chat else prompt_text
        except ValueError as e:  # a model without a chat template
            fail(str(e))
        ids = tokenizer.encode(text, special=True)  # a prompt: special tokens map to their ids
        if not ids:
            if args.interactive:
                continue
            fail("the prompt is empty; pass --prompt TEXT")
        if len(ids) + args.max_new_tokens > model.config.block_size:
            fail(f"prompt ({len(ids)} tokens) + --max_new_tokens ({args.max_new_tokens}) exceeds "
                 f"the context length {model.config.block_size}; shorten one of them")
        prompt = torch.tensor(ids, dtype=torch.int, device=device)
        if not warmed:  # compile, CUDA-graph capture, first-call costs: outside the timed runs
            warmed = True
            t_w = time.perf_counter()
            n_warm = min(args.max_new_tokens, WARMUP_TOKENS)
            with torch.device(device):  # the caches of the timed run: nothing re-allocated
                model.setup_caches(max_batch_size=1, max_seq_length=len(ids) + args.max_new_tokens)
            generate(model, prompt, n_warm, decode_fn, args.temperature, args.top_k)
            out(f"Warm-up ({n_warm} tokens{', compiling' if args.compile else ''}, untimed) in "
                f"{time.perf_counter() - t_w:.1f} s", file=sys.stderr)
            torch.manual_seed(args.seed)  # the samples do not depend on the warm-up
        # printed: the decoded id sequence (without the BOS encode added, and without the end
        # token that stopped it); a chat prints the reply only
        shown = ids[1:] if tokenizer.add_bos and ids[0] == tokenizer.bos_id else ids
        stream = TextStream(tokenizer, shown)
        if not chat:
            out(tokenizer.decode(shown), end="", flush=True)

        def on_token(tok, stream=stream):
            if tok not in stop_ids:
                out(stream.push(tok), end="", flush=True)

        seq, tm = generate(model, prompt, args.max_new_tokens, decode_fn, args.temperature,
                           args.top_k, stop_ids, on_token=on_token)
        out(stream.flush(), flush=True)
        tok_s = tm["decode_tokens"] / tm["decode_s"] if tm["decode_tokens"] else float("nan")
        stats.append((tok_s, tm, seq, len(ids)))
        out(f"\n[sample {i + 1}] {tm['decode_tokens'] + 1} tokens"
            f"{' (stopped at an end token)' if tm['stopped'] else ''}, prefill "
            f"{tm['prefill_s']:.3f} s, decode {tok_s:.2f} tokens/s", file=sys.stderr)

    if guard is not None:
        guard.__exit__(None, None, None)
        if guard.check():
            out(guard.check(), file=sys.stderr)
    if not stats:
        return
    _, _, seq, plen = stats[-1]
    eff = {}
    if any(p.sparse for _, _, p in model.projections()):
        eff = measure_effective_sparsity(model, seq, plen,
                                         aggregate_counts if rank is not None else None)
    gbytes = bytes_per_decode_step(model, eff) / 1e9
    sparse = [m for m in teal.sparse_linears(model) if m.sparse]
    full = [m for m in sparse if not skips_weight_rows(m)]
    if full and len(full) == len(sparse):
        full_rows = " (the torch decode path reads every weight row at any sparsity)"
    elif full:  # e.g. the dispatch table's masked cuBLAS GEMM for a small shape
        names = sorted({p.name.split(".")[-1].replace("_proj", "") for m in full for p in m.projections()})
        full_rows = f" ({'/'.join(names)} read every weight row: masked cuBLAS measured faster there)"
    else:
        full_rows = ""
    if torch.device(device).type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB (GPU)"
    else:
        import resource
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB (process RSS)"
    timed = [s[0] for s in stats if s[0] == s[0]]  # samples with at least one decode step
    out("\n" + "-" * 60)
    if timed:
        med = statistics.median(timed)
        out(f"Decode: {med:.2f} tokens/s (median of {len(timed)}), "
            f"{gbytes * med:.2f} GB/s achieved on {gbytes:.3f} GB read per token"
            + (" (per rank)" if rank is not None else "")
            + full_rows)
    else:
        out(NO_DECODE_STEP)
    out(f"Peak memory: {mem}")
    if eff:
        parts = ", ".join(f"{p.replace('_proj', '')} {eff[p]:.1%}" for p in PROJECTIONS if p in eff)
        out(f"Effective sparsity (generated tokens): {parts}")
        sizes = {}
        for _, proj, p in model.projections():
            sizes[proj] = sizes.get(proj, 0) + p.in_features * p.out_features
        total = sum(sizes.values())
        pw = sum(eff.get(p, 0.0) * n for p, n in sizes.items()) / total
        out(f"Parameter-weighted model-level sparsity: {pw:.1%} (target {args.sparsity:.0%})")
    if rank is not None:
        from tp import destroy
        destroy()


if __name__ == "__main__":
    main()
