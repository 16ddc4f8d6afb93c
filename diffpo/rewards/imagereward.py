"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", arXiv 2304.05977) on transformers' BLIP classes.

The released model is BLIP's ViT (timm-style) and BLIP's "MED" BERT with cross-attention to the
image tokens; the [CLS] state of the text goes through a 5-layer MLP and is standardised with the
mean and standard deviation of the training rewards. Both towers exist in transformers as
``BlipVisionModel`` and ``BlipTextModel`` (the MED BERT under the same parameter names), so the
official ``ImageReward.pt`` loads key for key through ``official_to_diffpo``; the ``image-reward``
package (which fails to import on transformers 5) is not needed.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from diffpo.rewards import preprocess
from diffpo.rewards.aesthetic import AestheticMLP
from diffpo.rewards.base import LearnedHead
from diffpo.rewards.weights import load_state_dict, resolve_checkpoint

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
TOKENIZER = "bert-base-uncased"  # what BLIP's init_tokenizer loads, plus [DEC] and [ENC]
# ImageReward.py: the reward is standardised with these (mean, std of the training rewards)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # the official tokenizer call: padding="max_length", truncation, max_length=35
HEAD_DIM = 64  # BLIP's ViT-B (768/12) and ViT-L (1024/16) and the MED BERT (768/12) all use 64-dim heads

# official (ImageReward.pt) -> diffpo names of the vision tower; the text tower keeps its names
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
# in the file but not used for the reward: BLIP's contrastive projections and a buffer
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")


