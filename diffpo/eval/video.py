"""Video samples in reports: GIF (and MP4 when imageio-ffmpeg is installed) and temporal
consistency, the mean cosine between embeddings of consecutive frames."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

Embedder = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) in [0, 1] -> (N, D)


def temporal_consistency(videos: torch.Tensor, embed: Embedder) -> torch.Tensor:
    """Per video (B, F, 3, H, W): the mean over t of cos(embed(frame_t), embed(frame_t+1)), (B,).
    A single-frame video has no consecutive pair and scores NaN."""
    if videos.ndim != 5:
        raise ValueError(f"temporal_consistency takes (B, F, 3, H, W) videos, got {tuple(videos.shape)}")
    b, f = videos.shape[:2]
    if f < 2:
        return torch.full((b,), float("nan"))
    with torch.no_grad():
        features = embed(videos.flatten(0, 1)).float().cpu().view(b, f, -1)
    features = torch.nn.functional.normalize(features, dim=-1)
    return (features[:, :-1] * features[:, 1:]).sum(dim=-1).mean(dim=1)


def head_embedder(head) -> Embedder:
    """The image embedding of an open_clip reward head (clip, hps-v2, hps-v2.1), with the head's
    own evaluation preprocessing."""
    encoder = getattr(head, "encoder", None)
    if encoder is None or not hasattr(encoder, "encode_images"):
        raise ValueError(f"reward {head.name!r} has no open_clip image encoder: use clip, hps-v2 or hps-v2.1 for "
                         "report.consistency_reward")

    def embed(frames: torch.Tensor) -> torch.Tensor:
        size = head.batch_size or len(frames)
        return torch.cat([encoder.encode_images(encoder.official_pixels(frames[i : i + size]))
                          for i in range(0, len(frames), size)])

    return embed


def pixel_embedding(frames: torch.Tensor) -> torch.Tensor:
    """Frames (N, 3, H, W) in [0, 1] -> their centred pixels (N, 3HW): an embedding needing no weights
    (``report.consistency_embedding=pixels``); it measures pixel change, not content change."""
    flat = frames.flatten(1).float()
    return flat - flat.mean(dim=1, keepdim=True)


def clip_embedder(arch: str | None = None, path: str | None = None, device: str = "cpu", dtype: str = "fp32") -> Embedder:
    """The image embedding of a CLIP encoder of its own (the ``clip`` head's model: ``arch`` and
    ``path`` as that head takes them), for videos whose rewards hold no open_clip head."""
    from diffpo.rewards import load

    return head_embedder(load("clip", path=path, arch=arch, device=device, dtype=dtype))


def per_frame_scores(head, videos: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """An image head on every frame of (B, F, 3, H, W) videos: (per-frame scores (B, F), whole-clip
    scores (B,)). The whole-clip score is the head's own video score, the mean over every
    ``frame_stride``-th frame, here computed from the per-frame scores instead of a second pass."""
    b, f = videos.shape[:2]
    frames = head(videos.flatten(0, 1), [p for p in prompts for _ in range(f)]).view(b, f)
    return frames, frames[:, :: head.frame_stride].mean(dim=1)


def _frames_uint8(frames: torch.Tensor) -> list[np.ndarray]:
    return [(f.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for f in frames]


def save_gif(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """(F, 3, H, W) in [0, 1] -> an endlessly looping GIF."""
    from PIL import Image

    images = [Image.fromarray(a) for a in _frames_uint8(frames)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0, disposal=2)
    return path


def save_mp4(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path | None:
    """(F, 3, H, W) -> H.264 MP4 via imageio-ffmpeg, or None when it is not installed (optional)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    arrays = _frames_uint8(frames)
    h, w = arrays[0].shape[:2]
    # yuv420p needs even sides: pad by repeating the last row/column
    arrays = [np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for a in arrays]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(str(path), (w + w % 2, h + h % 2), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1)
    writer.send(None)
    for a in arrays:
        writer.send(np.ascontiguousarray(a))
    writer.close()
    return path
