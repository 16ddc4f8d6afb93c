"""CLIP score with any open_clip model."""

from __future__ import annotations

import torch

from diffpo.rewards.base import LearnedHead
from diffpo.rewards.open_clip_model import OpenClipEncoder, create_open_clip


class ClipScore(LearnedHead):
    """100 · max(cos(image, prompt), 0), the torchmetrics ``CLIPScore`` convention; ``raw=True``
    gives the cosine itself.

    ``arch``: an open_clip architecture (default ViT-H-14; ``hf-hub:``/``local-dir:`` schemas and
    configs registered with ``open_clip.add_model_config`` work). ``path``: a pretrained tag
    (default ``laion2b_s32b_b79k``) or a local checkpoint file.

    Evaluation path: open_clip's own inference transform on 8-bit PIL images. Differentiable path:
    the same resize/crop/normalise in torch. On square images the two agree within 1e-3 in cosine
    (0.1 on the 100 scale; measured max 7e-4 on tiny random-weight models, 32-100 px): the gap is the
    8-bit rounding and PIL's bicubic filter vs torch's antialiased bicubic.
    """

    name = "clip"

    def __init__(self, path: str | None = None, arch: str | None = None, raw: bool = False, **common):
        super().__init__(**common)
        self.arch = arch or "ViT-H-14"
        self.raw = raw
        model = create_open_clip(self.arch, self._pretrained(path, arch))
        self.encoder = OpenClipEncoder(model, self.arch, self.device, self.dtype)

    @staticmethod
    def _pretrained(path: str | None, arch: str | None) -> str | None:
        if path is not None or arch is None:
            return path or "laion2b_s32b_b79k"
        if arch.startswith(("hf-hub:", "local-dir:")):
            return None  # the weights come with the architecture
        # a random-weight CLIP score would look like a real one: make the choice explicit
        raise ValueError(f"clip with arch={arch!r} needs path= (a pretrained tag or a local checkpoint)")

    def _from_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cosine = (self.encoder.encode_images(pixels) * self.encoder.encode_prompts(prompts)).sum(dim=-1)
        return cosine if self.raw else 100 * cosine.clamp(min=0)

    def score_images(self, images, prompts):
        return self._from_pixels(self.encoder.official_pixels(images), prompts)

    def score_images_differentiable(self, images, prompts):
        return self._from_pixels(self.encoder.differentiable_pixels(images.to(self.device)), prompts)
