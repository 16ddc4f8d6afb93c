"""The reward-head interface: images in [0, 1], prompts as str, one float per image."""

from __future__ import annotations

import torch


def check_images(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Validate (B, 3, H, W) images or (B, F, 3, H, W) videos in [0, 1]; returns them as float."""
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward heads take (B, 3, H, W) images or (B, F, 3, H, W) videos, got {shape}")
    if not images.is_floating_point():
        raise ValueError("reward heads take float images in [0, 1]; divide uint8 images by 255")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image")
    return images.float()


class RewardHead:
    """Base class. Subclasses implement ``score_images`` on (N, 3, H, W); videos are scored frame by
    frame and averaged over frames."""

    name = "reward"
    higher_is_better = True
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = check_images(images, list(prompts))
        if images.ndim == 5:
            b, f = images.shape[:2]
            frame_prompts = [p for p in prompts for _ in range(f)]
            return self.score_images(images.flatten(0, 1), frame_prompts).view(b, f).mean(dim=1)
        return self.score_images(images, list(prompts))

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError
