"""An open_clip model behind the two preprocessing paths the CLIP-family heads share.

``OpenClipEncoder`` holds one model (weights loaded once), its tokenizer and its preprocessing
config, and returns L2-normalised float32 embeddings. ``official_pixels`` is open_clip's own
inference transform on 8-bit PIL images (what scoring saved files does); ``differentiable_pixels``
is the same geometry in pure torch (diffpo.rewards.preprocess), so gradients reach the pixels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from diffpo.rewards import preprocess
from diffpo.rewards.weights import looks_like_hub_id


def check_arch(arch: str) -> None:
    """Fail with a one-line message for an architecture open_clip does not know."""
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")) or open_clip.get_model_config(arch) is not None:
        return
    raise ValueError(
        f"open_clip architecture {arch!r} is unknown: use one of open_clip.list_models() or register a "
        "custom one with open_clip.add_model_config('my-arch.json') and pass arch='my-arch'"
    )


def create_open_clip(arch: str, pretrained: str | None = None) -> torch.nn.Module:
    """``open_clip.create_model`` with one-line errors; ``pretrained`` is a tag or a local checkpoint
    (loaded with ``weights_only=True``), None for random weights."""
    import open_clip

    check_arch(arch)
    if pretrained is not None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not open_clip.get_pretrained_cfg(arch, pretrained):
            if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or looks_like_hub_id(pretrained):
                raise FileNotFoundError(f"open_clip checkpoint not found at {pretrained}: pass path= an existing file or a pretrained tag")
            raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {arch}; tags: {', '.join(tags) or 'none'}")
    try:
        return open_clip.create_model(arch, pretrained=pretrained, device="cpu", weights_only=True)
    except RuntimeError as error:  # open_clip reports failed downloads and mismatched state dicts alike
        if pretrained is not None and os.path.isfile(pretrained):
            raise ValueError(f"{pretrained} does not match open_clip {arch}: {str(error).splitlines()[0][:200]}") from None
        raise FileNotFoundError(
            f"open_clip weights {arch}/{pretrained} are not in the cache and could not be downloaded: "
            "download them while online or pass path= a local checkpoint"
        ) from None


class OpenClipEncoder:
    """Normalised image and text embeddings of one open_clip model on ``device`` in ``dtype``."""

    def __init__(self, model: torch.nn.Module, arch: str, device: torch.device, dtype: torch.dtype):
        import open_clip

        self.device, self.dtype = device, dtype
        self.model = model.to(device=device, dtype=dtype).eval()  # create_model returns train mode
        self.model.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.cfg = dict(open_clip.get_model_preprocess_cfg(self.model))
        size = self.cfg.get("size", 224)
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.cfg.setdefault("mean", preprocess.OPENAI_MEAN)
        self.cfg.setdefault("std", preprocess.OPENAI_STD)
        self.cfg.setdefault("interpolation", "bicubic")
        self.cfg.setdefault("resize_mode", "shortest")
        self.cfg.setdefault("fill_color", 0)
        self._pil_transform = None

    def official_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's inference transform (``open_clip.image_transform``) on 8-bit PIL images."""
        import open_clip

        if self._pil_transform is None:
            self._pil_transform = open_clip.image_transform(
                self.size, is_train=False, mean=self.cfg["mean"], std=self.cfg["std"],
                resize_mode=self.cfg["resize_mode"], interpolation=self.cfg["interpolation"],
                fill_color=self.cfg["fill_color"])
        return torch.stack([self._pil_transform(image) for image in preprocess.to_pil(images)])

    def differentiable_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The geometry of ``official_pixels`` in pure torch, without the 8-bit rounding."""
        mode = "bilinear" if self.cfg["interpolation"] == "bilinear" else "bicubic"
        if self.cfg["resize_mode"] == "longest":
            images = preprocess.letterbox(images, self.size, fill=self.cfg["fill_color"] / 255.0, mode=mode)
        elif self.cfg["resize_mode"] == "squash":
            images = preprocess.resize(images, self.size, self.size, mode)
        else:
            images = preprocess.center_crop(preprocess.resize_shortest(images, self.size, mode), self.size, self.size)
        return preprocess.normalize(images, self.cfg["mean"], self.cfg["std"])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(pixels.to(device=self.device, dtype=self.dtype))
        return F.normalize(features.float(), dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One embedding per prompt; each distinct prompt goes through the text tower once."""
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():  # gradients are for the pixels only
            tokens = self.tokenizer(unique).to(self.device)
            features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        positions = {prompt: i for i, prompt in enumerate(unique)}
        index = torch.tensor([positions[p] for p in prompts], device=features.device)
        return features[index]
