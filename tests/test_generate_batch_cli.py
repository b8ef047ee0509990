"""generate.py end to end with --batch_size / --prompt_file and speculative decoding on a tiny
random model: the greedy text equals that of separate plain runs, the reports are printed,
and bad combinations are one-line errors (no traceback)."""
import contextlib
import io
import re
import shutil

import pytest
import torch

import generate
from fixtures_smollm2 import smollm2  # noqa: F401  (session fixture: real tokenizer.json)
from model import ModelArgs, Transformer
from teal.checkpoint import save_checkpoint
from tiny_models import noise_calibration, tiny_model, write_checkpoint

TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
            vocab_size=49152, block_size=64, tie_embeddings=True)
META = {"name": "tiny", "tokenizer": {"file": "tokenizer.json", "eos_id": 2, "eos_ids": [2],
                                      "chat_template": "chatml"}}
PROMPTS = ["Hello world", "The moon is", "Three colors:"]
NEW = 12
RULE = "\n\n" + "-" * 60  # printed after the text of every run
SEQUENCE = re.compile(r"\n\[sequence (\d+)\] (\d+) tokens, ([0-9.]+) tokens/s\n(.*?)\n"
                      r"(?=\n\[sequence \d+\]|" + re.escape(RULE[1:]) + ")", re.S)


def _save(folder, args, model, smollm2):
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "model.pth", args.to_dict(), model.state_dict(), META)
    shutil.copy(smollm2.folder / "tokenizer.json", folder / "tokenizer.json")
    return folder / "model.pth"


@pytest.fixture(scope="module")
def ckpt(smollm2, tmp_path_factory):
    """A random tiny model with SmolLM2's tokenizer and noise thresholds. Its matrices are
    scaled x4: at the default init greedy decoding repeats one token, which would let a
    wrong batch or speculative path print the same text by chance."""
    torch.manual_seed(0)
    args = ModelArgs(**TINY)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    path = _save(tmp_path_factory.mktemp("live"), args, m, smollm2)
    torch.manual_seed(1)
    noise_calibration(args).save(path.parent / "thresholds.safetensors")
    return path


