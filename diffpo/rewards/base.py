"""The reward-head interface: images in [0, 1], prompts as str, one float per image."""

from __future__ import annotations

import torch

RANGE_TOLERANCE = 1e-3  # bicubic overshoot and fp16 rounding put valid images a hair outside [0, 1]


def check_images(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Validate (B, 3, H, W) images or (B, F, 3, H, W) videos in [0, 1]; returns them as float."""
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward heads take (B, 3, H, W) images or (B, F, 3, H, W) videos, got {shape}")
    if not images.is_floating_point():
        raise ValueError("reward heads take float images in [0, 1]; divide uint8 images by 255")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image")
    if images.numel():
        low, high = float(images.detach().min()), float(images.detach().max())
        if not (low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE):  # also catches NaN
            raise ValueError(
                f"reward heads take images in [0, 1], got values in [{low:.4g}, {high:.4g}]: "
                "map [-1, 1] images with (x + 1) / 2, divide 0-255 images by 255"
            )
    return images.float()


class RewardHead:
    """Base class. Subclasses implement ``score_images`` on (N, 3, H, W) (the evaluation path) and,
    when ``differentiable``, ``score_images_differentiable`` (a pure-torch path gradients flow through).

    ``head(images, prompts)`` scores without gradients in chunks of ``batch_size`` and returns float32
    on the CPU; ``head.score_differentiable(images, prompts)`` keeps the graph. Videos are scored on
    every ``frame_stride``-th frame (starting at frame 0) and averaged over those frames.
    """

    name = "reward"
    higher_is_better = True
    differentiable = False
    scores_videos = False  # True: score_images takes whole (N, F, 3, H, W) videos (motion rewards)

    def __init__(self, batch_size: int | None = None, frame_stride: int = 1):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (or None: everything at once)")
        if frame_stride < 1:
            raise ValueError(f"frame_stride={frame_stride} must be >= 1")
        self.batch_size = batch_size
        self.frame_stride = frame_stride

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self._score(images, prompts, self.score_images).float().cpu()

    def score_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores through which gradients reach ``images`` (float32, on the head's device)."""
        if not self.differentiable:
            raise ValueError(f"reward {self.name!r} is not differentiable; use one of the learned heads or 'brightness'")
        return self._score(images, prompts, self.score_images_differentiable).float()

    def _score(self, images, prompts, score_fn) -> torch.Tensor:
        images = check_images(images, list(prompts))
        prompts = list(prompts)
        if self.scores_videos:
            if images.ndim != 5:
                raise ValueError(f"reward {self.name!r} scores videos (B, F, 3, H, W), got images {tuple(images.shape)}")
            return self._batched(images[:, :: self.frame_stride], prompts, score_fn)
        if images.ndim == 5:
            frames = images[:, :: self.frame_stride]
            b, f = frames.shape[:2]
            frame_prompts = [p for p in prompts for _ in range(f)]
            return self._batched(frames.flatten(0, 1), frame_prompts, score_fn).view(b, f).mean(dim=1)
        return self._batched(images, prompts, score_fn)

    def _batched(self, images, prompts, score_fn) -> torch.Tensor:
        size = self.batch_size or max(len(prompts), 1)
        chunks = [score_fn(images[i : i + size], prompts[i : i + size]).reshape(-1) for i in range(0, len(prompts), size)]
        return torch.cat(chunks) if chunks else torch.zeros(0)

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_images_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_images(images, prompts)


class LearnedHead(RewardHead):
    """A head with model weights: ``device`` and ``dtype`` are injected, weights load once in the
    constructor, and the model is frozen in eval mode."""

    differentiable = True

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 batch_size: int | None = 16, frame_stride: int = 1):
        from diffpo.rewards.weights import resolve_dtype

        super().__init__(batch_size=batch_size, frame_stride=frame_stride)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)

    def _freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        # create_model / from_pretrained can hand back train mode (dropout on): scores must be deterministic
        module = module.to(device=self.device, dtype=self.dtype).eval()
        module.requires_grad_(False)
        return module
