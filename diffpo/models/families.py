"""Model families: everything that differs between SD1.x/2.x and SDXL lives here and only here.

A family knows which components its pipeline folder holds, how to turn prompts into UNet
conditioning (SDXL: two text encoders, penultimate hidden states, pooled embeddings and real
``add_time_ids`` from original size / crop offset / target size), and which pipeline class
loads and saves its LoRA weights. It is chosen from ``model_index.json``'s ``_class_name``.
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
    text_encoder_names = (("tokenizer", "text_encoder", "CLIPTextModel"),)

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


FAMILIES = {
    "StableDiffusionPipeline": StableDiffusionFamily(),
    "StableDiffusionXLPipeline": StableDiffusionXLFamily(),
}


def family_for(pipeline_class_name: str):
    if pipeline_class_name not in FAMILIES:
        raise ValueError(
            f"pipeline class {pipeline_class_name!r} is not supported for training yet; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[pipeline_class_name]