def _gen(ckpt, *argv):
    """Run generate.main on `ckpt` (greedy, plain prompts); returns (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        generate.main(["--device", "cpu", "--dtype", "float32", "--checkpoint_path", str(ckpt),
                       "--no-chat", "--temperature", "0", "--max_new_tokens", str(NEW),
                       *map(str, argv)])
    return out.getvalue(), err.getvalue()


_ALONE: dict = {}


def _alone(ckpt, prompt, sparsity):
    """The printed text of a plain batch-1 greedy run (cached over the module)."""
    key = (str(ckpt), prompt, sparsity)
    if key not in _ALONE:
        out, _ = _gen(ckpt, "--prompt", prompt, "--sparsity", sparsity)
        assert RULE in out and "--batch_size" not in out
        _ALONE[key] = out[: out.index(RULE)]
    return _ALONE[key]


def _sequences(out):
    found = SEQUENCE.findall(out)
    assert [int(b) for b, *_ in found] == list(range(1, len(found) + 1))
    return found


# ----------------------------------------------------------------------------- batch
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_batch_of_two_prompts_equals_separate_runs(ckpt, sparsity):
    out, err = _gen(ckpt, "--batch_size", 2, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                    "--sparsity", sparsity)
    seqs = _sequences(out)
    assert len(seqs) == 2
    for prompt, (_, n, rate, text) in zip(PROMPTS, seqs):
        assert text.startswith(prompt) and text == _alone(ckpt, prompt, sparsity)
        assert int(n) == NEW and float(rate) > 0
    assert _alone(ckpt, PROMPTS[0], sparsity) != _alone(ckpt, PROMPTS[1], sparsity)
    assert re.search(r"\nDecode: [0-9.]+ tokens/s aggregate over 2 sequences", out)
    assert re.search(r"\[sample 1\] batch of 2: \d+ decode tokens .* tokens/s aggregate", err)
    assert ("Effective sparsity" in out) == (sparsity > 0)


def test_sparse_text_differs_from_dense(ckpt):
    """The 50% runs above really are sparse (not passing by running dense)."""
    assert _alone(ckpt, PROMPTS[0], 0.5) != _alone(ckpt, PROMPTS[0], 0.0)


def test_prompt_file_one_prompt_per_line(ckpt, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # blank lines are skipped
    out, _ = _gen(ckpt, "--prompt_file", f, "--batch_size", len(PROMPTS))
    seqs = _sequences(out)
    assert [text for *_, text in seqs] == [_alone(ckpt, p, 0.0) for p in PROMPTS]
    assert f"aggregate over {len(PROMPTS)} sequences" in out


# ----------------------------------------------------------------------------- speculative
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_self_draft_is_lossless(ckpt, sparsity):
    out, err = _gen(ckpt, "--self_draft", 0.8, "--speculate_k", 3, "--prompt", PROMPTS[1],
                    "--sparsity", sparsity)
    assert out[: out.index(RULE)] == _alone(ckpt, PROMPTS[1], sparsity)
    m = re.search(r"\nAcceptance rate: ([0-9.]+)% of (\d+) drafted tokens; ([0-9.]+) tokens "
                  r"per verify step; kept per step \(0\.\.3\): \[[0-9, ]+\]", out)
    assert m, out
    assert 0 <= float(m[1]) <= 100 and int(m[2]) > 0 and 1 <= float(m[3]) <= 4
    assert re.search(r"\nDecode: [0-9.]+ tokens/s \(median of 1\), speculative k = 3", out)
    assert "draft = the model itself at 80%" in err and "tokens per verify step" in err


# ----------------------------------------------------------------------------- bad input
def _fails(ckpt, msg, *argv):
    with pytest.raises(SystemExit) as e:
        _gen(ckpt, *argv)
    text = str(e.value)
    assert text.startswith("error: ") and "\n" not in text, text
    assert re.search(msg, text), text


@pytest.mark.parametrize("argv,msg", [
    (["--batch_size", 3, "--prompt", "a", "--prompt", "b"],
     r"2 prompts for --batch_size 3: give one prompt \(repeated\) or exactly 3"),
    (["--batch_size", 0], r"--batch_size must be at least 1, got 0"),
    (["--speculate_k", 0, "--self_draft", 0.5], r"--speculate_k must be at least 1, got 0"),
    (["--self_draft", 1.5], r"--self_draft must be a sparsity in \[0, 1\), got 1.5"),
    (["--self_draft", 0.5, "--batch_size", 2, "--prompt", "a", "--prompt", "b"],
     r"2 prompts .* cannot be combined with speculative decoding; pass one prompt"),
    (["--self_draft", 0.5, "--batch_size", 2],  # one prompt repeated is a batch too
     r"2 prompts .* cannot be combined with speculative decoding"),
    (["--interactive", "--batch_size", 2], r"cannot be combined with --interactive"),
    (["--interactive", "--self_draft", 0.5],
     r"--interactive cannot be combined with speculative decoding.*pass --prompt"),
    (["--self_draft", 0.5, "--speculate_k", 60, "--prompt", "Hi"],
     r"--speculate_k \(60\) \+ 1 exceeds the model's context length 64"),
])
def test_bad_batch_and_speculative_arguments(ckpt, argv, msg):
    _fails(ckpt, msg, *argv)


def test_prompt_file_lines_other_than_batch_size(ckpt, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("one\ntwo\n", encoding="utf-8")
    _fails(ckpt, r"2 prompts for --batch_size 3", "--prompt_file", f, "--batch_size", 3)


@pytest.mark.parametrize("flag", ["--draft_checkpoint_path", "--draft_quant"])
def test_missing_draft_checkpoint(ckpt, tmp_path, flag):
    _fails(ckpt, re.escape(f"{flag} {tmp_path / 'draft.pth'}") + " not found",
           flag, tmp_path / "draft.pth")


def test_draft_quant_of_an_unquantized_checkpoint(ckpt):
    _fails(ckpt, r"--draft_quant .* holds no quantized weights; quantize the model with "
                 r"quantize.py", "--draft_quant", ckpt)


def test_draft_of_another_tokenizer(ckpt, tmp_path):
    other = write_checkpoint(tmp_path / "other", tiny_model(0))  # 97 word-level tokens
    _fails(ckpt, r"the draft .* has 97 tokens, the model 49152; use a draft with the same "
                 r"tokenizer", "--draft_checkpoint_path", other)


def test_draft_with_shorter_context(ckpt, smollm2, tmp_path):
    """A draft of the same tokenizer whose context is too short for prompt + new tokens + k."""
    args = ModelArgs(**dict(TINY, n_layer=1, dim=32, intermediate_size=48, block_size=16))
    draft = _save(tmp_path / "short", args, Transformer(args), smollm2)
    _fails(ckpt, r"exceeds the draft's context length 16",
           "--draft_checkpoint_path", draft, "--speculate_k", 3, "--prompt", "Hi")


@pytest.mark.parametrize("argv", [["--batch_size", 2], ["--self_draft", 0.5]])
def test_one_new_token_reports_no_decode_step(ckpt, argv):
    """--max_new_tokens 1: the prefill makes the only token; no 'nan' rates are printed."""
    out, _ = _gen(ckpt, *argv, "--max_new_tokens", 1, "--prompt", PROMPTS[0])
    assert "Decode: no decode step ran" in out and "nan" not in out, out


def test_quantized_self_draft_is_lossless(ckpt):
    """--draft_quant: the int4 copy of the model (quantize.py) drafts at 50%; the output is
    still the dense model's greedy text."""
    import quantize
    assert quantize.main(["--checkpoint_path", str(ckpt), "--quiet", "--device", "cpu",
                          "--mode", "int4", "--groupsize", "32"]) in (0, None)
    q = ckpt.parent / "model_int4-g32.pth"
    assert q.is_file()
    out, err = _gen(ckpt, "--draft_quant", q, "--self_draft", 0.5, "--speculate_k", 3,
                    "--prompt", PROMPTS[1])
    assert out[: out.index(RULE)] == _alone(ckpt, PROMPTS[1], 0.0)
    assert "Acceptance rate:" in out and str(q) in err
