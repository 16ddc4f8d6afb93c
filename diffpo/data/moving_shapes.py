"""Synthetic clips of moving shapes: the world of the bundled tiny video model.

A clip is one filled shape of one colour on a plain background of another colour, moving in a
straight line at constant speed, captioned "a red circle moving left on a blue background". The
shape is drawn with ``diffpo.data.shapes`` (the image model's drawing), so the video model starts
from pictures its spatial layers already know. Seeded, so the bundled model's training data, the
video quickstart's prompts and the motion reward agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffpo.data.shapes import COLOURS, SHAPES, ShapeSpec, draw_shape_at

# image axes: x grows to the right, y grows downwards
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_CAPTION = re.compile(r"^a (\w+) (\w+) moving (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class MotionSpec:
    shape: str
    colour: str
    background: str
    direction: str

    @property
    def still(self) -> ShapeSpec:
        return ShapeSpec(self.shape, self.colour, self.background)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"


def all_motion_specs() -> list[MotionSpec]:
    """Every (shape, colour, background, direction) with distinct colours, in a fixed order (360)."""
    return [MotionSpec(shape, colour, background, direction)
            for shape in SHAPES for colour in COLOURS for background in COLOURS if colour != background
            for direction in DIRECTIONS]


def parse_motion_caption(caption: str) -> MotionSpec | None:
    """The spec a moving-shapes caption describes, or None if it is not of that form."""
    match = _CAPTION.match(caption.strip().lower())
    if not match:
        return None
    colour, shape, direction, background = match.groups()
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS or direction not in DIRECTIONS:
        return None
    return MotionSpec(shape, colour, background, direction)


def draw_moving_shape(spec: MotionSpec, size: int, frames: int, rng: np.random.Generator,
                      travel_of_room: tuple[float, float] | None = None) -> list[Image.Image]:
    """``frames`` images of ``spec``: extent 30-45% of the side, travelling 25-35% of the side in
    all (evenly per frame, whatever the frame count) from a start that keeps it inside the image.
    With ``travel_of_room=(lo, hi)`` the path is instead lo-hi of the room the image leaves the
    shape along its motion ((0.75, 1.0): 0.37-0.64 of a 32 px side), for training data in which the
    direction is a larger part of the picture; the default draws (and random stream) are unchanged."""
    if frames < 2:
        raise ValueError(f"a moving shape needs at least 2 frames, got {frames}")
    half = rng.uniform(0.30, 0.45) * size / 2
    low, high = half + 1, size - half - 1
    travel = rng.uniform(0.25, 0.35) * size if travel_of_room is None else rng.uniform(*travel_of_room) * (high - low)
    dx, dy = DIRECTIONS[spec.direction]
    start = []
    for d in (dx, dy):  # along the motion the start leaves room for the whole path
        lo, hi = (low, high - travel) if d > 0 else (low + travel, high) if d < 0 else (low, high)
        start.append(rng.uniform(lo, hi))
    steps = np.linspace(0.0, travel, frames)
    return [draw_shape_at(spec.still, size, start[0] + dx * s, start[1] + dy * s, half) for s in steps]


def sample_moving_shapes(count: int, size: int = 32, frames: int = 4, seed: int = 0,
                         travel_of_room: tuple[float, float] | None = None) -> list[tuple[list[Image.Image], str]]:
    """``count`` (frames, caption) clips drawn uniformly over all specs, reproducible from ``seed``
    (``travel_of_room``: see ``draw_moving_shape``)."""
    rng = np.random.default_rng(seed)
    specs = all_motion_specs()
    picks = rng.integers(0, len(specs), size=count)
    return [(draw_moving_shape(specs[i], size, frames, rng, travel_of_room), specs[i].caption) for i in picks]


def motion_captions(count: int | None = None, seed: int = 0) -> list[str]:
    """Captions of the moving-shapes world: all 360 in a fixed order, or ``count`` drawn with ``seed``."""
    captions = [spec.caption for spec in all_motion_specs()]
    if count is None:
        return captions
    rng = np.random.default_rng(seed)
    return [captions[i] for i in rng.permutation(len(captions))[:count]]
