"""What a report records so its numbers can be reproduced: package versions, device, git commit."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("diffpo", "torch", "diffusers", "transformers", "open_clip_torch", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import torch

    versions["torch"] = torch.__version__  # with the build tag (+cu130, +cpu): it can change the numbers
    return versions


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the checkout holding ``path`` (default: the diffpo package), with ``-dirty``
    when tracked files changed; ``unknown`` outside a git checkout or without git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: str) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)``, ``cpu (x86_64, 2 threads)``, ..."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    if device == "cpu":
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return device


def provenance(device: str) -> dict:
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": package_versions(),
            "device": device_description(device), "git_commit": git_commit(), "command": " ".join(sys.argv)}
