"""Tiny random models, checkpoints and texts shared by the calibration/evaluation/greedy tests."""
from __future__ import annotations

from pathlib import Path

import torch

from model import ModelArgs, Transformer
from teal.checkpoint import save_checkpoint

VOCAB = 97


def tiny_args(**kw) -> ModelArgs:
    cfg = dict(block_size=128, vocab_size=VOCAB, n_layer=2, n_head=4, n_local_heads=2, dim=32,
               intermediate_size=48)
    cfg.update(kw)
    return ModelArgs(**cfg)


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_args(**kw)).eval()


def random_tokens(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g)


def write_checkpoint(folder: Path, model: Transformer) -> Path:
    """model.pth + a word-level tokenizer.json (token 'w<i>' -> id i) in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pth"
    save_checkpoint(path, model.config.to_dict(), model.state_dict(),
                    meta=dict(name="tiny", tokenizer=dict(file="tokenizer.json")))
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return path


def write_text(path: Path, n_tokens: int, seed: int = 1) -> Path:
    """A text of `n_tokens` words that the tiny tokenizer maps one word -> one token."""
    ids = random_tokens(n_tokens, seed) % (VOCAB - 1)
    path.write_text(" ".join(f"w{i}" for i in ids.tolist()) + "\n", encoding="utf-8")
    return path


def noise_calibration(args: ModelArgs, n: int = 4096, layers: int | None = None):
    """A Calibration for a model of `args` whose four projection-input histograms per layer
    come from n N(0, 1) samples (thresholds for tests, not for quality)."""
    from teal.thresholds import Calibration
    layers = args.n_layer if layers is None else layers
    calib = Calibration.empty(args.to_dict(), args.n_layer)
    for layer in range(layers):
        for name in ("attn_in", "attn_out", "mlp_in", "mlp_mid"):
            calib.update(layer, name, torch.randn(n))
    return calib
