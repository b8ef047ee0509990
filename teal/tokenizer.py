"""One tokenizer interface over the three file formats Llama-family models ship with.

`load_tokenizer(checkpoint_dir, meta)` picks the backend from the files next to the checkpoint
and the checkpoint's `meta["tokenizer"]` record (written by the converters):

- `tokenizer.json`: Hugging Face `tokenizers` (SmolLM2, and most HF folders);
- `tokenizer.model` that sentencepiece can read: Llama-2 / Mistral;
- `tokenizer.model` that sentencepiece cannot read: Meta's Llama-3 tiktoken BPE file.

`meta["tokenizer"]` keys (all optional): `file`, `backend` ("hf" | "sentencepiece" |
"tiktoken"), `bos_id`, `eos_id`, `eos_ids` (list), `add_bos` (bool), `chat_template`
("chatml" | "llama3" | "llama2" | None).

Special tokens written in the text (`<|im_start|>`, `<|eot_id|>`, `</s>`, ...): every call
says what they are. `encode(text, special=True)` (prompts, chat templates) maps them to their
ids on every backend; `encode(text, special=False)` (documents read for perplexity and
calibration) encodes them as the ordinary text they are written as.

BOS: `encode` puts exactly one BOS at position 0 when it adds one (`add_bos`, or `bos=True`):
a BOS the text already starts with (a prompt holding the chat template's begin-of-text token)
is that one, not a second. BOS is never part of a chat template string, so a chat prompt is
`encode(apply_chat_template(p), special=True)`; a prompt already written in the model's chat
format is left as it is by `apply_chat_template`.

End tokens (`eos_ids`): the checkpoint's record, a generation_config.json next to it, and
every end-of-text / end-of-turn token of the model family (`END_TOKENS`) that the vocabulary
holds as a special token, on every backend (Llama-3 instruct: <|end_of_text|>, <|eot_id|>,
<|eom_id|>, whatever the config lists).

`TextStream` turns generated ids into text as they arrive; the pieces add up to decoding the
whole sequence (no lost or doubled spaces at the prompt boundary, no split UTF-8 characters).
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Iterable, Optional

CHAT_FORMATS = ("chatml", "llama3", "llama2")
# End-of-text and end-of-turn tokens of the Llama-family chat formats: Llama-3 (end of text,
# end of turn, end of message), chatml (SmolLM2, Qwen: end of turn, end of text), Llama-2 /
# Mistral. Generation stops at each one the vocabulary holds as a special token.
END_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>",
              "</s>")
# What a prompt already written in a chat format contains (apply_chat_template keeps it).
_CHAT_MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>", "llama2": "[INST]"}

# Meta's Llama-3 tokenizer: the split pattern and the 256 special tokens after the BPE ranks.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>",
                          2: "<|reserved_special_token_0|>", 3: "<|reserved_special_token_1|>",
                          4: "<|finetune_right_pad_id|>", 5: "<|step_id|>",
                          6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>",
                          9: "<|eot_id|>", 10: "<|python_tag|>"}


def chat_template_kind(template: Optional[str]) -> Optional[str]:
    """Recognise a chat template (a Jinja string from tokenizer_config.json or GGUF metadata).

    Returns "chatml", "llama3", "llama2", or None when there is no template or it is unknown.
    """
    if not template:
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "llama2"
    return None


def format_chat(kind: Optional[str], prompt: str) -> str:
    """A one-turn user prompt in chat format `kind`, ending where the assistant starts.

    Raises:
        ValueError: `kind` is None (the model has no known chat format) or unknown.
    """
    if kind == "chatml":
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if kind == "llama3":
        return (f"<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n")
    if kind == "llama2":
        return f"[INST] {prompt.strip()} [/INST]"
    if kind is None:
        raise ValueError("this model has no known chat template (a base model?); "
                         "use a plain prompt instead")
    raise ValueError(f"unknown chat template kind {kind!r}; known: {', '.join(CHAT_FORMATS)}")


def is_chat_formatted(kind: Optional[str], text: str) -> bool:
    """Is `text` already written in chat format `kind` (holds its turn markers)?"""
    marker = _CHAT_MARKERS.get(kind or "")
    return marker is not None and marker in text


class Tokenizer:
    """Common interface: `encode`, `decode`, `bos_id`, `eos_id`, `eos_ids`, `apply_chat_template`.

    Subclasses implement `_encode(text, special) -> list[int]` (no BOS), `decode` and
    `special_id(token) -> id or None`.
    """

    def __init__(self, bos_id: Optional[int], eos_id: Optional[int],
                 eos_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: Optional[str] = None):
        self.bos_id = bos_id
        self.eos_id = eos_id
        family = {self.special_id(t) for t in END_TOKENS} - {None}
        self.eos_ids = ({int(i) for i in eos_ids} | ({eos_id} if eos_id is not None else set())
                        | family)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template

    def encode(self, text: str, *, special: bool, bos: Optional[bool] = None) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the string to encode.
            special: True (prompts, chat templates): special-token strings written in the text
                map to their ids; False (documents for perplexity / calibration): they are
                encoded as ordinary text. Required: every call site says which it is.
            bos: put a BOS at position 0; None uses the model's default (SmolLM2: no,
                Llama-2/3: yes). There is then exactly one: a BOS the text starts with (with
                `special`) is that BOS, not a second one.

        Raises:
            ValueError: a BOS is wanted but the tokenizer has none.
        """
        ids = self._encode(text, bool(special))
        if (self.add_bos if bos is None else bos):
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            start = 0
            while start < len(ids) and ids[start] == self.bos_id:
                start += 1
            ids = [self.bos_id] + ids[start:]
        return ids

    def _encode(self, text: str, special: bool) -> list[int]:
        raise NotImplementedError

    def special_id(self, token: str) -> Optional[int]:
        """Id of `token` if the vocabulary holds it as a special (control) token, else None."""
        return None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids` (special tokens are rendered as their strings)."""
        raise NotImplementedError

    def apply_chat_template(self, prompt: str) -> str:
        """`prompt` as one user turn in the model's chat format, ready for the assistant's reply.

        BOS is not included (`encode` adds it when the model wants it). A prompt already
        written in the model's chat format (it holds the format's turn markers, e.g. a whole
        Llama-3 template with <|begin_of_text|>) is returned unchanged, never wrapped twice.

        Raises:
            ValueError: the model has no known chat format.
        """
        if self.chat_template is not None and is_chat_formatted(self.chat_template, prompt):
            return prompt
        return format_chat(self.chat_template, prompt)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, "
                f"add_bos={self.add_bos}, chat_template={self.chat_template!r})")


class TextStream:
    """The text of generated token ids, piece by piece as they arrive.

    `context` are the ids before the generated ones (the prompt). `push(id)` returns the text
    that id adds (possibly "" while a character is incomplete); `flush()` returns what is
    held back. The pieces joined equal `decode(context + generated)` minus its `decode(context)`
    prefix: each piece is the difference of two decodes of one window that starts a few tokens
    back (so a sentencepiece word's leading space, dropped at the start of a decode, is kept
    between pieces), and a piece that ends in an incomplete UTF-8 sequence (U+FFFD) waits for
    the next id (the method of Hugging Face text-generation-inference and vLLM).
    """

    _BACK = 5  # tokens of context in the first window

    def __init__(self, tokenizer: Tokenizer, context: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in context]
        self._prefix = max(0, len(self.ids) - self._BACK)  # window start
        self._read = len(self.ids)                         # ids before this are printed

    def _pending(self) -> str:
        decode = self.tokenizer.decode
        done = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        return text[len(done):]

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now certain."""
        self.ids.append(int(token_id))
        piece = self._pending()
        if not piece or piece.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        piece = self._pending()
        self._prefix, self._read = self._read, len(self.ids)
        return piece


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (BOS handled here, not by its post-processor)."""

    def __init__(self, path: Path, **kw):
        from tokenizers import Tokenizer as _Tok
        self._tok = _Tok.from_file(str(path))
        self._specials = {t.content: int(i) for i, t in
                          self._tok.get_added_tokens_decoder().items() if t.special}
        super().__init__(**kw)

    def _encode(self, text: str, special: bool) -> list[int]:
        self._tok.encode_special_tokens = not special  # False: special tokens map to ids
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def special_id(self, token: str) -> Optional[int]:
        return self._specials.get(token)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids` (special tokens are rendered as their strings)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama-2, Mistral)."""

    def __init__(self, path: Path, **kw):
        import sentencepiece as spm
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        if kw.get("bos_id") is None and self._sp.bos_id() >= 0:
            kw["bos_id"] = self._sp.bos_id()
        if kw.get("eos_id") is None and self._sp.eos_id() >= 0:
            kw["eos_id"] = self._sp.eos_id()
        sp = self._sp
        # sentencepiece never parses control pieces (<s>, </s>) out of text: done here
        self._specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                          if sp.is_control(i) and sp.id_to_piece(i)}
        self._special_re = re.compile("(" + "|".join(
            re.escape(t) for t in sorted(self._specials, key=len, reverse=True)) + ")") \
            if self._specials else None
        super().__init__(**kw)

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special or self._special_re is None:
            return list(self._sp.encode(text))
        ids = []  # each part encoded on its own, as Meta's Llama-2 chat code encodes its turns
        for part in self._special_re.split(text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def special_id(self, token: str) -> Optional[int]:
        return self._specials.get(token)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids`."""
        return self._sp.decode([int(i) for i in ids])


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama-3 `tokenizer.model` (base64 token + rank per line) through tiktoken."""

    def __init__(self, path: Path, **kw):
        import tiktoken
        ranks = _read_tiktoken_ranks(path)
        n = len(ranks)
        # Reserved names continue after the named ones, as in Meta's tokenizer.py.
        reserved = iter(range(2, 256))
        specials = {}
        for i in range(256):
            name = _LLAMA3_NAMED_SPECIALS.get(i)
            if name is None:
                name = f"<|reserved_special_token_{next(reserved)}|>"
            specials[name] = n + i
        self._enc = tiktoken.Encoding(name=Path(path).name, pat_str=_LLAMA3_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=specials)
        kw["bos_id"] = n if kw.get("bos_id") is None else kw["bos_id"]
        kw["eos_id"] = n + 1 if kw.get("eos_id") is None else kw["eos_id"]
        kw["chat_template"] = kw.get("chat_template") or "llama3"
        self._specials = specials
        super().__init__(**kw)

    def _encode(self, text: str, special: bool) -> list[int]:
        if special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def special_id(self, token: str) -> Optional[int]:
        return self._specials.get(token)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids` (special tokens are rendered as their strings)."""
        return self._enc.decode([int(i) for i in ids])


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _is_sentencepiece(path: Path) -> bool:
    try:
        import sentencepiece as spm
        spm.SentencePieceProcessor(model_file=str(path))
        return True
    except Exception:  # noqa: BLE001 - sentencepiece raises plain RuntimeError/OSError
        return False


