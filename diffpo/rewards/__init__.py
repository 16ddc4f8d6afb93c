"""Reward heads behind one interface; ``REWARDS`` maps names to classes."""

from __future__ import annotations

import difflib

import torch

from diffpo.rewards.base import RewardHead
from diffpo.rewards.programmatic import Brightness, ColourMatch, JpegCompressibility, JpegIncompressibility

REWARDS: dict[str, type[RewardHead]] = {
    "jpeg-compressibility": JpegCompressibility,
    "jpeg-incompressibility": JpegIncompressibility,
    "colour-match": ColourMatch,
    "brightness": Brightness,
}


def load(name: str, path: str | None = None, arch: str | None = None, device: str = "cpu",
         dtype: torch.dtype = torch.float32, **options) -> RewardHead:
    """The reward head ``name``; ``path``/``arch``/``device``/``dtype`` apply to learned heads."""
    if name not in REWARDS:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; available: {', '.join(sorted(REWARDS))}"
        raise ValueError(f"unknown reward {name!r}{hint}")
    return REWARDS[name](**options)


__all__ = ["REWARDS", "RewardHead", "load"]
