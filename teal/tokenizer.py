"""One tokenizer interface over the three file formats Llama-family models ship with.

`load_tokenizer(checkpoint_dir, meta)` picks the backend from the files next to the checkpoint
and the checkpoint's `meta["tokenizer"]` record (written by the converters):

- `tokenizer.json`: Hugging Face `tokenizers` (SmolLM2, and most HF folders);
- `tokenizer.model` that sentencepiece can read: Llama-2 / Mistral;
- `tokenizer.model` that sentencepiece cannot read: Meta's Llama-3 tiktoken BPE file.

`meta["tokenizer"]` keys (all optional): `file`, `backend` ("hf" | "sentencepiece" |
"tiktoken"), `bos_id`, `eos_id`, `eos_ids` (list), `add_bos` (bool), `chat_template`
("chatml" | "llama3" | "llama2" | None).

Special tokens written in the text (`<|im_start|>`, `<|eot_id|>`, ...) are encoded as their
ids by the hf and tiktoken backends. BOS is never part of a chat template string: `encode`
adds it when the model wants one (`add_bos`), so a chat prompt is `encode(apply_chat_template(p))`.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterable, Optional

CHAT_FORMATS = ("chatml", "llama3", "llama2")

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


class Tokenizer:
    """Common interface: `encode`, `decode`, `bos_id`, `eos_id`, `eos_ids`, `apply_chat_template`.

    Subclasses implement `_encode(text) -> list[int]` (no BOS) and `decode`.
    """

    def __init__(self, bos_id: Optional[int], eos_id: Optional[int],
                 eos_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: Optional[str] = None):
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = {int(i) for i in eos_ids} | ({eos_id} if eos_id is not None else set())
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        """Token ids of `text`; special tokens written in it map to their ids.

        Args:
            text: the string to encode.
            bos: prepend BOS; None uses the model's default (SmolLM2: no, Llama-2/3: yes).
        """
        ids = self._encode(text)
        if (self.add_bos if bos is None else bos):
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids` (special tokens are rendered as their strings)."""
        raise NotImplementedError

    def apply_chat_template(self, prompt: str) -> str:
        """`prompt` as one user turn in the model's chat format, ready for the assistant's reply.

        BOS is not included (`encode` adds it when the model wants it).

        Raises:
            ValueError: the model has no known chat format.
        """
        return format_chat(self.chat_template, prompt)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, "
                f"add_bos={self.add_bos}, chat_template={self.chat_template!r})")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (BOS handled here, not by its post-processor)."""

    def __init__(self, path: Path, **kw):
        from tokenizers import Tokenizer as _Tok
        self._tok = _Tok.from_file(str(path))
        super().__init__(**kw)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

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
        super().__init__(**kw)

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

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
        kw["eos_ids"] = set(kw.get("eos_ids") or ()) | {n + 1, n + 9}
        kw["chat_template"] = kw.get("chat_template") or "llama3"
        super().__init__(**kw)

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

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


def load_tokenizer(checkpoint_dir, meta: Optional[dict] = None) -> Tokenizer:
    """The tokenizer stored next to a checkpoint.

    Args:
        checkpoint_dir: folder of `model.pth` (holds tokenizer.json or tokenizer.model).
        meta: the checkpoint's `meta` dict; its "tokenizer" record (see module doc) gives the
            file, BOS/EOS ids, whether BOS is added, and the chat format.

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
              eos_ids=info.get("eos_ids") or (), add_bos=info.get("add_bos", False),
              chat_template=info.get("chat_template"))
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
