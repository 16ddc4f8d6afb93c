"""Cheap rewards that need no model weights: for tests, the quickstart and sanity checks."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from diffpo.data.shapes import COLOURS, parse_caption
from diffpo.rewards.base import RewardHead


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """The JPEG size of each (3, H, W) image in [0, 1], in kB (1000 bytes)."""
    sizes = []
    for image in images:
        array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


class JpegCompressibility(RewardHead):
    """Minus the JPEG size in kB at quality 95 (DDPO, Black et al. 2024; used by D3PO)."""

    name = "jpeg-compressibility"

    def __init__(self, quality: int = 95, **common):
        super().__init__(**common)
        self.quality = quality

    def score_images(self, images, prompts):
        return -jpeg_kilobytes(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """Plus the JPEG size in kB at quality 95 (DDPO's incompressibility task)."""

    name = "jpeg-incompressibility"

    def score_images(self, images, prompts):
        return jpeg_kilobytes(images, self.quality)


class ColourMatch(RewardHead):
    """Does the image show the caption's colours? For "a <S> <shape> on a <B> background":
    every pixel is assigned its nearest palette colour if it lies within ``max_distance`` of it
    (Euclidean, RGB in [0, 1]); with f_S, f_B the fractions assigned to S and B, the score is
    (f_S + f_B) · min(1, f_S / min_shape_fraction), in [0, 1]. Noise, wrong colours and a missing
    shape all score low, so it cannot be gamed by flattening the image or by noise.
    Captions outside the shapes world score NaN."""

    name = "colour-match"

    def __init__(self, min_shape_fraction: float = 0.05, max_distance: float = 0.3, **common):
        super().__init__(**common)
        self.min_shape_fraction = min_shape_fraction
        self.max_distance = max_distance
        self.names = list(COLOURS)
        self.palette = torch.tensor([COLOURS[n] for n in self.names], dtype=torch.float32) / 255.0

    def score_images(self, images, prompts):
        pixels = images.clamp(0, 1).permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3).cpu()
        distance, nearest = torch.cdist(pixels, self.palette.expand(images.shape[0], -1, -1)).min(dim=-1)
        nearest = torch.where(distance <= self.max_distance, nearest, -1)  # -1: no palette colour
        scores = []
        for assigned, prompt in zip(nearest, prompts):
            spec = parse_caption(prompt)
            if spec is None:
                scores.append(float("nan"))
                continue
            f_shape = (assigned == self.names.index(spec.colour)).float().mean()
            f_back = (assigned == self.names.index(spec.background)).float().mean()
            presence = torch.clamp(f_shape / self.min_shape_fraction, max=1.0)
            scores.append(float((f_shape + f_back) * presence))
        return torch.tensor(scores)


class Brightness(RewardHead):
    """Mean pixel value: a deliberately hackable reward for studying over-optimisation."""

    name = "brightness"
    differentiable = True

    def score_images(self, images, prompts):
        return images.mean(dim=(1, 2, 3))
