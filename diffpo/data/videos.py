"""Decoding the videos of video preference data: GIF / animated WebP / MP4 files or bytes, folders
of frame images, and lists of encoded frames (a parquet column of image bytes).

A clip is read, every ``stride``-th frame kept from the first, and the first ``num_frames`` of those
used; a clip with fewer is refused with a message naming it (never padded or looped silently).
MP4 and other container formats need the optional ``imageio-ffmpeg`` (``pip install 'diffpo[video]'``);
GIF, WebP and frame folders need only Pillow.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageSequence

from diffpo.data.images import MAX_PIXELS, BadSampleError, decode_image, to_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONTAINER_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


def decode_video(value, base_dir: Path | None = None, where: str = "video", num_frames: int = 4,
                 stride: int = 1) -> list[Image.Image]:
    """``num_frames`` RGB frames (every ``stride``-th from the first) of a clip given as a file or
    frame-folder path, encoded bytes, a ``datasets`` dict with bytes or path, or a list of frames."""
    frames = read_frames(value, base_dir, where)
    kept = frames[::stride]
    if len(kept) < num_frames:
        raise BadSampleError(
            f"{where}: the clip has {len(frames)} frames, {len(kept)} at data.frame_stride={stride}, but "
            f"data.num_frames={num_frames} are needed: lower data.num_frames or data.frame_stride, or drop the clip")
    return kept[:num_frames]


def read_frames(value, base_dir: Path | None = None, where: str = "video") -> list[Image.Image]:
    """Every frame of a clip as RGB PIL images."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise BadSampleError(f"{where}: empty list of frames")
        return [decode_image(v, base_dir, where=f"{where} frame {i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return read_frames(value["bytes"], base_dir, where)
        if value.get("path"):
            return read_frames(value["path"], base_dir, where)
        raise BadSampleError(f"{where}: video dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3":  # MP4 / Matroska-WebM
            return _container_frames(data, where)
        return _animated_frames(io.BytesIO(data), where)
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not files:
                raise BadSampleError(f"{where}: frame folder {path} holds no {'/'.join(FRAME_SUFFIXES)} images")
            return [decode_image(str(p), where=f"{where} frame {p.name}") for p in files]
        if not path.is_file():
            raise BadSampleError(f"{where}: {path} does not exist (a video file or a folder of frames)")
        if path.suffix.lower() in CONTAINER_SUFFIXES:
            return _container_frames(str(path), where)
        return _animated_frames(path, where)
    raise BadSampleError(f"{where}: cannot decode a {type(value).__name__} as a video")


def _animated_frames(source, where: str) -> list[Image.Image]:
    """The frames of a GIF / animated WebP / APNG (a still image is a one-frame clip)."""
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise BadSampleError(f"{where}: {image.width}x{image.height} exceeds {MAX_PIXELS} pixels")
            return [to_rgb(frame.copy()) for frame in ImageSequence.Iterator(image)]
    except BadSampleError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadSampleError(f"{where}: corrupt or unreadable video ({error}); for MP4 give the file a .mp4 name") from None


def _container_frames(source, where: str) -> list[Image.Image]:
    """The frames of an MP4 / WebM / MOV file (or its bytes) through imageio-ffmpeg's ffmpeg."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise BadSampleError(f"{where}: reading MP4/WebM needs imageio-ffmpeg: pip install 'diffpo[video]' "
                             "(or convert the clips to GIF or frame folders)") from None
    if isinstance(source, bytes):  # ffmpeg reads files: spill the bytes to a temporary one
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
            handle.write(source)
            handle.flush()
            return _container_frames(handle.name, where)
    try:
        reader = imageio_ffmpeg.read_frames(str(source), pix_fmt="rgb24")
        meta = next(reader)
        width, height = meta["size"]
        return [Image.frombytes("RGB", (width, height), bytes(frame)) for frame in reader]
    except Exception as error:  # ffmpeg fails in many ways; the message is what matters
        raise BadSampleError(f"{where}: corrupt or unreadable video ({error.__class__.__name__}: {error})") from None


def encode_gif(frames: list[Image.Image], fps: int = 8) -> bytes:
    """Frames -> GIF bytes (a parquet column of encoded videos). GIF quantises to 256 colours per
    frame; use lists of PNG frames where pixels must survive exactly."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=list(frames[1:]), duration=max(1, round(1000 / fps)),
                   loop=0, disposal=2)
    return buffer.getvalue()
