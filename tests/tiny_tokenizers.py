"""Tiny tokenizers of the three backends, built in the test run (no downloads):

- `hf_llama3(folder)`: a Hugging Face byte-level BPE tokenizer.json with Llama-3's special
  tokens (BOS <|begin_of_text|> added by encode, chat format "llama3"), whose checkpoint record
  lists only <|end_of_text|> as EOS (as some Llama-3 instruct configs do);
- `sp_llama2(folder)`: a sentencepiece BPE tokenizer.model with byte fallback (<s>, </s>
  control pieces, chat format "llama2");
- `tiktoken_llama3(folder)`: Meta's Llama-3 tokenizer.model format (base64 token, rank).

Each returns the `teal.tokenizer` object loaded from the folder, as generate.py loads it.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

from teal.tokenizer import load_tokenizer

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]

CORPUS = [
    "Hello world, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Sure thing: the three primary colors are red, yellow and blue.",
    "A café in Ærøskøbing serves naïve crème brûlée to the world.",
    "Numbers 12345 and 3.14159 appear here; emoji 🙂 👍 too.",
    "It's what they're doing, and we'll see what you've done.",
    "   spaces   and\ttabs\nand new lines\n",
    "done and dusted, the end of the story.",
] * 20


def hf_llama3(folder: Path, eos_ids=(1,)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    meta = {"tokenizer": {"file": "tokenizer.json", "backend": "hf", "bos_id": 0, "eos_id": 1,
                          "eos_ids": list(eos_ids), "add_bos": True, "chat_template": "llama3"}}
    return load_tokenizer(folder, meta), meta


def sp_llama2(folder: Path):
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf,
                                   vocab_size=420, model_type="bpe", byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    meta = {"tokenizer": {"file": "tokenizer.model", "backend": "sentencepiece",
                          "chat_template": "llama2"}}
    return load_tokenizer(folder, meta), meta


def tiktoken_llama3(folder: Path):
    merged = [b"he", b"ll", b"hell", b"o ", b" w", b"or", b"ld", b"Hello", b" world"]
    tokens = [bytes([b]) for b in range(256)] + merged
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(t) + b" " + str(i).encode() + b"\n"
                 for i, t in enumerate(tokens)))
    meta = {"tokenizer": {"file": "tokenizer.model", "backend": "tiktoken",
                          "eos_ids": [len(tokens) + 1]}}
    return load_tokenizer(folder, meta), meta


BACKENDS = {"hf": hf_llama3, "sentencepiece": sp_llama2, "tiktoken": tiktoken_llama3}
# the BOS string written in text, per backend
BOS_TEXT = {"hf": "<|begin_of_text|>", "sentencepiece": "<s>", "tiktoken": "<|begin_of_text|>"}
EOT_TEXT = {"hf": "<|eot_id|>", "sentencepiece": "</s>", "tiktoken": "<|eot_id|>"}
