"""Tiny diffusion components, built in code: the bundled models' architectures and test fixtures.

They are real diffusers/transformers classes with small configs, so every code path that loads,
trains or exports them is the one used for SD1.5-sized weights.
"""

from __future__ import annotations


def tiny_unet_config(cross_attention_dim: int = 64, sample_size: int = 16) -> dict:
    """A ~2.5 M-parameter ``UNet2DConditionModel`` config, cross-attention at 8x8 and 4x4."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae_config(sample_size: int = 32) -> dict:
    """A 0.66 M-parameter ``AutoencoderKL`` config with a downsampling factor of 2."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
    )


def tiny_text_encoder_config(tokenizer, hidden_size: int = 64) -> dict:
    """A 2-layer ``CLIPTextModel`` config matching ``tokenizer``'s vocabulary and special ids."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sd_components(seed: int = 0, num_merges: int = 6000) -> dict:
    """Randomly initialised components of a tiny ``StableDiffusionPipeline`` (SD1.x layout)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffpo.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(num_merges)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(tokenizer)))
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def build_tiny_sdxl_components(seed: int = 0, num_merges: int = 2000) -> dict:
    """Randomly initialised components of a tiny ``StableDiffusionXLPipeline``: two text encoders
    (the second with a projection giving pooled embeddings) and a UNet with text-time conditioning."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffpo.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(num_merges)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(tokenizer, hidden_size=32)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_encoder_config(tokenizer, hidden_size=32)))
    time_dim = 8
    unet = UNet2DConditionModel(
        **{**tiny_unet_config(cross_attention_dim=64), "block_out_channels": (32, 64, 64)},
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,
    )
    vae = AutoencoderKL(**tiny_vae_config())
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, prediction_type="epsilon")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=None, feature_extractor=None)


def tiny_motion_adapter_config(block_out_channels=(32, 64, 96), max_frames: int = 16) -> dict:
    """A ``MotionAdapter`` config for a tiny UNet with one layer per block: one temporal
    transformer per down block and two per up block (the up blocks have layers + 1 resnets), no
    mid-block motion module (it would add 20% of the weights at the 4x4 level for little motion)."""
    return dict(
        block_out_channels=tuple(block_out_channels),
        motion_layers_per_block=1,
        motion_num_attention_heads=4,
        motion_norm_num_groups=32,
        motion_max_seq_length=max_frames,
        use_motion_mid_block=False,
    )


def motion_unet_from_image_unet(unet, adapter_config: dict | None = None):
    """An AnimateDiff ``UNetMotionModel``: ``unet``'s spatial weights plus new motion modules whose
    output projections start at zero, so that at initialisation every frame is denoised exactly
    as the image model would denoise it alone (AnimateDiff, Guo et al. 2024, Sec. 4.2)."""
    import torch
    from diffusers import MotionAdapter, UNetMotionModel

    config = adapter_config or tiny_motion_adapter_config(unet.config.block_out_channels)
    motion = UNetMotionModel.from_unet2d(unet, MotionAdapter(**config))
    with torch.no_grad():
        for name, module in motion.named_modules():
            if "motion_modules" in name and name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return motion


def build_tiny_animatediff_components(seed: int = 0, num_merges: int = 2000) -> dict:
    """Randomly initialised components of a tiny ``AnimateDiffPipeline`` (SD1.x layout + motion
    modules, saved inside the ``UNetMotionModel``; no separate ``motion_adapter`` folder). The
    motion modules are random throughout (as a trained adapter's), not the identity."""
    import torch
    from diffusers import MotionAdapter, UNetMotionModel

    parts = build_tiny_sd_components(seed=seed, num_merges=num_merges)
    torch.manual_seed(seed + 1)
    unet = UNetMotionModel.from_unet2d(parts.pop("unet"), MotionAdapter(**tiny_motion_adapter_config()))
    for key in ("safety_checker", "image_encoder", "feature_extractor"):
        parts.pop(key)
    return dict(parts, unet=unet, motion_adapter=None, feature_extractor=None, image_encoder=None)


def tiny_unet3d_config(cross_attention_dim: int = 64, sample_size: int = 16) -> dict:
    """A ~1.5 M-parameter ``UNet3DConditionModel`` config (ModelScope text-to-video layout)."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_tiny_text_to_video_components(seed: int = 0, num_merges: int = 2000) -> dict:
    """Randomly initialised components of a tiny ``TextToVideoSDPipeline`` (ModelScope / zeroscope)."""
    import torch
    from diffusers import UNet3DConditionModel

    parts = build_tiny_sd_components(seed=seed, num_merges=num_merges)
    torch.manual_seed(seed + 1)
    parts["unet"] = UNet3DConditionModel(**tiny_unet3d_config())
    for key in ("safety_checker", "image_encoder", "feature_extractor"):
        parts.pop(key)
    return parts
