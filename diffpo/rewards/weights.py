"""Finding reward-head checkpoints: a local file or folder, or a file of a hub repo."""

from __future__ import annotations

import os
import re

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def looks_like_hub_id(path: str) -> bool:
    """"org/name" that is not a local path (hub ids have exactly one slash and no weight suffix)."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path) and not path.endswith(_WEIGHT_SUFFIXES)


def resolve_checkpoint(path: str | None, filename: str, repo: str, source: str | None = None) -> str:
    """The local file of checkpoint ``filename``: ``path`` itself if it is a file, ``path/filename``
    if it is a folder, else ``filename`` from hub repo ``path`` (default ``repo``) via the hub cache.
    Raises FileNotFoundError with one line naming the file and where to get it."""
    where = source or f"the hub repo {repo}"
    hint = f"download it from {where} or pass path= (a local file or folder)"
    if path is not None and os.path.isfile(path):
        return str(path)
    if path is not None and os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if os.path.isfile(candidate):
            return candidate
        raise FileNotFoundError(f"{filename} not found at {candidate}: {hint}")
    if path is not None and not looks_like_hub_id(path):
        raise FileNotFoundError(f"{filename} not found at {path}: {hint}")
    hub_repo = path or repo
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(hub_repo, filename)
    except Exception as error:  # offline, missing repo or file: all mean "get the file yourself"
        raise FileNotFoundError(
            f"{filename} not found in the hub cache and not downloadable from {hub_repo} "
            f"({error.__class__.__name__}): {hint}"
        ) from None


def load_state_dict(file: str, key: str | None = None) -> dict:
    """A checkpoint's tensors (``diffpo.serialization.load_torch_file``: safetensors, or
    ``torch.load(weights_only=True)``, which refuses pickled code); ``key`` picks a nested state dict."""
    from diffpo.serialization import load_torch_file

    checkpoint = load_torch_file(file)
    if key is not None:
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            found = list(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ValueError(f"{file}: expected a checkpoint with a {key!r} entry, found {found}")
        checkpoint = checkpoint[key]
    return checkpoint
