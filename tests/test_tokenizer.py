"""teal.tokenizer and the tokenizer.json built from the SmolLM2 GGUF.

The reference is an independent byte-level BPE written here from its definition (GGUF vocab +
merge ranks; pre-tokenizer `smollm`: digits split off one by one, then the GPT-2 regex), so a
wrong pre-tokenizer, merge parsing or special-token handling in the converter shows up.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import pytest
import regex

from fixtures_smollm2 import bytes_to_unicode, smollm2, smollm2_hf  # noqa: F401 (fixtures)
from teal.checkpoint import load_checkpoint
from teal.tokenizer import (HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                            chat_template_kind, load_tokenizer)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"

EDGE_CASES = [
    "Hello world",
    "The year 2024 had 365 days; pi is 3.14159, not 22/7.",
    "  leading spaces,   runs of spaces\n\n\ttabs and\r\nCRLF\n",
    "unicode: café naïve Ærøskøbing — “quotes” 日本語 한국어 emoji 🙂👍🏽",
    "it's they're we'll I'd you've I'm DON'T",
    "<|im_start|>user\nWhat is 12*34?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>code: def f(x):\n    return x**2  # ½ ² ٣",
    "fractions ½ ¼ ¾, powers x² y³, Arabic-Indic ٣٤ and full-width １２",
    "",
    " ",
    "a" * 50,
]

_GPT2_SPLIT = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


class ReferenceBPE:
    """Byte-level BPE from a GGUF's tokens/merges/token types, written from its definition."""

    def __init__(self, gguf_path: Path):
        import gguf
        r = gguf.GGUFReader(gguf_path)
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
        types = r.fields["tokenizer.ggml.token_type"].contents()
        merges = r.fields["tokenizer.ggml.merges"].contents()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        self.specials = [t for t, ty in zip(tokens, types) if ty == 3]
        self.byte_char = bytes_to_unicode()
        self.special_re = regex.compile("(" + "|".join(regex.escape(s) for s in
                                                       sorted(self.specials, key=len,
                                                              reverse=True)) + ")")

    def _bpe(self, piece: str) -> list[int]:
        syms = [self.byte_char[b] for b in piece.encode("utf-8")]
        while len(syms) > 1:
            rank, i = min((self.ranks.get(pair, math.inf), i)
                          for i, pair in enumerate(zip(syms, syms[1:])))
            if rank == math.inf:
                break
            syms = syms[:i] + [syms[i] + syms[i + 1]] + syms[i + 2:]
        return [self.vocab[s] for s in syms]

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self.special_re.split(text):
            if part in self.specials:
                ids.append(self.vocab[part])
                continue
            for chunk in regex.findall(r"\p{N}|[^\p{N}]+", part):
                for piece in _GPT2_SPLIT.findall(chunk):
                    ids += self._bpe(piece)
        return ids


@pytest.fixture(scope="module")
def tok(smollm2):
    meta = load_checkpoint(smollm2.checkpoint)["meta"]
    return load_tokenizer(smollm2.folder, meta)


@pytest.fixture(scope="module")
def ref(smollm2):
    return ReferenceBPE(smollm2.gguf)


def _wikitext_chunk(n_chars: int = 6000) -> str:
    if not DATA.is_file():
        pytest.skip(f"{DATA} not available")
    return DATA.read_text(encoding="utf-8")[:n_chars]


def test_smollm2_tokenizer_meta(tok):
    assert isinstance(tok, HFTokenizer)
    assert tok.add_bos is False  # SmolLM2 adds no BOS
    assert tok.eos_id == 2 and 2 in tok.eos_ids
    assert tok.chat_template == "chatml"


def test_special_token_ids(tok):
    assert tok.encode("<|im_start|>", special=True) == [1]
    assert tok.encode("<|im_end|>", special=True) == [2]
    assert tok.encode("<|endoftext|>", special=True) == [0]
    assert (tok.encode("a<|im_end|>b", special=True)
            == tok.encode("a", special=True) + [2] + tok.encode("b", special=True))


def test_known_ids(tok, ref):
    # Digits are split off one by one (pre-tokenizer `smollm`), never merged with a space.
    assert tok.encode("12345", special=True) == [ref.vocab[d] for d in "12345"]
    assert tok.encode(" 7", special=True) == [ref.vocab["Ġ"], ref.vocab["7"]]
    assert tok.encode("Hello world", special=True) == [ref.vocab["Hello"], ref.vocab["Ġworld"]]
    assert tok.encode("\n", special=True) == [ref.vocab["Ċ"]]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_matches_reference_bpe(tok, ref, text):
    assert tok.encode(text, special=True) == ref.encode(text)


