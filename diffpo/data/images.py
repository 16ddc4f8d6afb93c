"""Decoding and preparing the images of preference data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_PIXELS = 64_000_000  # decompression-bomb guard; larger images are refused, not loaded


class BadSampleError(ValueError):
    """A sample that cannot be used (corrupt image, empty caption); names the sample."""


def decode_image(value, base_dir: Path | None = None, where: str = "image") -> Image.Image:
    """An RGB PIL image from encoded bytes, a ``datasets`` Image dict, a PIL image or a file path.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted to RGB.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                return decode_image(value["path"], base_dir, where)
            else:
                raise BadSampleError(f"{where}: image dict has neither 'bytes' nor 'path'")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, str):
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            image = Image.open(path)
        else:
            raise BadSampleError(f"{where}: cannot decode a {type(value).__name__} as an image")
        if image.width * image.height > MAX_PIXELS:
            raise BadSampleError(f"{where}: {image.width}x{image.height} exceeds {MAX_PIXELS} pixels")
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except BadSampleError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadSampleError(f"{where}: corrupt or unreadable image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / scale * 255).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def resize_and_crop(image: Image.Image, resolution: int, crop_top_left: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bicubic, antialiased), crop a square at
    ``crop_top_left`` (None: centre) -> pixels in [-1, 1] (3, R, R) and the crop used."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    if crop_top_left is None:
        crop_top_left = ((new_h - resolution) // 2, (new_w - resolution) // 2)
    top, left = crop_top_left
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


def resized_shape(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(h, w) after resizing a (w, h) image's shorter side to ``resolution``."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(h * scale)), max(resolution, round(w * scale))
