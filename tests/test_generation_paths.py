"""Issue 14 items 1, 3-5, 12, 14-17: generate.py and the library API on every path.

The CLI tests run generate.main with a scripted model (it emits a given continuation after
any prompt, counting its forward calls) and the tiny tokenizers of tiny_tokenizers.py, so
what is printed, when it is printed and where generation stops can be checked exactly on
the HF, sentencepiece and tiktoken backends.
"""
from __future__ import annotations

import io
import sys

import pytest
import torch

import generate
from tiny_tokenizers import BACKENDS, EOT_TEXT


class ScriptedModel(torch.nn.Module):
    """Greedy-decodes `script` after any prompt (script[k] is the k-th new token); records the
    prompts it prefills and its forward calls."""

    def __init__(self, script, vocab: int, block_size: int = 256):
        super().__init__()
        from types import SimpleNamespace
        self.config = SimpleNamespace(block_size=block_size, vocab_size=vocab)
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.script, self.vocab = list(script), vocab
        self.calls, self.prompts, self._plen = 0, [], 0
        self.max_seq_length = 0

    def setup_caches(self, max_batch_size, max_seq_length, dtype=None):
        if max_seq_length > self.config.block_size:
            raise ValueError("beyond the context")
        self.max_seq_length = max(self.max_seq_length, max_seq_length)

    def forward(self, x, input_pos=None):
        self.calls += 1
        if int(input_pos[0]) == 0:
            self._plen = x.shape[1]
            self.prompts.append(x[0].tolist())
        k = int(input_pos[-1]) + 1 - self._plen
        logits = torch.full((1, x.shape[1], self.vocab), -1e4)
        logits[0, -1, self.script[min(k, len(self.script) - 1)]] = 0.0
        return logits

    def projections(self):
        return iter(())

    def sparse_linears(self):
        return iter(())


class Recorder(io.StringIO):
    """stdout that remembers the model's forward-call count at every write."""

    def __init__(self, model):
        super().__init__()
        self.model, self.writes = model, []

    def write(self, s):
        if s:
            self.writes.append((self.model.calls, s))
        return super().write(s)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    tok, meta = BACKENDS[request.param](tmp_path / request.param)
    return request.param, tok


def run_cli(monkeypatch, tok, model, *argv, stdin=None):
    monkeypatch.setattr(generate, "_load_tokenizer", lambda path: tok)
    monkeypatch.setattr(generate, "load_sparse_model", lambda *a, **k: (model, {}))
    rec = Recorder(model)
    monkeypatch.setattr(sys, "stdout", rec)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    generate.main(["--device", "cpu", "--temperature", "0", *map(str, argv)])
    return rec


def _text_part(out: str) -> str:
    """The generated text of one sample: what comes before the report."""
    return out.split("\n\n" + "-" * 60)[0]


def _continuation_ids(tok, prompt: str, cont: str):
    full = tok.encode(prompt + cont, special=False, bos=False)
    head = tok.encode(prompt, special=False, bos=False)
    assert full[:len(head)] == head
    return full[len(head):]


# ----------------------------------------------------------------------------- items 4 + 17
def test_printed_text_is_the_decoded_sequence_and_streamed(backend, monkeypatch):
    name, tok = backend
    cont = " world, café 🙂 done"
    script = _continuation_ids(tok, "Hello", cont) + [tok.special_id(EOT_TEXT[name])]
    model = ScriptedModel(script, 512)
    rec = run_cli(monkeypatch, tok, model, "--no-chat", "--prompt", "Hello",
                  "--max_new_tokens", len(script) + 2)
    out = rec.getvalue()
    assert _text_part(out).rstrip("\n") == "Hello" + cont  # no lost/doubled space, no stop token
    # streamed: most of the continuation is written before the last forward call
    last = model.calls
    early = "".join(s for calls, s in rec.writes if calls < last)
    assert "Hello world" in early and "café" in early


