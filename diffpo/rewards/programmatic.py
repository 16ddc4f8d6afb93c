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


def nearest_palette(images: torch.Tensor, palette: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Per pixel of (N, 3, H, W) images the index of its nearest palette colour (Euclidean, RGB in
    [0, 1]), or -1 when none lies within ``max_distance``: (N, H*W)."""
    pixels = images.clamp(0, 1).permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3).cpu()
    distance, nearest = torch.cdist(pixels, palette.expand(images.shape[0], -1, -1)).min(dim=-1)
    return torch.where(distance <= max_distance, nearest, -1)


def _still_spec(caption: str):
    """The shape of a moving-shapes caption ("a red circle moving left on a blue background")."""
    from diffpo.data.moving_shapes import parse_motion_caption

    spec = parse_motion_caption(caption)
    return None if spec is None else spec.still


class ColourMatch(RewardHead):
    """Does the image show the caption's colours? For "a <S> <shape> on a <B> background" (or a
    moving-shapes caption, "a <S> <shape> moving <d> on a <B> background", scored per frame):
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
        nearest = nearest_palette(images, self.palette, self.max_distance)  # -1: no palette colour
        scores = []
        for assigned, prompt in zip(nearest, prompts):
            spec = parse_caption(prompt) or _still_spec(prompt)
            if spec is None:
                scores.append(float("nan"))
                continue
            f_shape = (assigned == self.names.index(spec.colour)).float().mean()
            f_back = (assigned == self.names.index(spec.background)).float().mean()
            presence = torch.clamp(f_shape / self.min_shape_fraction, max=1.0)
            scores.append(float((f_shape + f_back) * presence))
        return torch.tensor(scores)


def shape_template(shape: str, size: int, cx: float, cy: float, area: float) -> np.ndarray:
    """(size, size) bool mask of ``shape`` drawn as ``diffpo.data.shapes`` draws it, with the given
    pixel ``area`` and its centroid at (cx, cy) (a triangle's centroid lies h/3 below its box centre)."""
    from diffpo.data.shapes import ShapeSpec, draw_shape_at

    half = {"circle": (area / np.pi) ** 0.5, "square": (area / 4) ** 0.5, "triangle": (area / 2) ** 0.5}[shape]
    cy = cy - half / 3 if shape == "triangle" else cy
    image = draw_shape_at(ShapeSpec(shape, "white", "black"), size, cx, cy, half)
    return np.asarray(image)[..., 0] > 127


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """The shape whose template (same area and centroid as ``mask``) overlaps ``mask`` most, by IoU."""
    from diffpo.data.shapes import SHAPES

    ys, xs = np.nonzero(mask)
    area, cx, cy = float(len(xs)), float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    ious = {}
    for shape in SHAPES:
        template = shape_template(shape, mask.shape[0], cx, cy, area)
        ious[shape] = float((template & mask).sum() / max((template | mask).sum(), 1))
    return max(ious, key=ious.get), ious


class MeaningMatch(ColourMatch):
    """Does the image show the meaning of "a <S> <shape> on a <B> background": both colours and the
    shape? score = ½ · colour-match + ½ · [the shape-colour pixels form the asked shape], in [0, 1].
    The shape test: the pixels assigned to colour S (as ``colour-match`` assigns them), when they
    cover at least ``min_shape_fraction``, are compared by IoU with a circle, a square and a triangle
    of the same area and centroid; the asked shape must overlap best, with IoU >= ``min_iou`` (so
    scattered pixels or noise form no shape), and cover less of the image than the background
    colour (so a swapped shape / background is no match). Used as the prompt optimizer's
    faithfulness reward, scored against the caption of the recorded meaning (not the user's words).
    Captions outside the shapes world score NaN."""

    name = "meaning-match"
    strict = False  # True: score = colour-match · [shape test passes]

    def __init__(self, min_iou: float = 0.5, **options):
        super().__init__(**options)
        self.min_iou = min_iou

    def score_images(self, images, prompts):
        colour = super().score_images(images, prompts)
        nearest = nearest_palette(images, self.palette, self.max_distance)
        side = images.shape[-1]
        scores = []
        for c, assigned, prompt in zip(colour.tolist(), nearest, prompts):
            spec = parse_caption(prompt)
            if spec is None:
                scores.append(float("nan"))
                continue
            mask = (assigned == self.names.index(spec.colour)).view(images.shape[-2], side).numpy()
            shape_ok = False
            background = float((assigned == self.names.index(spec.background)).float().mean())
            # the shape lies on the background: fewer of its pixels (swapped colours are no match)
            if self.min_shape_fraction <= mask.mean() < background:
                best, ious = classify_shape(mask)
                shape_ok = best == spec.shape and ious[best] >= self.min_iou
            scores.append(c * float(shape_ok) if self.strict else 0.5 * c + 0.5 * float(shape_ok))
        return torch.tensor(scores)


