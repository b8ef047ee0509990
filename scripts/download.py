"""Download a Hugging Face model repo and (optionally) convert it to our checkpoint format.

    python scripts/download.py HuggingFaceTB/SmolLM2-135M-Instruct --convert

downloads config, weights (safetensors, or pytorch_model*.bin when the repo has none) and
tokenizer files into `checkpoints/<repo>/hf` and, with `--convert`, writes
`checkpoints/<repo>/model.pth` (`teal.convert.convert_hf`, as scripts/convert_hf_checkpoint.py
does). Gated repos (Llama) need a token: set HF_TOKEN or run `huggingface-cli login`. The
default model needs no hub at all: see scripts/prepare.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from teal.convert import HF_DTYPE_CHOICES

# Never needed for conversion: other frameworks' weights, Meta's original consolidated files.
_IGNORE = ["original/*", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data",
           "onnx/*", "flax_model*", "tf_model*", "coreml/*", "*.mlmodel", "*.tflite"]


class DownloadError(RuntimeError):
    """The hub is unreachable, the repo is gated/missing, or the download failed."""


def _explain(repo_id: str, e: Exception) -> str:
    from huggingface_hub import errors
    login = "set HF_TOKEN or run `huggingface-cli login`"
    if isinstance(e, errors.GatedRepoError):
        return (f"{repo_id} is gated: accept its license on huggingface.co, then {login}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"repo {repo_id} not found (private repos need a token: {login})"
    if isinstance(e, errors.RevisionNotFoundError):
        return f"revision not found in {repo_id}"
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return f"access to {repo_id} denied (HTTP {status}); {login}"
        return f"download of {repo_id} failed: {str(e).splitlines()[0]}"
    network = any(w in c.__name__ for c in type(e).__mro__
                  for w in ("Connect", "Timeout", "Network", "Transport"))
    if network or isinstance(e, (errors.LocalEntryNotFoundError, OSError)):
        return (f"cannot reach the Hugging Face Hub to download {repo_id} "
                f"({e.__class__.__name__}); check the network (or HF_ENDPOINT), or use "
                f"`python scripts/prepare.py` for the default model, which needs no hub")
    return f"download of {repo_id} failed ({e.__class__.__name__}: {str(e).splitlines()[0]})"


def download(repo_id: str, root: Path = Path("checkpoints"), revision: Optional[str] = None,
             token: Optional[str] = None) -> Path:
    """Snapshot `repo_id` into `root/<repo_id>/hf`; returns that folder.

    Raises:
        DownloadError: unreachable hub, gated or missing repo (message says what to do).
    """
    from huggingface_hub import HfApi, snapshot_download
    dest = Path(root) / repo_id / "hf"
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        ignore = list(_IGNORE)
        if any(f.endswith(".safetensors") for f in files):
            ignore.append("*.bin")
        snapshot_download(repo_id, revision=revision, local_dir=dest, token=token,
                          ignore_patterns=ignore)
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; explain them
        raise DownloadError(_explain(repo_id, e)) from None
    return dest


def main(argv=None) -> None:
    from teal.cli import HelpFormatter
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Download a Hugging Face model repo into checkpoints/<repo>/hf and "
                    "optionally convert it to checkpoints/<repo>/model.pth.")
    p.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct or "
                                   "meta-llama/Meta-Llama-3-8B (gated: needs HF_TOKEN)")
    p.add_argument("--root", type=Path, default=Path("checkpoints"),
                   help="checkpoint root folder (default: checkpoints)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--token", default=None,
                   help="Hugging Face token (default: HF_TOKEN / `huggingface-cli login`)")
    p.add_argument("--convert", action="store_true",
                   help="also convert to model.pth with scripts/convert_hf_checkpoint.py")
    p.add_argument("--dtype", default="auto", choices=HF_DTYPE_CHOICES,
                   help="weight dtype of the converted checkpoint (default: auto = as downloaded)")
    a = p.parse_args(argv)
    if a.repo_id.count("/") != 1:
        raise SystemExit(f"error: repo id must look like owner/name, got {a.repo_id!r}")
    try:
        folder = download(a.repo_id, a.root, a.revision, a.token)
    except DownloadError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"downloaded {a.repo_id} to {folder}")
    if a.convert:
        from teal.convert import HFConversionError, convert_hf, parse_hf_dtype
        try:
            path = convert_hf(folder, folder.parent, a.repo_id.split("/")[-1],
                              parse_hf_dtype(a.dtype))
        except HFConversionError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