def test_chat_reply_is_streamed_without_the_stop_token(backend, monkeypatch):
    name, tok = backend
    eot = tok.special_id(EOT_TEXT[name])
    prompt_ids = tok.encode(tok.apply_chat_template("Hi"), special=True)
    reply = tok.encode(tok.decode(prompt_ids) + "Sure thing.", special=False, bos=False)
    reply = reply[len(tok.encode(tok.decode(prompt_ids), special=False, bos=False)):]
    model = ScriptedModel(reply + [eot, 300, 301], 512)
    rec = run_cli(monkeypatch, tok, model, "--chat", "--prompt", "Hi", "--max_new_tokens", 20)
    text = _text_part(rec.getvalue())
    assert EOT_TEXT[name] not in text and text.strip() == "Sure thing."


# ----------------------------------------------------------------------------- items 3 + 14
def test_stops_at_a_first_token_end(backend, monkeypatch, capsys):
    """The prefill's token is an end token: nothing more is decoded or printed."""
    name, tok = backend
    eot = tok.special_id(EOT_TEXT[name])
    oops = tok.encode(" oops", special=False, bos=False)
    model = ScriptedModel([eot] + oops * 10, 512)
    rec = run_cli(monkeypatch, tok, model, "--chat", "--prompt", "Hi", "--max_new_tokens", 8)
    text = _text_part(rec.getvalue())
    assert "oops" not in text and EOT_TEXT[name] not in text
    assert "[sample 1] 1 tokens (stopped at an end token)" in capsys.readouterr().err


def test_stops_at_end_of_turn_the_config_does_not_list(monkeypatch, tmp_path):
    """Llama-3 instruct whose record lists only <|end_of_text|>: <|eot_id|> still stops."""
    from tiny_tokenizers import hf_llama3
    tok, _ = hf_llama3(tmp_path, eos_ids=(1,))
    eot = tok.special_id("<|eot_id|>")
    script = tok.encode("Sure", special=False, bos=False) + [eot] + tok.encode(" oops", special=False, bos=False) * 5
    model = ScriptedModel(script, 512)
    rec = run_cli(monkeypatch, tok, model, "--chat", "--prompt", "Hi", "--max_new_tokens", 12)
    assert _text_part(rec.getvalue()).strip() == "Sure"


def test_library_generate_stops_at_the_prefill_token():
    from tiny_tokenizers import LLAMA3_SPECIALS  # noqa: F401
    model = ScriptedModel([5, 6, 7], 16)
    seq, tm = generate.generate(model, torch.tensor([1, 2, 3], dtype=torch.int), 5,
                                generate.decode_one_token, 0.0, None, stop_ids={5})
    assert seq.tolist() == [1, 2, 3, 5] and tm["decode_tokens"] == 0


# ----------------------------------------------------------------------------- item 1 (CLI)
def test_cli_prompt_has_one_bos(backend, monkeypatch):
    """--chat with a prompt that already holds the whole chat template and its BOS."""
    name, tok = backend
    from tiny_tokenizers import BOS_TEXT
    model = ScriptedModel([tok.special_id(EOT_TEXT[name])], 512)
    templ = BOS_TEXT[name] + tok.apply_chat_template("Hi")
    run_cli(monkeypatch, tok, model, "--chat", "--prompt", templ, "--max_new_tokens", 4)
    run_cli(monkeypatch, tok, model, "--chat", "--prompt", "Hi", "--max_new_tokens", 4)
    for ids in model.prompts:
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert model.prompts[-1] == model.prompts[0]


# ----------------------------------------------------------------------------- item 15
def test_instruct_model_defaults_to_chat(monkeypatch, tmp_path, capsys):
    from tiny_tokenizers import hf_llama3
    tok, _ = hf_llama3(tmp_path)
    header = tok.special_id("<|start_header_id|>")
    model = ScriptedModel([tok.special_id("<|eot_id|>")], 512)
    run_cli(monkeypatch, tok, model, "--prompt", "Hi", "--max_new_tokens", 4)
    assert header in model.prompts[-1]                       # chat format by default
    assert "--no-chat" in capsys.readouterr().err
    run_cli(monkeypatch, tok, model, "--no-chat", "--prompt", "Hi", "--max_new_tokens", 4)
    assert header not in model.prompts[-1]                   # opted out


