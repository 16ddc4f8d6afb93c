"""Decoding and preparing the images of preference data.

Every image that enters training goes through ``read_image``: any PIL-readable format and mode
becomes 8-bit RGB, a JPEG over ``DRAFT_PIXELS`` is decoded at a reduced scale (``Image.draft``:
1/2, 1/4 or 1/8 in the DCT, so a 50-megapixel photo never occupies 150 MB), and an image whose header
claims more than ``MAX_PIXELS`` decoded pixels is refused before any pixel is decoded (a
decompression bomb, or a scan no training resolution needs).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_IMAGE_SIDE = 16  # training data: an image with a shorter side below this is a bad sample (nothing to learn from)
MAX_PIXELS = 64_000_000  # decoded pixels one image may occupy (~256 MB as RGBA); larger ones are refused, not loaded
DRAFT_PIXELS = 16_000_000  # JPEGs above this are decoded at a reduced scale; smaller ones exactly as stored
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class BadSampleError(ValueError):
    """A sample that cannot be used (corrupt image, empty caption); names the sample."""


@dataclass
class DecodedImage:
    """An RGB image, the (width, height) of the stored image before any reduced-scale decode, the
    stored mode (what was converted from) and whether it was decoded at a reduced scale."""

    image: Image.Image
    original_size: tuple[int, int]
    mode: str = "RGB"
    reduced: bool = False


def _open(value, base_dir: Path | None, where: str) -> Image.Image:
    """The image ``value`` names, opened lazily (only the header is read)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return _open(value["path"], base_dir, where)
        raise BadSampleError(f"{where}: image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise BadSampleError(f"{where}: the image is empty (0 bytes)")
        return Image.open(io.BytesIO(bytes(value)))
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            if " " in value.strip() and not value.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")):
                raise BadSampleError(f"{where}: holds text ({value[:40]!r}), not an image or an image file: check "
                                     "data.image_0_column / image_1_column")
            raise BadSampleError(f"{where}: image file {str(path)!r} does not exist")
        return Image.open(path)
    if value is None:
        raise BadSampleError(f"{where}: no image (null)")
    raise BadSampleError(f"{where}: cannot decode a {type(value).__name__} as an image")


def read_image(value, base_dir: Path | None = None, where: str = "image", min_side: int | None = None,
               max_pixels: int = MAX_PIXELS, min_size: int | None = None) -> DecodedImage:
    """An RGB image from encoded bytes, a ``datasets`` Image dict, a PIL image or a file path.

    ``min_side``: the shorter side the caller will resize to; a JPEG over ``DRAFT_PIXELS`` is
    decoded at the smallest DCT scale that keeps its shorter side at least twice this long (room
    for the antialiased resize; smaller images decode exactly as stored). Grayscale, palette, RGBA (composited
    on white), CMYK and 16-bit images are converted to RGB. Raises ``BadSampleError`` naming
    ``where`` for anything unreadable, truncated or larger than ``max_pixels``, or (``min_size``:
    training data, ``MIN_IMAGE_SIDE``) with a shorter side below ``min_size`` pixels.
    """
    try:
        with warnings.catch_warnings():  # PIL warns from 89 MP on; the limit below decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open(value, base_dir, where)
        width, height = image.size  # from the header: nothing is decoded before the limit below
        mode = image.mode
        if min_side and image.format == "JPEG" and width * height > DRAFT_PIXELS and min(width, height) >= 4 * min_side:
            scale = 2 * min_side / min(width, height)
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        if image.width * image.height > max_pixels:
            raise BadSampleError(
                f"{where}: {width}x{height} pixels exceeds the {max_pixels}-pixel limit (a decompression bomb or an "
                "unusually large scan): downscale it or drop the sample")
        if min_size and min(width, height) < min_size:
            raise BadSampleError(f"{where}: the image is {width}x{height} pixels, below the {min_size}-pixel minimum "
                                 "side of training images: drop the sample or replace the image")
        reduced = image.size != (width, height)
        image.load()
        # after load: a PNG's getexif() decodes the image to look for EXIF behind the pixel data
        original = (height, width) if image.getexif().get(0x0112) in _ROTATING_ORIENTATIONS else (width, height)
        image = ImageOps.exif_transpose(image)
        return DecodedImage(to_rgb(image), original, mode, reduced)
    except BadSampleError:
        raise
    except Image.DecompressionBombError as error:
        raise BadSampleError(f"{where}: refused as a decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise BadSampleError(f"{where}: corrupt or truncated image (not in any image format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadSampleError(f"{where}: corrupt or truncated image ({error})") from None


def decode_image(value, base_dir: Path | None = None, where: str = "image", min_side: int | None = None) -> Image.Image:
    """The RGB image of ``read_image`` (without its original size)."""
    return read_image(value, base_dir, where, min_side).image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit scaled by its bit depth (not clipped), alpha composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        # I;16 is 16-bit by definition; I / F (32-bit) hold 16-bit data when any value exceeds 8 bits
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / scale * 255).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La"):
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


def caption_text(value, where: str = "caption", allow_empty: bool = False) -> str:
    """A caption as a non-empty str (``allow_empty``: or empty); bytes must be UTF-8. Raises
    ``BadSampleError`` otherwise."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSampleError(f"{where}: not valid UTF-8 (byte 0x{bytes(value)[error.start]:02x} at position "
                                 f"{error.start}): re-encode the captions as UTF-8") from None
    if value is None:
        if allow_empty:
            return ""
        raise BadSampleError(f"{where}: the caption is missing (null); set data.allow_empty_captions=true if "
                             "that is meant (unconditional samples)")
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise BadSampleError(f"{where}: the caption is not text but {type(value).__name__} {shown}: captions must be "
                             "strings; fix the column or set data.caption_column to the text column")
    text = value
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. JSON "\udcff" from bytes decoded with surrogateescape
        raise BadSampleError(f"{where}: the caption holds characters that are not valid UTF-8 (lone surrogates)") from None
    if not text.strip() and not allow_empty:
        raise BadSampleError(f"{where}: the caption is empty; set data.allow_empty_captions=true if that is meant "
                             "(unconditional samples)")
    return text