def official_to_diffpo(state: dict) -> dict[str, dict]:
    """Split the official state dict into ``{"vision": ..., "text": ..., "mlp": ...}`` with the
    parameter names of ``BlipVisionModel``, ``BlipTextModel`` and ``AestheticMLP``:

    ===================================================  ============================================
    ImageReward.pt                                       diffpo
    ===================================================  ============================================
    blip.visual_encoder.cls_token / pos_embed            vision embeddings.class_embedding / position_embedding
    blip.visual_encoder.patch_embed.proj.*               vision embeddings.patch_embedding.*
    blip.visual_encoder.blocks.N.norm1/norm2.*           vision encoder.layers.N.layer_norm1/layer_norm2.*
    blip.visual_encoder.blocks.N.attn.qkv/proj.*         vision encoder.layers.N.self_attn.qkv/projection.*
    blip.visual_encoder.blocks.N.mlp.fc1/fc2.*           vision encoder.layers.N.mlp.fc1/fc2.*
    blip.visual_encoder.norm.*                           vision post_layernorm.*
    blip.text_encoder.*                                  text * (same names)
    mlp.layers.{0,2,4,6,7}.*                             mlp layers.{0,2,4,6,7}.*
    blip.vision_proj.*, blip.text_proj.*, position_ids   dropped (not used by the reward)
    ===================================================  ============================================

    Raises ValueError naming the first keys it cannot place.
    """
    parts: dict[str, dict] = {"vision": {}, "text": {}, "mlp": {}}
    unknown = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if _UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION_RENAMES:
                if re.search(pattern, name):
                    parts["vision"][re.sub(pattern, replacement, name)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            parts["mlp"][key.removeprefix("mlp.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an ImageReward checkpoint: unexpected keys {unknown[:3]} (expected blip.visual_encoder.*, "
                         "blip.text_encoder.*, mlp.layers.*)")
    return parts


def configs_from_state(parts: dict[str, dict], med_config: dict | None = None):
    """``BlipVisionConfig`` and ``BlipTextConfig`` read off the checkpoint's shapes. Head counts are
    not in the shapes: 64-dim heads (BLIP's ViT-B/L and the MED BERT), or the text config's
    ``num_attention_heads`` from ``med_config`` (ImageReward's med_config.json)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision, text = parts["vision"], parts["text"]
    try:
        width = vision["embeddings.class_embedding"].shape[-1]
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        grid = math.isqrt(vision["embeddings.position_embedding"].shape[1] - 1)
        depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
        text_width = text["embeddings.word_embeddings.weight"].shape[1]
        text_layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer."))
    except (KeyError, ValueError) as error:
        raise ValueError(f"not an ImageReward checkpoint: missing {error}") from None
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=width // HEAD_DIM, image_size=grid * patch, patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
        hidden_act="gelu", attention_dropout=0.0)
    med = med_config or {}
    text_config = BlipTextConfig(
        vocab_size=text["embeddings.word_embeddings.weight"].shape[0], hidden_size=text_width,
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=text_layers, num_attention_heads=med.get("num_attention_heads", text_width // HEAD_DIM),
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=med.get("pad_token_id", 0), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return vision_config, text_config


class ImageReward(LearnedHead):
    """ImageReward's standardised reward ((MLP(text [CLS] state) − 0.1672) / 1.0333, the scale of
    the paper and of ``ImageReward.score``); ``raw=True`` gives the MLP output before standardising.

    ``path``: ``ImageReward.pt`` (a file, a folder holding it or a hub repo; default THUDM/ImageReward),
    loaded with ``torch.load(weights_only=True)`` and mapped by ``official_to_diffpo``.
    ``tokenizer_path``: the BERT tokenizer (default bert-base-uncased, BLIP's; [DEC] and [ENC] are
    added as BLIP does). ``arch``: optional ``med_config.json`` of the text tower (head count,
    layer-norm epsilon); sizes are read off the checkpoint.

    Evaluation path (the official ``_transform``): 8-bit PIL image, shortest side resized to 224
    with PIL bicubic, centre crop 224, OpenAI CLIP mean/std. Differentiable path: the same geometry
    in torch (antialiased bicubic, no 8-bit rounding).
    """

    name = "imagereward"

    def __init__(self, path: str | None = None, arch: str | None = None, tokenizer_path: str | None = None,
                 raw: bool = False, **common):
        from transformers import BertTokenizer
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        from diffpo.rewards.pickscore import _from_pretrained

        super().__init__(**common)
        self.raw = raw
        file = resolve_checkpoint(path, IMAGEREWARD_FILE, IMAGEREWARD_REPO)
        parts = official_to_diffpo(load_state_dict(file))
        med_config = None
        if arch is not None:
            if not os.path.isfile(arch):
                raise FileNotFoundError(f"med_config.json not found at {arch}: download it from {IMAGEREWARD_REPO} or leave arch= out")
            with open(arch) as handle:
                med_config = json.load(handle)
        vision_config, text_config = configs_from_state(parts, med_config)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        with no_init_weights():  # every weight comes from the checkpoint (checked below)
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)  # the same 5 linears (keys layers.0/2/4/6/7)
        for module, part in ((self.vision, "vision"), (self.text, "text"), (self.mlp, "mlp")):
            result = module.load_state_dict(parts[part], strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
            if missing or result.unexpected_keys:
                bad = (missing or result.unexpected_keys)[:3]
                raise ValueError(f"{file} does not match ImageReward's {part} tower: "
                                 f"{'missing' if missing else 'unexpected'} {bad}")
        self._freeze(self.vision)
        self._freeze(self.text)
        self.mlp = self.mlp.to(self.device).eval().requires_grad_(False)  # fp32, as ImageReward.score's .float()
        self.size = vision_config.image_size
        tokenizer = _from_pretrained(BertTokenizer, tokenizer_path or TOKENIZER, "BERT tokenizer", TOKENIZER, "tokenizer_path")
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.tokenizer = tokenizer
        self._pil_transform = None

    def _tokens(self, prompts: list[str]) -> dict:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device), "attention_mask": tokens["attention_mask"].to(self.device)}

    def _from_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixels.to(device=self.device, dtype=self.dtype)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.text(**self._tokens(prompts), encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        reward = self.mlp(text[:, 0].float())[:, 0]
        return reward if self.raw else (reward - REWARD_MEAN) / REWARD_STD

    def official_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """ImageReward's ``_transform`` (torchvision on PIL images)."""
        from torchvision import transforms as T

        if self._pil_transform is None:
            self._pil_transform = T.Compose([
                T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(self.size),
                T.ToTensor(), T.Normalize(preprocess.OPENAI_MEAN, preprocess.OPENAI_STD)])
        return torch.stack([self._pil_transform(image) for image in preprocess.to_pil(images)])

    def differentiable_pixels(self, images: torch.Tensor) -> torch.Tensor:
        images = preprocess.center_crop(preprocess.resize_shortest(images, self.size), self.size, self.size)
        return preprocess.normalize(images, preprocess.OPENAI_MEAN, preprocess.OPENAI_STD)

    def score_images(self, images, prompts):
        return self._from_pixels(self.official_pixels(images), prompts)

    def score_images_differentiable(self, images, prompts):
        return self._from_pixels(self.differentiable_pixels(images.to(self.device)), prompts)