def test_matches_reference_bpe_on_wikitext(tok, ref):
    text = _wikitext_chunk()
    ids = tok.encode(text, special=True)
    assert ids == ref.encode(text)
    assert len(ids) > 1000


@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, special=True)) == text


def test_round_trip_wikitext(tok):
    text = _wikitext_chunk()
    assert tok.decode(tok.encode(text, special=True)) == text


def test_bos_flag(tok):
    assert tok.encode("hi", bos=True, special=True) == [tok.bos_id] + tok.encode("hi", special=True)
    assert tok.encode("hi", bos=False, special=True) == tok.encode("hi", special=True)


def test_chat_template(tok):
    s = tok.apply_chat_template("What is 2+2?")
    assert s == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(s, special=True)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1


def test_transformers_agrees(tok, smollm2_hf):
    """transformers on the exported folder: same ids, and its Jinja chat template (from the GGUF)
    ends with our one-turn chatml prompt (its default adds a system turn first)."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(smollm2_hf))
    for text in EDGE_CASES + [_wikitext_chunk(2000)]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, special=True)
    rendered = hf.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                      tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(tok.apply_chat_template("Hi there"))
    assert rendered.startswith("<|im_start|>system\n")


def test_chat_template_kind():
    assert chat_template_kind("{{ '<|im_start|>' + message['role'] }}") == "chatml"
    assert chat_template_kind("<|start_header_id|>{{ role }}<|end_header_id|>") == "llama3"
    assert chat_template_kind("{{ bos_token + '[INST] ' + content + ' [/INST]' }}") == "llama2"
    assert chat_template_kind(None) is None and chat_template_kind("{{ x }}") is None


def test_no_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path, {})


def test_no_chat_template_is_a_clear_error(tmp_path, smollm2):
    (tmp_path / "tokenizer.json").write_bytes((smollm2.folder / "tokenizer.json").read_bytes())
    t = load_tokenizer(tmp_path, {"tokenizer": {"file": "tokenizer.json"}})
    with pytest.raises(ValueError, match="no known chat template"):
        t.apply_chat_template("hi")


def test_sentencepiece_backend(tmp_path):
    """A tokenizer.model readable by sentencepiece (Llama-2 style): BOS added by default."""
    import sentencepiece as spm
    text = _wikitext_chunk(60000).splitlines()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([s for s in text if s.strip()]),
                                   model_writer=buf, vocab_size=300, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    t = load_tokenizer(tmp_path, {"tokenizer": {"chat_template": "llama2"}})
    assert isinstance(t, SentencePieceTokenizer)
    assert t.add_bos and t.bos_id == 1 and t.eos_id == 2
    ids = t.encode("The game was released in Japan", special=True)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert t.decode(ids[1:]) == "The game was released in Japan"
    assert t.apply_chat_template(" hello ") == "[INST] hello [/INST]"


def test_tiktoken_backend(tmp_path):
    """Meta's Llama-3 tokenizer.model format (base64 token, rank): tiktoken, 256 specials."""
    merged = [b"he", b"ll", b"hell", b"o ", b" w", b"or", b"ld"]
    tokens = [bytes([b]) for b in range(256)] + merged
    (tmp_path / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(t) + b" " + str(i).encode() + b"\n"
                 for i, t in enumerate(tokens)))
    t = load_tokenizer(tmp_path, {})
    assert isinstance(t, TiktokenTokenizer)
    n = len(tokens)
    assert t.bos_id == n and t.add_bos
    assert {n + 1, n + 9} <= t.eos_ids  # <|end_of_text|>, <|eot_id|>
    ids = t.encode("hello world", special=True)
    assert ids[0] == n and tokens.index(b"hell") in ids
    assert t.decode(ids[1:]) == "hello world"
    chat = t.encode(t.apply_chat_template("hello"), bos=False, special=True)
    assert chat[:2] == [n + 6, tokens.index(b"u")]  # <|start_header_id|> then "user"
    assert chat.count(n + 9) == 1 and chat.count(n + 7) == 2
