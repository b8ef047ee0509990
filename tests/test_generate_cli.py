"""generate.py end to end on a tiny random model, and its one-line errors for bad input."""
import shutil

import pytest
import torch

import generate
from fixtures_smollm2 import smollm2  # noqa: F401  (session fixture: real tokenizer.json)
from model import ModelArgs, Transformer
from tiny_models import noise_calibration
from teal.checkpoint import save_checkpoint
from teal.thresholds import Calibration

TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96,
            vocab_size=49152, block_size=64, tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny_ckpt(smollm2, tmp_path_factory):
    """A random tiny model with SmolLM2's tokenizer, and thresholds calibrated on noise."""
    d = tmp_path_factory.mktemp("tiny")
    args = ModelArgs(**TINY)
    m = Transformer(args)
    save_checkpoint(d / "model.pth", args.to_dict(), m.state_dict(),
                    {"name": "tiny", "tokenizer": {"file": "tokenizer.json", "eos_id": 2,
                                                   "eos_ids": [2], "chat_template": "chatml"}})
    shutil.copy(smollm2.folder / "tokenizer.json", d / "tokenizer.json")
    noise_calibration(args).save(d / "thresholds.safetensors")
    return d


def _run(*argv):
    generate.main(["--device", "cpu", "--dtype", "float32", *map(str, argv)])


def test_generates_and_reports(tiny_ckpt, capsys):
    _run("--checkpoint_path", tiny_ckpt / "model.pth", "--sparsity", 0.5, "--no-chat",
         "--max_new_tokens", 6, "--temperature", 0, "--prompt", "Hello world")
    out = capsys.readouterr().out
    assert out.startswith("Hello world") and "tokens/s" in out and "GB/s" in out
    assert "Effective sparsity" in out and "gate" in out


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(tiny_ckpt, sparsity):
    with pytest.raises(SystemExit, match=r"--sparsity must be in \[0, 1\)"):
        _run("--checkpoint_path", tiny_ckpt / "model.pth", "--sparsity", sparsity)


def test_missing_default_checkpoint_says_prepare(tmp_path):
    with pytest.raises(SystemExit, match="scripts/prepare.py"):
        _run("--checkpoint_path", tmp_path / "checkpoints/SmolLM2-135M-Instruct/model.pth")


def test_corrupt_checkpoint(tiny_ckpt, tmp_path):
    bad = tmp_path / "model.pth"
    data = (tiny_ckpt / "model.pth").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        _run("--checkpoint_path", bad)


def test_prompt_longer_than_context(tiny_ckpt):
    with pytest.raises(SystemExit, match="exceeds the context length 64"):
        _run("--checkpoint_path", tiny_ckpt / "model.pth", "--prompt", "word " * 60,
             "--max_new_tokens", 10)


def test_thresholds_of_another_model(tiny_ckpt, tmp_path):
    other = dict(TINY, n_layer=3)
    calib = Calibration.empty(other, 3)
    calib.update(0, "attn_in", torch.randn(100))
    calib.save(tmp_path / "t.safetensors")
    with pytest.raises(SystemExit, match="made for another model"):
        _run("--checkpoint_path", tiny_ckpt / "model.pth", "--sparsity", 0.5,
             "--thresholds", tmp_path / "t.safetensors")


def test_missing_thresholds_names_calibrate(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="calibrate.py"):
        _run("--checkpoint_path", tiny_ckpt / "model.pth", "--sparsity", 0.5,
             "--thresholds", tmp_path / "none.safetensors")


@pytest.mark.parametrize("flag,value,msg", [
    ("--max_new_tokens", "0", "--max_new_tokens must be at least 1"),
    ("--max_new_tokens", "-3", "--max_new_tokens must be at least 1"),
    ("--num_samples", "0", "--num_samples must be at least 1"),
    ("--top_k", "0", "--top_k must be at least 1"),
    ("--temperature", "nan", "--temperature must be a finite number"),
    ("--device", "foo", "unknown --device"),
    ("--prompt", "", "the prompt is empty"),
])
def test_bad_arguments_one_line(tiny_ckpt, flag, value, msg):
    with pytest.raises(SystemExit, match=msg):
        generate.main(["--checkpoint_path", str(tiny_ckpt / "model.pth"), flag, value])


def test_missing_tokenizer(tiny_ckpt, tmp_path):
    shutil.copy(tiny_ckpt / "model.pth", tmp_path / "model.pth")
    with pytest.raises(SystemExit, match="tokenizer"):
        _run("--checkpoint_path", tmp_path / "model.pth")


def test_interactive_ends_at_eof(tiny_ckpt, monkeypatch, capsys):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    _run("--checkpoint_path", tiny_ckpt / "model.pth", "--interactive", "--max_new_tokens", 3,
         "--temperature", 0)
    assert "tokens/s" in capsys.readouterr().out


def test_single_new_token_reports_no_decode(tiny_ckpt, capsys):
    _run("--checkpoint_path", tiny_ckpt / "model.pth", "--max_new_tokens", 1, "--sparsity", 0.5)
    assert "no decode step ran" in capsys.readouterr().out


@pytest.mark.parametrize("V", [7, 2048, 5000, 49152, 128256])
def test_two_stage_argmax_equals_torch_argmax(V):
    """teal.generation.argmax_last (chunked max, then argmax of the chunk maxima) is torch.argmax,
    including ties (first index wins) and a vocabulary that is not a multiple of the chunk."""
    from teal.generation import argmax_last

    x = torch.randn(3, V)
    x[1, V // 3] = x[1, V - 1] = x[1].max() + 1.0        # tie: the first index must win
    x[2] = torch.randint(-2, 3, (V,)).float()           # many ties
    assert torch.equal(argmax_last(x), torch.argmax(x, dim=-1, keepdim=True).to(torch.int))
    assert argmax_last(x).dtype == torch.int32


def test_two_stage_argmax_other_inputs_fall_back_to_torch_argmax():
    from teal.generation import argmax_last

    for x in (torch.randint(0, 100, (2, 5000)), torch.randn(5000), torch.randn(2, 3, 5000),
              torch.randn(0, 5000)):
        assert torch.equal(argmax_last(x), torch.argmax(x, dim=-1, keepdim=True).to(torch.int))


def test_kernels_off_and_bad_sequential_text(tiny_ckpt, tmp_path, capsys):
    """--kernels off decodes on the torch path; sequential calibration on a text shorter than
    one window is a one-line error naming the flags."""
    _run("--checkpoint_path", tiny_ckpt / "model.pth", "--sparsity", 0.5, "--kernels", "off",
         "--max_new_tokens", 3, "--temperature", 0, "--prompt", "Hi")
    assert "tokens/s" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text("a b c")
    with pytest.raises(SystemExit, match="needs at least 64 calibration tokens.*--calib_tokens"):
        _run("--checkpoint_path", tiny_ckpt / "model.pth", "--sparsity", 0.5, "--calibration",
             "sequential", "--calib_text", short, "--max_new_tokens", 2)


def test_chat_without_template_is_one_line(tiny_ckpt, tmp_path):
    import teal.checkpoint
    ckpt = teal.checkpoint.load_checkpoint(tiny_ckpt / "model.pth")
    ckpt["meta"]["tokenizer"].pop("chat_template")
    teal.checkpoint.save_checkpoint(tmp_path / "model.pth", ckpt["config"], ckpt["state_dict"], ckpt["meta"])
    shutil.copy(tiny_ckpt / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(SystemExit, match="^error: .*chat template"):
        _run("--checkpoint_path", tmp_path / "model.pth", "--chat", "--max_new_tokens", 2)
