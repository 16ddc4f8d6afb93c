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
from diffpo.rewards.programmatic import (Brightness, ColourMatch, JpegCompressibility, JpegIncompressibility, MeaningMatch,
                                         MeaningMatchStrict, MotionMatch)

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
    "meaning-match": MeaningMatch,
    "meaning-match-strict": MeaningMatchStrict,
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
    accepted = _options_of(cls)
    unknown = [key for key in options if accepted is not None and key not in accepted]
    if unknown:
        raise ValueError(f"reward {name!r} has no option {unknown[0]!r}{_option_hint(unknown[0], sorted(accepted))}")
    if issubclass(cls, LearnedHead):
        return cls(path=path, arch=arch, device=device, dtype=dtype, **options)
    if path is not None or arch is not None:
        raise ValueError(f"reward {name!r} has no weights: drop path=/arch=")
    return cls(**options)


def _options_of(cls) -> set[str] | None:
    """The keyword options ``cls(...)`` takes, following ``**common`` up its bases (None: open-ended)."""
    import inspect

    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def _option_hint(option: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(option, accepted, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; its options: {', '.join(accepted) or 'none'}"


__all__ = ["REWARDS", "LearnedHead", "RewardHead", "load"]
