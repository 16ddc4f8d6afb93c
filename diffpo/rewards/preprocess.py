"""Pure-torch image preprocessing shared by the learned heads (differentiable; no PIL).

Every function takes and returns (N, 3, H, W) float tensors. Sizes are computed with the same
integer arithmetic as the official pipelines (torchvision ``Resize``/``CenterCrop`` and HPSv2's
``ResizeMaxSize``) so the pure-torch and the official paths produce the same geometry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """Antialiased bicubic/bilinear resize (what torchvision does on tensors); a no-op at the same size."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode=mode, align_corners=False, antialias=True)


def resize_shortest(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Shorter side -> ``size``, the longer one truncated like torchvision's ``Resize(int)``."""
    h, w = images.shape[-2:]
    if h <= w:
        return resize(images, size, int(size * w / h), mode)
    return resize(images, int(size * h / w), size, mode)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's ``CenterCrop`` offsets (round((H - h) / 2)); images must be at least that big."""
    h, w = images.shape[-2:]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return images[..., top : top + height, left : left + width]


def letterbox_geometry(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """HPSv2's ``ResizeMaxSize``: the resized (h, w) with the longest side = ``size``, and the
    (left, top, right, bottom) zero padding that centres it (the odd pixel goes right/bottom)."""
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    pad_h, pad_w = size - new_h, size - new_w
    return (new_h, new_w), (pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2)


def letterbox(images: torch.Tensor, size: int, fill: float = 0.0, mode: str = "bicubic") -> torch.Tensor:
    """Resize the longest side to ``size`` and pad with ``fill`` to a centred ``size`` square."""
    (new_h, new_w), (left, top, right, bottom) = letterbox_geometry(*images.shape[-2:], size)
    images = resize(images, new_h, new_w, mode)
    return F.pad(images, (left, right, top, bottom), value=fill)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to 8 bits, as saving to PNG and reloading with ``ToTensor`` does."""
    return (images.clamp(0, 1) * 255).round() / 255


def to_pil(images: torch.Tensor) -> list:
    """8-bit RGB PIL images (the rounding of ``quantize``)."""
    from PIL import Image

    arrays = (images.detach().clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]
