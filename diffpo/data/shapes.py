"""Synthetic captioned shapes: the world of the bundled tiny model.

Each image is one filled shape (circle, square or triangle) of one colour on a plain background of
another colour, captioned "a red circle on a blue background". The generator is seeded so that the
bundled model's training data, the quickstart prompts and the colour reward all agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_specs() -> list[ShapeSpec]:
    """Every (shape, colour, background) combination with distinct colours, in a fixed order."""
    return [
        ShapeSpec(shape, colour, background)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if colour != background
    ]


def parse_caption(caption: str) -> ShapeSpec | None:
    """The spec a shapes caption describes, or None if the caption is not of that form."""
    match = _CAPTION.match(caption.strip().lower())
    if not match:
        return None
    colour, shape, background = match.groups()
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        return None
    return ShapeSpec(shape, colour, background)


def draw_shape(spec: ShapeSpec, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``spec`` at a random position and scale (between 35% and 65% of the side)."""
    extent = rng.uniform(0.35, 0.65) * size
    cx, cy = rng.uniform(extent / 2 + 1, size - extent / 2 - 1, size=2)
    return draw_shape_at(spec, size, cx, cy, extent / 2)


def draw_shape_at(spec: ShapeSpec, size: int, cx: float, cy: float, half: float) -> Image.Image:
    """``spec`` centred at (cx, cy) with half-extent ``half`` pixels, on its background."""
    image = Image.new("RGB", (size, size), COLOURS[spec.background])
    draw = ImageDraw.Draw(image)
    box = [cx - half, cy - half, cx + half, cy + half]
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image


def sample_shapes(count: int, size: int = 32, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """``count`` (image, caption) pairs drawn uniformly over all specs, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    specs = all_specs()
    picks = rng.integers(0, len(specs), size=count)
    return [(draw_shape(specs[i], size, rng), specs[i].caption) for i in picks]


def shape_captions(count: int | None = None, seed: int = 0) -> list[str]:
    """Captions of the shapes world: all of them in a fixed order, or ``count`` drawn with ``seed``."""
    captions = [spec.caption for spec in all_specs()]
    if count is None:
        return captions
    rng = np.random.default_rng(seed)
    return [captions[i] for i in rng.permutation(len(captions))[:count]]
