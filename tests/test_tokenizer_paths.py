"""Issue 14, items 1-4 at the tokenizer: BOS, special tokens in raw text, end tokens, and
streamed text, on the three backends (tiny tokenizers built in the test: tiny_tokenizers.py)."""
from __future__ import annotations

import json
import random

import pytest

from tiny_tokenizers import BACKENDS, BOS_TEXT, EOT_TEXT, LLAMA3_SPECIALS

PARAMS = sorted(BACKENDS)


@pytest.fixture(scope="module", params=PARAMS)
def backend(request, tmp_path_factory):
    tok, meta = BACKENDS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, tok


# ----------------------------------------------------------------------------- item 1: BOS
def test_one_bos_on_every_path(backend):
    name, tok = backend
    bos = tok.bos_id
    chat = tok.apply_chat_template("What are the three primary colors?")
    paths = {
        "plain prompt": tok.encode("Hello world", special=True),
        "--chat": tok.encode(chat, special=True),
        "prompt holding the template and its BOS": tok.encode(
            tok.apply_chat_template(BOS_TEXT[name] + chat), special=True),
        "prompt starting with BOS": tok.encode(BOS_TEXT[name] + "Hello world", special=True),
        "encode(bos=True)": tok.encode("Hello world", special=True, bos=True),
        "encode(bos=True) of a BOS-led text": tok.encode(BOS_TEXT[name] + "Hello", special=True,
                                                         bos=True),
        "two BOS written": tok.encode(BOS_TEXT[name] * 2 + "Hello", special=True),
    }
    for what, ids in paths.items():
        assert ids[0] == bos and ids.count(bos) == 1, (what, ids)
    # the template already in the prompt is not wrapped a second time
    assert paths["prompt holding the template and its BOS"] == paths["--chat"]


def test_bos_false_adds_none(backend):
    _, tok = backend
    assert tok.bos_id not in tok.encode("Hello world", special=True, bos=False)


# ----------------------------------------------------------------------------- item 2: specials
def test_special_tokens_in_raw_text_are_ordinary_text(backend):
    name, tok = backend
    text = f"A document quoting {EOT_TEXT[name]} and {BOS_TEXT[name]} as text."
    special_ids = {tok.special_id(EOT_TEXT[name]), tok.bos_id}
    raw = tok.encode(text, special=False, bos=False)
    assert not special_ids & set(raw), raw
    assert tok.decode(raw) == text
    prompt = tok.encode(text, special=True, bos=False)
    assert special_ids <= set(prompt)


def test_encode_needs_an_explicit_choice(backend):
    _, tok = backend
    with pytest.raises(TypeError):
        tok.encode("Hello")  # special=True or False must be said at the call site


def test_load_token_ids_encodes_specials_as_text(tmp_path):
    """The perplexity / calibration reader (teal.calibration.load_token_ids)."""
    from teal.calibration import load_token_ids
    from tiny_tokenizers import hf_llama3
    tok, meta = hf_llama3(tmp_path)
    (tmp_path / "doc.txt").write_text("The marker <|eot_id|> ends a turn; <|begin_of_text|> too.")
    ids = load_token_ids(tmp_path / "doc.txt", tmp_path / "model.pth", meta).tolist()
    specials = {tok.special_id(s) for s in LLAMA3_SPECIALS}
    assert not specials & set(ids)
    assert tok.decode(ids) == (tmp_path / "doc.txt").read_text()


# ----------------------------------------------------------------------------- item 3: end ids
def test_every_family_end_token_stops(backend):
    name, tok = backend
    if name == "sentencepiece":
        assert tok.eos_ids == {tok.special_id("</s>")}
        return
    # the record lists only <|end_of_text|>; end of turn and end of message stop as well
    want = {tok.special_id(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}
    assert None not in want and want <= tok.eos_ids


def test_generation_config_end_ids(tmp_path):
    from teal.tokenizer import load_tokenizer
    from tiny_tokenizers import hf_llama3
    _, meta = hf_llama3(tmp_path, eos_ids=())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert {1, 7} <= load_tokenizer(tmp_path, meta).eos_ids


# ----------------------------------------------------------------------------- item 4: text
CONTINUATIONS = [" world, café 🙂 done", " 👍🏽 naïve  spaces\tand\nlines", "Sure thing."]


@pytest.mark.parametrize("cont", CONTINUATIONS)
def test_stream_equals_full_decode(backend, cont):
    """Pieces pushed one id at a time join to decode(all)[len(decode(prompt)):], and
    decode(prompt) + pieces == decode(all): no lost or doubled space at the boundary, no
    split character."""
    _, tok = backend
    from teal.tokenizer import TextStream
    prompt = "Hello"
    full = tok.encode(prompt + cont, special=False, bos=False)
    head = tok.encode(prompt, special=False, bos=False)
    if full[:len(head)] != head:  # the boundary merged: split where the ids agree
        head = full[:1]
    stream = TextStream(tok, head)
    pieces = [stream.push(i) for i in full[len(head):]] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert tok.decode(head) + "".join(pieces) == tok.decode(full)


def test_stream_random_ids(backend):
    """Random id sequences (incomplete UTF-8 anywhere after the prompt, which is complete
    text): the pieces still add up."""
    _, tok = backend
    from teal.tokenizer import TextStream
    rng = random.Random(0)
    ids = tok.encode("Hello world, café 🙂 👍🏽 done", special=False, bos=False)
    vocab = sorted(set(ids) | set(range(3, 300)))
    for _ in range(20):
        seq = [rng.choice(vocab) for _ in range(rng.randint(1, 30))]
        k = rng.randint(0, len(seq) - 1)
        while k and tok.decode(seq[:k]).endswith("\ufffd"):  # a prompt ends on a whole character
            k -= 1
        stream = TextStream(tok, seq[:k])
        pieces = [stream.push(i) for i in seq[k:]] + [stream.flush()]
        assert tok.decode(seq[:k]) + "".join(pieces) == tok.decode(seq)
