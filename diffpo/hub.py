"""One-line messages for a hub id that cannot be reached: offline (``HF_HUB_OFFLINE=1``) or not found."""

from __future__ import annotations

import os


def is_offline() -> bool:
    """True when the hub may not be contacted (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable(what: str, repo_id: str, error: BaseException, local: str = "a local diffusers folder",
                repo_type: str = "model") -> str:
    """Why ``repo_id`` could not be loaded and the two ways out: download it, or pass ``local`` instead."""
    download = f"hf download {repo_id}" + ("" if repo_type == "model" else f" --repo-type {repo_type}")
    if is_offline():
        return (f"{what} {repo_id!r} was not found locally and HF_HUB_OFFLINE=1 forbids downloading it: run "
                f"`{download}` once with network (or unset HF_HUB_OFFLINE), or pass {local} instead")
    return (f"could not fetch {what} {repo_id!r} from the hub ({error.__class__.__name__}): check the id and your "
            f"network, or download it once (`{download} --local-dir DIR`) and pass {local} instead")