def test_interactive_piped_input_echoes_the_prompt(monkeypatch, tmp_path):
    from tiny_tokenizers import hf_llama3
    tok, _ = hf_llama3(tmp_path)
    script = tok.encode("Sure", special=False, bos=False) + [tok.special_id("<|eot_id|>")]
    model = ScriptedModel(script, 512)
    stdin = io.TextIOWrapper(io.BytesIO(b"Hello there\nSecond one\n"), encoding="utf-8")
    rec = run_cli(monkeypatch, tok, model, "--interactive", "--max_new_tokens", 6, stdin=stdin)
    out = rec.getvalue()
    assert "Prompt: Hello there\nSure" in out and "Prompt: Second one\nSure" in out


# ----------------------------------------------------------------------------- item 12
def test_non_utf8_prompt_argument(monkeypatch, tmp_path):
    from tiny_tokenizers import hf_llama3
    tok, _ = hf_llama3(tmp_path)
    bad = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Python passes argv bytes
    with pytest.raises(SystemExit, match=r"^error: --prompt is not valid UTF-8 text \(byte 0xe9"):
        run_cli(monkeypatch, tok, ScriptedModel([1], 512), "--prompt", bad)


def test_non_utf8_prompt_file_and_stdin(monkeypatch, tmp_path):
    from tiny_tokenizers import hf_llama3
    tok, _ = hf_llama3(tmp_path / "tok")
    f = tmp_path / "prompt.txt"
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(SystemExit, match=r"^error: --prompt_file .* is not valid UTF-8 text"):
        run_cli(monkeypatch, tok, ScriptedModel([1], 512), "--prompt_file", f)
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe hello\n"), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"^error: stdin is not valid UTF-8 text"):
        run_cli(monkeypatch, tok, ScriptedModel([1], 512), "--interactive", stdin=stdin)
    with pytest.raises(SystemExit, match=r"^error: stdin \(--prompt_file -\) is not valid UTF-8"):
        run_cli(monkeypatch, tok, ScriptedModel([1], 512), "--prompt_file", "-",
                stdin=io.TextIOWrapper(io.BytesIO(b"\xc3("), encoding="utf-8"))


def test_prompt_file(monkeypatch, tmp_path):
    from tiny_tokenizers import hf_llama3
    tok, _ = hf_llama3(tmp_path / "tok")
    f = tmp_path / "prompt.txt"
    f.write_text("Hello\n", encoding="utf-8")
    model = ScriptedModel([tok.special_id("<|eot_id|>")], 512)
    run_cli(monkeypatch, tok, model, "--no-chat", "--prompt_file", f, "--max_new_tokens", 3)
    assert model.prompts[-1] == tok.encode("Hello", special=True)


# ----------------------------------------------------------------------------- item 16
def test_warm_up_before_timed_samples_and_true_median(monkeypatch, tmp_path, capsys):
    from tiny_tokenizers import hf_llama3
    tok, _ = hf_llama3(tmp_path)
    model = ScriptedModel(tok.encode(" world and more text", special=False, bos=False), 512)
    real, calls = generate.generate, []
    rates = iter([10.0, 30.0])

    def timed(*a, **k):
        seq, tm = real(*a, **k)
        calls.append("on_token" in k)
        if "on_token" in k:  # a timed sample: pretend it ran at the next rate
            tm["decode_s"] = tm["decode_tokens"] / next(rates)
        return seq, tm
    monkeypatch.setattr(generate, "generate", timed)
    rec = run_cli(monkeypatch, tok, model, "--no-chat", "--prompt", "Hello",
                  "--max_new_tokens", 5, "--num_samples", 2)
    assert calls == [False, True, True]  # one untimed warm-up, then the timed samples
    assert "Decode: 20.00 tokens/s (median of 2)" in rec.getvalue()
    assert "Warm-up" in capsys.readouterr().err


