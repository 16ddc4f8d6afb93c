"""Reward heads behind one interface; ``REWARDS`` maps names to classes.

Learned heads import open_clip / transformers only when constructed, so importing this package
stays cheap.
"""

from __future__ import annotations

import difflib

import torch

from diffpo.rewards.aesthetic import Aesthetic
from diffpo.rewards.base import LearnedHead, RewardHead
from diffpo.rewards.clip import ClipScore
from diffpo.rewards.hps import HPSv2, HPSv21
from diffpo.rewards.hps_v3 import HPSv3
from diffpo.rewards.imagereward import ImageReward
from diffpo.rewards.pickscore import PickScore
from diffpo.rewards.remote import RemoteReward
from diffpo.rewards.video_reward import VideoReward
from diffpo.rewards.programmatic import Brightness, ColourMatch, JpegCompressibility, JpegIncompressibility, MotionMatch

REWARDS: dict[str, type[RewardHead]] = {
    "clip": ClipScore,
    "hps-v2": HPSv2,
    "hps-v2.1": HPSv21,
    "hps-v3": HPSv3,
    "pickscore": PickScore,
    "aesthetic": Aesthetic,
    "imagereward": ImageReward,
    "jpeg-compressibility": JpegCompressibility,
    "jpeg-incompressibility": JpegIncompressibility,
    "colour-match": ColourMatch,
    "brightness": Brightness,
    "motion-match": MotionMatch,
    "remote": RemoteReward,
    "video-reward": VideoReward,
}


def load(name: str, path: str | None = None, arch: str | None = None, device: str = "cpu",
         dtype: torch.dtype | str = torch.float32, **options) -> RewardHead:
    """The reward head ``name``. ``path`` (hub id or local file/folder), ``arch``, ``device`` and
    ``dtype`` apply to learned heads; ``options`` (e.g. ``batch_size``, ``frame_stride``, ``raw``)
    go to the head's constructor."""
    if name not in REWARDS:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; available: {', '.join(sorted(REWARDS))}"
        raise ValueError(f"unknown reward {name!r}{hint}")
    cls = REWARDS[name]
    if issubclass(cls, LearnedHead):
        return cls(path=path, arch=arch, device=device, dtype=dtype, **options)
    if path is not None or arch is not None:
        raise ValueError(f"reward {name!r} has no weights: drop path=/arch=")
    return cls(**options)


__all__ = ["REWARDS", "LearnedHead", "RewardHead", "load"]
