"""PickScore (Kirstain et al. 2023): a CLIP-H finetuned on Pick-a-Pic preferences, via transformers."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from diffpo.rewards import preprocess
from diffpo.rewards.base import LearnedHead
from diffpo.rewards.weights import looks_like_hub_id

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def projected(output) -> torch.Tensor:
    """The projected embedding: transformers 5.x returns an output object (``pooler_output``), 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _from_pretrained(loader, source: str, what: str, default: str, option: str, **kwargs):
    """``loader.from_pretrained`` with a one-line error for a missing local folder or an unreachable hub id."""
    hint = f"download {default} from the hub or pass {option}= a folder saved with save_pretrained"
    if not os.path.exists(source) and not looks_like_hub_id(source):
        raise FileNotFoundError(f"{what} not found at {source}: {hint}")
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as error:  # transformers reports offline / missing files as OSError
        raise FileNotFoundError(f"{what} {source} could not be loaded ({str(error).splitlines()[0][:120]}): {hint}") from None


def _field(size, key: str):
    return size[key] if isinstance(size, dict) else getattr(size, key)


class PickScore(LearnedHead):
    """logit_scale.exp() · cos(image, prompt) of ``transformers.CLIPModel`` (the PickScore paper scale).

    ``path``: the model (hub id or folder; default yuvalkirstain/PickScore_v1). ``processor_path``:
    its processor (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the one PickScore was trained with).
    ``arch``: a ``CLIPConfig`` folder or config.json that overrides the model's config.

    Evaluation path: the processor on 8-bit PIL images, as the official example does. Differentiable
    path: the processor's resize (shortest edge) / centre crop / rescale / normalise in torch; on square
    images the two agree within 0.02 at a logit scale of 14.3 (measured max 0.0075 on tiny random-weight
    models, 32-100 px; the gap grows with logit_scale, which is 100 for the released model).
    """

    name = "pickscore"

    def __init__(self, path: str | None = None, arch: str | None = None, processor_path: str | None = None, **common):
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        super().__init__(**common)
        source = path or PICKSCORE_MODEL
        kwargs = {}
        if arch is not None:
            kwargs["config"] = _from_pretrained(CLIPConfig, arch, "CLIP config", "a CLIPConfig", "arch")
        model = _from_pretrained(CLIPModel, source, "PickScore model", PICKSCORE_MODEL, "path", **kwargs)
        self.model = self._freeze(model)
        self.processor = _from_pretrained(AutoProcessor, processor_path or PICKSCORE_PROCESSOR, "PickScore processor",
                                          PICKSCORE_PROCESSOR, "processor_path")

    def _text(self, prompts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():  # gradients are for the pixels only
            tokens = self.processor(text=unique, padding=True, truncation=True, max_length=77, return_tensors="pt")
            features = projected(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)))
        positions = {prompt: i for i, prompt in enumerate(unique)}
        return F.normalize(features.float(), dim=-1)[torch.tensor([positions[p] for p in prompts], device=self.device)]

    def _from_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = projected(self.model.get_image_features(pixel_values=pixels.to(device=self.device, dtype=self.dtype)))
        cosine = (F.normalize(image.float(), dim=-1) * self._text(prompts)).sum(dim=-1)
        return self.model.logit_scale.float().exp() * cosine

    def official_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return self.processor(images=preprocess.to_pil(images), return_tensors="pt")["pixel_values"]

    def differentiable_pixels(self, images: torch.Tensor) -> torch.Tensor:
        ip = self.processor.image_processor
        if ip.do_resize:
            images = preprocess.resize_shortest(images, _field(ip.size, "shortest_edge"))
        if ip.do_center_crop:
            images = preprocess.center_crop(images, _field(ip.crop_size, "height"), _field(ip.crop_size, "width"))
        # the processor rescales 0-255 pixels by rescale_factor (1/255): ours are already in [0, 1]
        images = images * (ip.rescale_factor * 255) if ip.do_rescale else images * 255
        return preprocess.normalize(images, ip.image_mean, ip.image_std) if ip.do_normalize else images

    def score_images(self, images, prompts):
        return self._from_pixels(self.official_pixels(images), prompts)

    def score_images_differentiable(self, images, prompts):
        return self._from_pixels(self.differentiable_pixels(images.to(self.device)), prompts)

    def probabilities(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """P(candidate i is preferred) for K candidate images of one prompt: softmax over their scores."""
        return preference_probabilities(self(images, [prompt] * images.shape[0]))


def preference_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim: scores (..., K) of K candidates for one prompt -> probabilities."""
    return torch.softmax(scores.float(), dim=-1)
