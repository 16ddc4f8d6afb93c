"""Model families: everything that differs between SD1.x/2.x, SDXL and the text-to-video stacks
lives here and only here.

A family knows which components its pipeline folder holds, which UNet class it loads, how to turn
prompts into UNet conditioning (SDXL: two text encoders, penultimate hidden states, pooled
embeddings and real ``add_time_ids`` from original size / crop offset / target size), which of the
UNet's modules are temporal (video families: LoRA on spatial layers, motion modules or both), and
which pipeline class loads and saves its LoRA weights. It is chosen from ``model_index.json``'s
``_class_name``. Video latents are (B, C, F, H, W) throughout; the kernel never needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextEmbeddings:
    """Per-prompt text conditioning: hidden states (N, L, D) and, for SDXL, pooled (N, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "TextEmbeddings":
        return TextEmbeddings(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def where(self, mask: torch.Tensor, other: "TextEmbeddings") -> "TextEmbeddings":
        """Per row: ``other`` where ``mask`` (N,) is true, else self (prompt dropout)."""
        m = mask.to(self.hidden.device)
        hidden = torch.where(m[:, None, None], other.hidden.expand_as(self.hidden), self.hidden)
        pooled = None
        if self.pooled is not None:
            pooled = torch.where(m[:, None], other.pooled.expand_as(self.pooled), self.pooled)
        return TextEmbeddings(hidden, pooled)

    def repeat_pairs(self) -> "TextEmbeddings":
        """Duplicate for the concatenated [winners, losers] batch."""
        return TextEmbeddings(
            torch.cat([self.hidden, self.hidden]), None if self.pooled is None else torch.cat([self.pooled, self.pooled])
        )


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


class StableDiffusionFamily:
    """SD1.x / SD2.x: one CLIP text encoder, last hidden state, no added conditioning."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    unet_class_name = "UNet2DConditionModel"
    text_encoder_names = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    # components a pipeline is built without (diffpo trains none of them)
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    video = False
    motion_markers: tuple[str, ...] = ()  # module-name parts of temporal layers (video families)
    keyword_called: str | None = None  # regex of module paths the UNet calls as f(input=x): no LoRA there
    supports_lora = True

    @property
    def unet_class(self):
        import diffusers

        return getattr(diffusers, self.unet_class_name)

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str]) -> TextEmbeddings:
        encoder = text_encoders[0]
        hidden = encoder(_tokenize(tokenizers[0], prompts, encoder.device))[0]
        return TextEmbeddings(hidden)

    def unet_conditioning(self, text: TextEmbeddings, time_ids: torch.Tensor | None = None) -> dict:
        return {"encoder_hidden_states": text.hidden}


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two text encoders (penultimate layers concatenated), pooled embeddings of the second,
    and micro-conditioning ``time_ids`` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    pipeline_extras = {}
    text_encoder_names = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
    )

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str]) -> TextEmbeddings:
        hiddens, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(_tokenize(tokenizer, prompts, encoder.device), output_hidden_states=True)
            hiddens.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        return TextEmbeddings(torch.cat(hiddens, dim=-1), pooled)

    def unet_conditioning(self, text: TextEmbeddings, time_ids: torch.Tensor | None = None) -> dict:
        if time_ids is None:
            raise ValueError("SDXL needs time_ids (original size, crop offset, target size) per image")
        added = {"text_embeds": text.pooled, "time_ids": time_ids.to(text.hidden.device, text.hidden.dtype)}
        return {"encoder_hidden_states": text.hidden, "added_cond_kwargs": added}


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: int) -> torch.Tensor:
    """(N, 6) ``add_time_ids`` from per-image original (h, w) and crop (top, left), SDXL Sec. 2.2."""
    target = torch.tensor([target_size, target_size], dtype=original_size.dtype).expand_as(original_size)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


class AnimateDiffFamily(StableDiffusionFamily):
    """AnimateDiff: an SD1.x UNet with motion modules (``UNetMotionModel``), SD1.x text encoding.

    diffusers 0.42.1's ``UNetMotionModel`` does not repeat the text embeddings per frame: the
    denoiser passes them repeated with ``repeat_interleave(num_frames, 0)`` (``text_per_frame``)."""

    name = "animatediff"
    pipeline_class_name = "AnimateDiffPipeline"
    unet_class_name = "UNetMotionModel"
    pipeline_extras = {"motion_adapter": None, "feature_extractor": None, "image_encoder": None}
    video = True
    motion_markers = ("motion_modules",)
    # diffusers 0.42.1's AnimateDiffTransformer3D calls proj_in(input=...) / proj_out(input=...)
    keyword_called = r"motion_modules\.\d+\.proj_(in|out)$"


class TextToVideoFamily(StableDiffusionFamily):
    """ModelScope text-to-video / zeroscope: ``UNet3DConditionModel`` (temporal convolutions and
    attention after each spatial layer), SD1.x text encoding; the UNet repeats the text per frame.

    diffusers 0.42.1's ``UNet3DConditionModel`` has no peft adapter support, so
    ``TextToVideoSDPipeline.load_lora_weights`` cannot load a LoRA into it: full fine-tuning only."""

    name = "text-to-video"
    pipeline_class_name = "TextToVideoSDPipeline"
    unet_class_name = "UNet3DConditionModel"
    pipeline_extras = {}
    video = True
    motion_markers = ("temp_convs", "temp_attentions", "transformer_in")
    supports_lora = False


FAMILIES = {
    "StableDiffusionPipeline": StableDiffusionFamily(),
    "StableDiffusionXLPipeline": StableDiffusionXLFamily(),
    "AnimateDiffPipeline": AnimateDiffFamily(),
    "TextToVideoSDPipeline": TextToVideoFamily(),
}
TEXT_PER_FRAME_UNETS = ("UNetMotionModel",)  # UNet classes that take (B * F, L, D) text embeddings


def is_motion_module(family, module_name: str) -> bool:
    """Whether ``module_name`` (a dotted UNet module path) lies in one of ``family``'s temporal layers."""
    return any(marker in module_name.split(".") for marker in family.motion_markers)


def text_per_frame(unet) -> bool:
    """Whether ``unet`` (possibly wrapped for data parallelism) wants its text embeddings per frame."""
    return type(getattr(unet, "module", unet)).__name__ in TEXT_PER_FRAME_UNETS


def repeat_text_per_frame(conditioning: dict, num_frames: int) -> dict:
    """``encoder_hidden_states`` (B, L, D) -> (B * F, L, D), clip-major as diffusers' pipelines do."""
    hidden = conditioning["encoder_hidden_states"]
    return {**conditioning, "encoder_hidden_states": hidden.repeat_interleave(num_frames, 0)}


def family_for(pipeline_class_name: str):
    if pipeline_class_name not in FAMILIES:
        raise ValueError(
            f"pipeline class {pipeline_class_name!r} is not supported for training yet; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[pipeline_class_name]