class MeaningMatchStrict(MeaningMatch):
    """``meaning-match`` with the shape as a gate instead of a half: score = colour-match · 1[shape
    test passes], in [0, 1]. Right colours in the wrong shape score 0, so a rewriter cannot gain by
    naming the shape the model renders with the most pixels of the right colours (which the
    additive form pays half for; measured in docs/methods.md)."""

    name = "meaning-match-strict"
    strict = True


class Brightness(RewardHead):
    """Mean pixel value: a deliberately hackable reward for studying over-optimisation."""

    name = "brightness"
    differentiable = True

    def score_images(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class MotionMatch(RewardHead):
    """Does the shape move the way the caption says? For "a <S> <shape> moving <d> on a <B>
    background": in each frame the pixels nearest to colour S (as ``colour-match`` assigns them)
    give the shape's centroid, in frames where they cover at least ``min_shape_fraction``; the
    least-squares slope of the centroids over those frames times (F - 1) is the travel over the
    clip, and the score is its component along direction d in units of the image side (the
    bundled model's training clips travel 0.25-0.35; the wrong way is negative). Fewer than two
    frames showing the shape score 0. Scores whole videos; captions outside the moving-shapes
    world score NaN."""

    name = "motion-match"
    scores_videos = True

    def __init__(self, min_shape_fraction: float = 0.03, max_distance: float = 0.3, **common):
        super().__init__(**common)
        self.min_shape_fraction = min_shape_fraction
        self.max_distance = max_distance
        self.names = list(COLOURS)
        self.palette = torch.tensor([COLOURS[n] for n in self.names], dtype=torch.float32) / 255.0

    def score_images(self, videos, prompts):
        from diffpo.data.moving_shapes import DIRECTIONS, parse_motion_caption

        b, f, _, h, w = videos.shape
        nearest = nearest_palette(videos.flatten(0, 1), self.palette, self.max_distance).view(b, f, h, w)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        scores = []
        for assigned, prompt in zip(nearest, prompts):
            spec = parse_motion_caption(prompt)
            if spec is None:
                scores.append(float("nan"))
                continue
            mask = (assigned == self.names.index(spec.colour)).float()  # (F, H, W)
            area = mask.sum(dim=(1, 2))
            valid = area / (h * w) >= self.min_shape_fraction
            if int(valid.sum()) < 2:
                scores.append(0.0)
                continue
            times = torch.arange(f, dtype=torch.float32)[valid]
            centroids = torch.stack([(mask * xs).sum(dim=(1, 2)), (mask * ys).sum(dim=(1, 2))], dim=1)[valid] / area[valid, None]
            centred = times - times.mean()
            slope = (centred[:, None] * (centroids - centroids.mean(dim=0))).sum(dim=0) / centred.pow(2).sum()
            dx, dy = DIRECTIONS[spec.direction]
            travel = slope * (f - 1)
            scores.append(float((travel[0] * dx / w) + (travel[1] * dy / h)))
        return torch.tensor(scores)
