"""The checkpoint folder layout every loop and check shares: ``RUN_DIR/checkpoints/step-N`` with a
``trainer_state.json`` manifest written last, what counts as complete, and which one a resume reads.

Its own module so that ``trainers.common`` (which writes checkpoints), ``trainers.nonfinite`` and
``trainers.preflight`` (which read them) all import it and none imports another.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffpo.config import ConfigError

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"  # a checkpoint being written; renamed to step-N once complete
OLD_PREFIX = ".old-"  # a checkpoint of the same step being replaced
KILL_DURING_SAVE = "DIFFPO_TEST_KILL_DURING_SAVE"  # tests only: SIGKILL this process mid-save at that step


def checkpoint_complete(path: Path) -> bool:
    """True when ``path`` holds a readable trainer state and every file its manifest lists, whole."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = state.get("files", {}) if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return False
    for name, size in files.items():
        try:
            if (path / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones (``.tmp-*`` of a killed save) and
    folders whose files do not match their manifest are never listed."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and checkpoint_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_unfinished_checkpoints(run_dir: Path) -> list[Path]:
    """Delete what killed saves left in ``RUN_DIR/checkpoints`` (``.tmp-*``, ``.old-*``); returns them."""
    root = run_dir / "checkpoints"
    stale = [p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, OLD_PREFIX))] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_resume(run_dir: Path, resume_from: str | None) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None  # nothing saved yet: start from scratch
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from={resume_from!r} is not a diffpo checkpoint folder (no {STATE_FILE}); use 'latest' or a checkpoints/step-N folder")
    if not checkpoint_complete(path):
        raise ConfigError(f"resume_from={resume_from!r} is an incomplete checkpoint (its files do not match {STATE_FILE}): "
                          "use 'latest' or an older checkpoints/step-N folder")
    return path