def generation_config_eos(folder) -> list[int]:
    """The `eos_token_id` entry (one id or a list) of a Hugging Face generation_config.json in
    `folder` or its `hf/` subfolder (scripts/download.py's layout); [] if there is none."""
    for path in (Path(folder) / "generation_config.json",
                 Path(folder) / "hf" / "generation_config.json"):
        if path.is_file():
            try:
                eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                return []  # an unreadable file adds nothing; the converter's record stands
            eos = eos if isinstance(eos, list) else [eos]
            return [int(i) for i in eos if isinstance(i, int) and not isinstance(i, bool)]
    return []


def load_tokenizer(checkpoint_dir, meta: Optional[dict] = None) -> Tokenizer:
    """The tokenizer stored next to a checkpoint.

    Args:
        checkpoint_dir: folder of `model.pth` (holds tokenizer.json or tokenizer.model).
        meta: the checkpoint's `meta` dict; its "tokenizer" record (see module doc) gives the
            file, BOS/EOS ids, whether BOS is added, and the chat format. End ids of a
            generation_config.json in the folder are added, as are the family's (END_TOKENS).

    Raises:
        FileNotFoundError: no tokenizer file in `checkpoint_dir`.
        ValueError: the file cannot be read by any backend.
    """
    d = Path(checkpoint_dir)
    info = dict((meta or {}).get("tokenizer") or {})
    candidates = [info["file"]] if info.get("file") else []
    candidates += ["tokenizer.json", "tokenizer.model"]
    path = next((d / c for c in candidates if (d / c).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no tokenizer (tokenizer.json or tokenizer.model) in {d}; "
                                f"convert the model again with scripts/convert_*_checkpoint.py")
    kw = dict(bos_id=info.get("bos_id"), eos_id=info.get("eos_id"),
              eos_ids=list(info.get("eos_ids") or ()) + generation_config_eos(d),
              add_bos=info.get("add_bos", False), chat_template=info.get("chat_template"))
    backend = info.get("backend")
    if path.suffix == ".json":
        return HFTokenizer(path, **kw)
    if backend == "tiktoken" or (backend != "sentencepiece" and not _is_sentencepiece(path)):
        if "add_bos" not in info:
            kw["add_bos"] = True
        try:
            return TiktokenTokenizer(path, **kw)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} is neither a sentencepiece model nor a tiktoken BPE file "
                             f"({e.__class__.__name__}: {e})") from None
    if "add_bos" not in info:
        kw["add_bos"] = True
    return SentencePieceTokenizer(path, **kw)
