"""Tiny flow-matching pipelines (SD3, FLUX.1) built in code, and the offline T5 tokenizer."""

import pytest
import torch

PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]


def test_t5_tokenizer_round_trips_and_covers_english(tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    from diffpo.models.tokenizer import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    text = "A photorealistic portrait of an old fisherman, golden hour, 35mm film!"
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # common words are single pieces, so a caption costs about one token per word
    assert tokenizer.convert_ids_to_tokens(tokenizer(PROMPTS[0]).input_ids)[:-1] == [
        "▁a", "▁red", "▁circle", "▁on", "▁a", "▁blue", "▁background"]
    tokenizer.save_pretrained(tmp_path)
    for cls in (T5TokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        assert len(loaded) == len(tokenizer)
        assert loaded(text).input_ids == ids
        assert loaded(PROMPTS, padding="max_length", max_length=16).input_ids == tokenizer(
            PROMPTS, padding="max_length", max_length=16).input_ids


def _pipeline_round_trip(cls, parts, tmp_path, **call):
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)

    def run(p):
        return p(PROMPTS, height=32, width=32, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="pt", **call).images

    images = run(pipe)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert not torch.equal(images[0], images[1])  # the prompt reaches the image
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin"))
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(loaded), images)
    return loaded


def test_tiny_sd3_pipeline_runs_saves_and_reloads(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from diffpo.models.tiny import build_tiny_sd3_components

    parts = build_tiny_sd3_components(seed=0)
    assert parts["vae"].config.latent_channels == 16 and parts["vae"].config.shift_factor != 0
    loaded = _pipeline_round_trip(StableDiffusion3Pipeline, parts, tmp_path, guidance_scale=5.0)
    assert loaded.scheduler.config.shift == 3.0 and not loaded.scheduler.config.use_dynamic_shifting
    assert type(loaded.text_encoder_3).__name__ == "T5EncoderModel"


def test_tiny_flux_pipeline_runs_saves_and_reloads(tmp_path):
    from diffusers import FluxPipeline

    from diffpo.models.tiny import build_tiny_flux_components

    parts = build_tiny_flux_components(seed=0)
    assert parts["transformer"].config.guidance_embeds
    loaded = _pipeline_round_trip(FluxPipeline, parts, tmp_path, guidance_scale=3.5)
    assert loaded.scheduler.config.use_dynamic_shifting
    assert loaded.vae.config.latent_channels == 16


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_flow_builders_are_seeded(family):
    from diffpo.models import tiny

    build = getattr(tiny, f"build_tiny_{family}_components")
    a, b, c = build(seed=0)["transformer"], build(seed=0)["transformer"], build(seed=1)["transformer"]
    first = next(iter(a.state_dict()))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict()), first
