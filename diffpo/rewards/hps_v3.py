"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score", arXiv 2508.03789):
Qwen2-VL-7B with an MLP reward head read at a ``<|Reward|>`` token, trained with an
uncertainty-aware ranking loss, so the head predicts a Gaussian (μ, σ) per image.

Built from transformers' Qwen2-VL classes and the released ``HPSv3.safetensors`` (MizzenAI/HPSv3);
the ``hpsv3`` package (DeepSpeed, TRL) is not needed.
"""

from __future__ import annotations

import torch
from torch import nn

from diffpo.rewards import preprocess
from diffpo.rewards.base import LearnedHead
from diffpo.rewards.qwen2vl_reward import (add_special_tokens, build_backbone, load_config, patchify,
                                           reward_logits, smart_resize, split_checkpoint)
from diffpo.rewards.weights import load_state_dict, resolve_checkpoint

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"  # its config (arch=) and processor (processor_path=)
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # the released inference pins every image to this many pixels (256 visual tokens)

# The released prompt (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION + prompt_with_special_token),
# trailing spaces included: it is part of the model's input.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
RATING_REQUEST = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


class HPSv3Head(nn.Module):
    """The released head (keys rm_head.0/3/5): Linear(hidden, 1024), ReLU, Dropout, Linear(1024, 16),
    ReLU, Linear(16, 2) -> (μ, σ). Sizes are read off the checkpoint."""

    def __init__(self, state: dict):
        super().__init__()
        try:
            shapes = [state[f"{i}.weight"].shape for i in (0, 3, 5)]
        except KeyError as error:
            raise ValueError(f"not an HPSv3 reward head: rm_head.{str(error).strip(chr(39))} missing "
                             "(expected rm_head.0/3/5, the released MLP)") from None
        self.layers = nn.Sequential(nn.Linear(shapes[0][1], shapes[0][0]), nn.ReLU(), nn.Dropout(0.05),
                                    nn.Linear(shapes[1][1], shapes[1][0]), nn.ReLU(), nn.Linear(shapes[2][1], shapes[2][0]))
        self.layers.load_state_dict(state, strict=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


class HPSv3(LearnedHead):
    """HPSv3's predicted preference μ per image (``output="mu"``, what the paper and its inference
    code report); ``output="sigma"`` gives the head's second output, the predicted uncertainty, as
    emitted.

    ``path``: ``HPSv3.safetensors`` (a file, a folder holding it or a hub repo; default
    MizzenAI/HPSv3). ``arch``: the Qwen2-VL config (default Qwen/Qwen2-VL-7B-Instruct; a folder,
    config.json or hub id; the weights all come from the checkpoint). ``processor_path``: the
    Qwen2-VL processor (tokenizer, chat template, image processor; default the same base model);
    ``<|Reward|>`` is added to its tokenizer as the release does. ``pixels``: pixels per image
    after resizing (default 256·28·28, the release's).

    Preprocessing (the release's): 8-bit PIL image resized with PIL bicubic to the 28-divisible size
    of ``pixels`` pixels nearest its aspect ratio, the chat template with the released instruction
    and rating request, right padding, the processor's rescale/normalise/patchify. Differentiable
    path: the same prompt tokens, the resize in torch (antialiased bicubic, no 8-bit rounding), the
    processor's mean/std and patch layout (``qwen2vl_reward.patchify``); on images already at the
    target size the two paths agree to float precision. Use ``dtype="bf16"`` on a GPU (the
    release's dtype); the head itself always runs in fp32.
    """

    name = "hps-v3"

    def __init__(self, path: str | None = None, arch: str | None = None, processor_path: str | None = None,
                 output: str = "mu", pixels: int = PIXELS, **common):
        from transformers import AutoProcessor

        from diffpo.rewards.pickscore import _from_pretrained

        super().__init__(**common)
        if output not in ("mu", "sigma"):
            raise ValueError(f"hps-v3: output={output!r} is unknown; use 'mu' (the score) or 'sigma' (its uncertainty)")
        if pixels < 4 * 28 * 28:
            raise ValueError(f"hps-v3: pixels={pixels} is below Qwen2-VL's minimum 3136 (4 x 28 x 28)")
        self.output, self.pixels = output, pixels
        file = resolve_checkpoint(path, HPSV3_FILE, HPSV3_REPO)
        backbone_state, head_state = split_checkpoint(load_state_dict(file))
        config = load_config(arch or BASE_MODEL, "Qwen2-VL", BASE_MODEL)
        self.processor = _from_pretrained(AutoProcessor, processor_path or BASE_MODEL, "Qwen2-VL processor",
                                          BASE_MODEL, "processor_path")
        self.processor.tokenizer.padding_side = "right"  # the release pads right
        self.token_ids = add_special_tokens(self.processor, [REWARD_TOKEN])
        self.backbone = build_backbone(config, backbone_state, self.device, self.dtype, file)
        self.head = HPSv3Head(head_state).to(self.device).eval().requires_grad_(False)
        if max(self.token_ids) >= self.backbone.config.text_config.vocab_size:
            raise ValueError(f"{file}: the tokenizer of processor_path= puts {REWARD_TOKEN} at id {self.token_ids[0]}, "
                             "outside the checkpoint's vocabulary: use the Qwen2-VL-7B-Instruct processor")

    def messages(self, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + RATING_REQUEST}]}]

    def inputs(self, images: torch.Tensor, prompts: list[str]) -> dict:
        """The processor's batch for ``images`` in [0, 1] (the release's preprocessing)."""
        from PIL import Image

        height, width = smart_resize(*images.shape[-2:], self.pixels, self.pixels)
        pil = [image.resize((width, height), Image.BICUBIC) for image in preprocess.to_pil(images)]
        texts = [self.processor.apply_chat_template(self.messages(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        batch = self.processor(text=texts, images=pil, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _from_batch(self, batch: dict) -> torch.Tensor:
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        logits = reward_logits(self.backbone, self.head, batch, self.token_ids)[:, 0]  # (B, 2): mu, sigma
        return logits[:, 0 if self.output == "mu" else 1]

    def score_images(self, images, prompts):
        return self._from_batch(self.inputs(images, prompts))

    def score_images_differentiable(self, images, prompts):
        batch = self.inputs(images.detach(), prompts)  # token ids and grids: they do not depend on pixel values
        processor = self.processor.image_processor
        pixels = preprocess.resize(images.to(self.device), *smart_resize(*images.shape[-2:], self.pixels, self.pixels))
        pixels = preprocess.normalize(pixels, processor.image_mean, processor.image_std)
        batch["pixel_values"] = patchify(pixels, processor.patch_size, processor.merge_size, processor.temporal_patch_size)
        return self._from_batch(batch)
