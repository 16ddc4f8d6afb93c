"""Checks that stop a training run before it starts, each with a one-line message: an output
folder that cannot be written, a disk too small for the checkpoints the run will keep, and a
``resume_from`` checkpoint saved by a run with another configuration."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import yaml

from diffpo.config import PATH_KEYS, ConfigError, to_dict
from diffpo.trainers.checkpoints import STATE_FILE, resolve_resume

# Keys a resumed run must share with the run that saved the checkpoint: they fix the shapes of the
# saved state (model, adapter, optimizer) or what the data order and random draws mean. Every other
# key (max_steps, logging, lr and schedule, beta, precision, output_dir, cache, ...) may change.
RESUME_MUST_MATCH = (
    "method", "finetune", "seed", "train_batch_size", "gradient_accumulation_steps", "model", "lora", "ema.enabled",
    "optim.optimizer", "objective.name", "data.source", "data.format", "data.split", "data.image_0_column",
    "data.image_1_column", "data.label_column", "data.caption_column", "data.keep_ties", "data.max_pairs",
    "data.resolution", "data.crop", "data.flip", "data.score_columns", "data.feedback_column",
    "data.curriculum_stages", "online.prompts", "online.max_prompts", "online.prompts_per_round",
    "online.samples_per_prompt", "online.preference", "online.replay_size",
)
_NOT_WORTH_A_NOTE = ("output_dir", "resume_from", "progress_bar")


def output_dir_error(run_dir: Path, error: OSError, key: str = "output_dir") -> ConfigError:
    """Why ``run_dir`` (the folder ``key`` names) cannot hold what a command writes, and what to do."""
    if error.errno == errno.ENOSPC:
        return ConfigError(f"{key}={str(run_dir)!r}: no space left on device: free space there or choose another {key}")
    blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return ConfigError(f"{key}={str(run_dir)!r}: {str(blocker)!r} is a file, not a folder: choose another {key}")
    return ConfigError(f"{key}={str(run_dir)!r} is not writable ({error.strerror}): choose another folder")


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _comparable(key: str, value):
    """Local paths compare by the file they name, so ``runs/x`` equals ``/abs/runs/x``."""
    if key in PATH_KEYS and isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


def _must_match(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUME_MUST_MATCH)


def _free_on_resume(checkpoint: Path) -> tuple[str, ...]:
    """Keys of ``RESUME_MUST_MATCH`` this checkpoint does not tie: an offline-pairs checkpoint that
    records its place in the epoch (``epoch_pairs``) resumes with another ``train_batch_size`` (or
    process count), since each pair draws from its own random stream; the loop checks that the new
    batches divide the pairs consumed (``trainers.common.resumed_micro_step``)."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return ()
    return ("train_batch_size",) if isinstance(state, dict) and "epoch_pairs" in state else ()


def saved_config_path(checkpoint: Path) -> Path | None:
    """The config of the run that wrote ``checkpoint``: one inside it, else its run dir's ``config.yaml``."""
    for path in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if path.is_file():
            return path
    return None


def check_resume_config(config, run_dir: Path) -> list[str]:
    """Compare the config of the checkpoint ``config.resume_from`` names with ``config``; raise
    ``ConfigError`` naming the keys in ``RESUME_MUST_MATCH`` that differ. Returns the other changed
    keys as ``"key: old -> new"`` (for a note). Run it before ``config.yaml`` is overwritten."""
    checkpoint = resolve_resume(run_dir, config.resume_from)
    if checkpoint is not None:
        check_resume_step(config, checkpoint)
    saved_path = saved_config_path(checkpoint) if checkpoint is not None else None
    if saved_path is None:
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, yaml.YAMLError):
        return []  # nothing readable to compare with
    if not isinstance(saved, dict):
        return []
    old, new = _flatten(saved), _flatten(to_dict(config))
    changed = [k for k in new if k in old and _comparable(k, old[k]) != _comparable(k, new[k])]
    free = _free_on_resume(checkpoint)
    differing = [k for k in changed if _must_match(k) and k not in free]
    if differing:
        shown = "; ".join(f"{k}: {old[k]!r} there, {new[k]!r} here" for k in differing)
        raise ConfigError(
            f"resume_from={config.resume_from!r}: checkpoint {str(checkpoint)!r} was saved by a run with a different "
            f"config ({shown}; saved config {str(saved_path)!r}): resume with the saved values, e.g. `diffpo train "
            f"{saved_path} resume_from=latest`, or choose a new output_dir to start afresh")
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed if k not in _NOT_WORTH_A_NOTE]


def check_resume_step(config, checkpoint: Path) -> None:
    """A checkpoint past ``max_steps`` cannot be resumed to ``max_steps``: training cannot go back,
    and exporting its later weights as a shorter run would be wrong."""

    try:
        step = int(json.loads((checkpoint / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # resolve_resume vouched for it; the loader names a bad state
    if step > config.max_steps:
        final = checkpoint.parent.parent / "final"
        raise ConfigError(
            f"resume_from={config.resume_from!r}: checkpoint {str(checkpoint)!r} is at step {step}, past max_steps="
            f"{config.max_steps}: set max_steps >= {step} to go on training"
            + (f" (its weights at step {step} may be in {str(final)!r})" if final.is_dir() else "")
            + ", or resume an earlier checkpoints/step-N folder, or start afresh in a new output_dir")


def checkpoint_count(config) -> int:
    """How many checkpoints of ``config`` exist at once at most (the one being written included)."""
    every = config.checkpoint_every
    saved = (config.max_steps // every if every else 0) + 1  # the periodic ones and the final one
    keep = config.checkpoints_total_limit
    return saved if not keep else min(saved, keep + 1)


def _gb(size: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9)):
        if size >= scale / 10:
            return f"{size / scale:.3g} {unit}"
    return f"{size / 1e6:.3g} MB"


def check_free_space(run_dir: Path, trainable_bytes: int, config) -> None:
    """Refuse to start when ``run_dir``'s disk cannot hold the checkpoints the run keeps and its
    final weights. A checkpoint holds the trained weights and two Adam moments (3x the trainable
    fp32 bytes; 4x with EMA); ``final/`` holds the weights once more."""
    per_checkpoint = trainable_bytes * (4 if config.ema.enabled else 3)
    count = checkpoint_count(config)
    needed = int((per_checkpoint * count + trainable_bytes) * 1.1)  # +10%: RNG and scheduler states, metrics, config
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} has {_gb(free)} free but this run writes about {_gb(needed)} ({count} "
            f"checkpoint(s) of {_gb(per_checkpoint)} and the final weights): free space, set checkpoints_total_limit "
            "lower, or choose an output_dir on a larger disk")
