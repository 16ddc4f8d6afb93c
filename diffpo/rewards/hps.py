"""Human Preference Score v2 / v2.1 (Wu et al. 2023) with open_clip_torch and the official checkpoints."""

from __future__ import annotations

import torch

from diffpo.rewards import preprocess
from diffpo.rewards.base import LearnedHead
from diffpo.rewards.open_clip_model import OpenClipEncoder, create_open_clip
from diffpo.rewards.weights import load_state_dict, resolve_checkpoint

HPS_REPO = "xswu/HPSv2"


class HPSv2(LearnedHead):
    """100 · cos(image, prompt) of the HPS-finetuned open_clip ViT-H-14 (the HPS benchmark scale);
    ``raw=True`` gives the cosine.

    The model is created with ``pretrained=None`` (no LAION download) and loaded once from
    ``path``: a checkpoint file, a folder holding it, or a hub repo (default xswu/HPSv2); the
    weights are ``checkpoint["state_dict"]``. ``arch`` overrides ViT-H-14 (tests use tiny configs).

    Evaluation path (the official one, in torch like HPSv2's ``image_transform``): 8-bit rounding
    (the PIL -> ``ToTensor`` round trip), bicubic antialiased resize of the longest side to 224 on the
    tensor, zero padding to a square centred as HPSv2's ``ResizeMaxSize`` (odd pixel right/bottom),
    OpenAI mean/std. One deliberate difference: HPSv2 skips the padding when the longest side is
    already 224, leaving a non-square input; here it is always padded. Differentiable path: the same
    without the 8-bit rounding; on square images the scores agree within 0.05 on the 100 scale
    (measured max 0.024 on tiny random-weight models, 32-100 px). The resize is torchvision's on a
    tensor with antialias=True (torchvision >= 0.17's default).
    """

    name = "hps-v2"
    filename = "HPS_v2_compressed.pt"

    def __init__(self, path: str | None = None, arch: str | None = None, raw: bool = False, **common):
        super().__init__(**common)
        self.arch = arch or "ViT-H-14"
        self.raw = raw
        file = resolve_checkpoint(path, self.filename, HPS_REPO)
        model = create_open_clip(self.arch, None)
        state = load_state_dict(file, key="state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}  # checkpoints saved under DDP
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{file} does not match open_clip {self.arch}: {str(error).splitlines()[0]}") from None
        self.encoder = OpenClipEncoder(model, self.arch, self.device, self.dtype)

    def _from_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cosine = (self.encoder.encode_images(pixels) * self.encoder.encode_prompts(prompts)).sum(dim=-1)
        return cosine if self.raw else 100 * cosine

    def score_images(self, images, prompts):
        import torchvision.transforms.functional as TF

        images = preprocess.quantize(images)
        (new_h, new_w), padding = preprocess.letterbox_geometry(*images.shape[-2:], self.encoder.size)
        if (new_h, new_w) != tuple(images.shape[-2:]):
            images = TF.resize(images, [new_h, new_w], TF.InterpolationMode.BICUBIC, antialias=True)
        images = TF.pad(images, list(padding), fill=0)
        return self._from_pixels(TF.normalize(images, preprocess.OPENAI_MEAN, preprocess.OPENAI_STD), prompts)

    def score_images_differentiable(self, images, prompts):
        pixels = preprocess.letterbox(images.to(self.device), self.encoder.size)
        return self._from_pixels(preprocess.normalize(pixels, preprocess.OPENAI_MEAN, preprocess.OPENAI_STD), prompts)


class HPSv21(HPSv2):
    """HPS v2.1: the same model and preprocessing with the v2.1 checkpoint."""

    name = "hps-v2.1"
    filename = "HPS_v2.1_compressed.pt"