def test_bytes_read_on_the_torch_path_are_all_weights():
    """The exact torch path (KernelPolicy(cpu=None)) multiplies by the whole weight: no bytes
    saved; the CPU kernel (the default policy) reads only kept rows."""
    import teal
    from tiny_models import noise_calibration, tiny_model
    from teal.allocation import apply_config
    model = tiny_model()
    apply_config(model, noise_calibration(model.config), 0.5)
    eff = {p: 0.5 for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj")}
    assert generate.bytes_per_decode_step(model, eff) < generate.bytes_per_decode_step(model)
    teal.set_kernel_policy(model, teal.KernelPolicy(cpu=None))
    assert generate.bytes_per_decode_step(model, eff) == generate.bytes_per_decode_step(model)


def test_bytes_read_on_the_kernel_path_scale_with_sparsity():
    import teal
    from tiny_models import noise_calibration, tiny_model
    from teal.allocation import apply_config
    from teal.generation import skips_weight_rows
    model = tiny_model(dim=64, intermediate_size=128).to(torch.bfloat16)
    apply_config(model, noise_calibration(model.config), 0.5)
    teal.set_kernel_policy(model, teal.KernelPolicy(interpreter=True))
    if not all(skips_weight_rows(m) for m in teal.sparse_linears(model)):
        pytest.skip("the Triton interpreter is not available here")
    eff = {p: 0.5 for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj")}
    assert generate.bytes_per_decode_step(model, eff) < generate.bytes_per_decode_step(model)


# ----------------------------------------------------------------------------- item 5
def test_library_generate_refuses_beyond_the_context():
    from tiny_models import tiny_model
    model = tiny_model(block_size=64)
    for t, new in ((60, 10), (70, 1), (64, 1)):
        with pytest.raises(ValueError, match="exceed the context length 64"):
            generate.generate(model, torch.ones(t, dtype=torch.int), new,
                              generate.decode_one_token, 0.0, None)
    with pytest.raises(ValueError, match="empty"):
        generate.generate(model, torch.ones(0, dtype=torch.int), 4, generate.decode_one_token)
    seq, _ = generate.generate(model, torch.ones(60, dtype=torch.int), 4,
                               generate.decode_one_token, 0.0, None)
    assert seq.numel() == 64  # exactly the context: fine


def test_cache_setup_and_forward_refuse_beyond_the_cache():
    from tiny_models import tiny_model
    model = tiny_model(block_size=64)
    with pytest.raises(ValueError, match="context length 64"):
        model.setup_caches(1, 65)
    with pytest.raises(ValueError, match="max_seq_length must be a positive integer"):
        model.setup_caches(1, 0)
    model.setup_caches(1, 16)
    x = torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="outside the KV caches"):
        model(x, torch.tensor([16]))
    with pytest.raises(ValueError, match="do not fit the KV caches"):
        model(torch.ones(1, 20, dtype=torch.long), torch.arange(20))
    with pytest.raises(ValueError, match="do not fit the KV caches"):
        model(torch.ones(2, 1, dtype=torch.long), torch.tensor([3]))
    assert model(x, torch.tensor([15])).shape == (1, 1, model.config.vocab_size)


# ----------------------------------------------------------------------------- item 17
@pytest.fixture
def tiny_files(tmp_path):
    from tiny_models import noise_calibration, tiny_model, write_checkpoint, write_text
    model = tiny_model()
    ckpt = write_checkpoint(tmp_path / "ckpt", model)
    noise_calibration(model.config).save(ckpt.parent / "thresholds.safetensors")
    return ckpt, write_text(tmp_path / "calib.txt", 300), write_text(tmp_path / "test.txt", 200, 3)


def test_generate_shows_loading_and_sequential_calibration_progress(tiny_files, capsys):
    ckpt, calib, _ = tiny_files
    generate.main(["--device", "cpu", "--dtype", "float32", "--checkpoint_path", str(ckpt),
                   "--prompt", "w1 w2 w3", "--max_new_tokens", "3", "--sparsity", "0.5",
                   "--calibration", "sequential", "--calib_text", str(calib),
                   "--calib_tokens", "256"])
    err = capsys.readouterr().err
    assert f"Loading {ckpt}" in err
    assert "Sequential calibration on 256 tokens" in err
    assert "sequential calibration (256 tokens)" in err and "block" in err  # the tqdm bar


def test_perplexity_shows_sequential_calibration_progress(tiny_files, capsys):
    import perplexity
    ckpt, calib, text = tiny_files
    rc = perplexity.main(["--checkpoint_path", str(ckpt), "--text", str(text), "--sparsity",
                          "0.5", "--calibration", "sequential", "--calib_text", str(calib),
                          "--calib_tokens", "128", "--seq_len", "64", "--device", "cpu"])
    assert rc == 0
    assert "sequential calibration (128 tokens)" in capsys.readouterr().err
