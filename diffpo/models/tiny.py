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


# --- flow-matching transformers (SD3 / FLUX.1) ---

SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE config
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE config


def tiny_flow_vae_config(sample_size: int = 32, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> dict:
    """A 16-latent-channel ``AutoencoderKL`` config (SD3 / FLUX layout: no quant convs), factor 2.

    ``shift_factor`` and ``scaling_factor`` map latents to the denoiser's space as
    (z - shift) * scale; a trained VAE sets them from its latents' statistics."""
    return {**tiny_vae_config(sample_size), "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "scaling_factor": scaling_factor, "shift_factor": shift_factor}


def tiny_t5_encoder_config(tokenizer, d_model: int = 64, num_layers: int = 2) -> dict:
    """A small ``T5EncoderModel`` config matching ``tokenizer``'s vocabulary and special ids."""
    return dict(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_sd3_transformer_config(clip_width: int = 32, t5_width: int = 64, sample_size: int = 16) -> dict:
    """A small ``SD3Transformer2DModel`` config: 2 joint blocks over 1x1 patches of 16-channel latents.

    ``pooled_projection_dim`` is both CLIPs' pooled width; ``joint_attention_dim`` the T5 width (the
    pipeline zero-pads the concatenated CLIP states up to it, as SD3 pads 2048 up to 4096)."""
    return dict(
        sample_size=sample_size,
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_width,
        pos_embed_max_size=32,
    )


def tiny_flux_transformer_config(clip_width: int = 32, t5_width: int = 64) -> dict:
    """A small ``FluxTransformer2DModel`` config: one double and one single block, 2x2-packed
    16-channel latents (64 input channels), RoPE axes summing to the head width, guidance embedding
    (FLUX.1-dev layout)."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )


def _eval(*models) -> None:
    """Eval mode, as ``from_pretrained`` returns models: a pipeline built here then gives bit-identical
    outputs before and after a save/load round trip (train mode alone changes them by ~1e-6)."""
    for model in models:
        model.eval()


def build_tiny_sd3_components(seed: int = 0, num_merges: int = 2000, clip_width: int = 32, t5_width: int = 64,
                              transformer_config: dict | None = None, clip_max_length: int = 77,
                              t5_layers: int = 2, shift: float = 3.0) -> dict:
    """Randomly initialised components of a tiny ``StableDiffusion3Pipeline``: two CLIP text encoders
    with projections (pooled embeddings), a T5 encoder, an ``SD3Transformer2DModel``, a 16-channel
    VAE with SD3's shift and scaling factors, and SD3's flow-matching scheduler (static ``shift``).
    The keyword options size the bundled model; the defaults make a fast test fixture."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffpo.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer(num_merges, model_max_length=clip_max_length)
    tokenizer_3 = build_t5_tokenizer()
    torch.manual_seed(seed)
    clip_config = CLIPTextConfig(**tiny_text_encoder_config(tokenizer, hidden_size=clip_width))
    text_encoder = CLIPTextModelWithProjection(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    t5_config = T5Config(**tiny_t5_encoder_config(tokenizer_3, d_model=t5_width, num_layers=t5_layers))
    text_encoder_3 = T5EncoderModel(t5_config)
    transformer = SD3Transformer2DModel(**(transformer_config or tiny_sd3_transformer_config(clip_width, t5_width)))
    vae = AutoencoderKL(**tiny_flow_vae_config(**SD3_VAE_FACTORS))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    _eval(text_encoder, text_encoder_2, text_encoder_3, transformer, vae)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
                tokenizer_3=tokenizer_3, scheduler=scheduler, image_encoder=None, feature_extractor=None)


def build_tiny_flux_components(seed: int = 0, num_merges: int = 2000, clip_width: int = 32, t5_width: int = 64) -> dict:
    """Randomly initialised components of a tiny ``FluxPipeline``: a CLIP text encoder (pooled
    embedding only), a T5 encoder (the token sequence), a ``FluxTransformer2DModel`` with guidance
    embedding, a 16-channel VAE with FLUX's shift and scaling factors, and FLUX's scheduler with
    resolution-dependent dynamic shifting."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffpo.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer(num_merges)
    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(tokenizer, hidden_size=clip_width)))
    text_encoder_2 = T5EncoderModel(T5Config(**tiny_t5_encoder_config(tokenizer_2, d_model=t5_width)))
    transformer = FluxTransformer2DModel(**tiny_flux_transformer_config(clip_width, t5_width))
    vae = AutoencoderKL(**tiny_flow_vae_config(**FLUX_VAE_FACTORS))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    _eval(text_encoder, text_encoder_2, transformer, vae)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler,
                image_encoder=None, feature_extractor=None)


# --- Wan2.1 text-to-video (flow-matching video transformer) ---


def tiny_wan_transformer_config(text_width: int = 32) -> dict:
    """A small ``WanTransformer3DModel`` config: 2 blocks, 2 heads of 12, (1, 2, 2) patches of
    16-channel latents, cross-attention to ``text_width``-wide UMT5 states (Wan2.1 layout)."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=text_width,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan_vae_config(base_dim: int = 8) -> dict:
    """A small causal 3-D ``AutoencoderKLWan`` config with Wan2.1's factors: 8x spatial (three 2x
    downsamplings), 4x temporal (the second and third), 16 latent channels, and the Wan2.1 VAE's
    per-channel ``latents_mean`` / ``latents_std`` (the class defaults)."""
    return dict(base_dim=base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True])


def tiny_umt5_config(tokenizer, d_model: int = 32, num_layers: int = 2) -> dict:
    """A small ``UMT5EncoderModel`` config (per-layer relative attention biases, as UMT5-XXL)."""
    return {**tiny_t5_encoder_config(tokenizer, d_model=d_model, num_layers=num_layers), "num_heads": 2,
            "d_kv": d_model // 2}


def build_tiny_wan_components(seed: int = 0, text_width: int = 32, flow_shift: float = 3.0) -> dict:
    """Randomly initialised components of a tiny ``WanPipeline`` (Wan2.1 T2V layout): a UMT5 encoder with
    an offline T5 tokenizer, a ``WanTransformer3DModel``, a causal 3-D ``AutoencoderKLWan`` and the hub's
    scheduler format (``UniPCMultistepScheduler`` on flow sigmas with ``flow_shift``)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffpo.models.tokenizer import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(model_max_length=512)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(**tiny_umt5_config(tokenizer, d_model=text_width)))
    transformer = WanTransformer3DModel(**tiny_wan_transformer_config(text_width))
    vae = AutoencoderKLWan(**tiny_wan_vae_config())
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                        num_train_timesteps=1000)
    _eval(text_encoder, transformer, vae)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_wan22_vae_config(base_dim: int = 16) -> dict:
    """A small Wan2.2 (TI2V-5B layout) ``AutoencoderKLWan`` config: residual blocks, 48 latent channels,
    a 2x2 pixel patchify inside encode / decode (12 = 3 x 2 x 2 input channels), so 16x spatial and 4x
    temporal; per-channel statistics made up (the real ones come with the checkpoint)."""
    return dict(base_dim=base_dim, decoder_base_dim=base_dim, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                scale_factor_temporal=4, temperal_downsample=[False, True, True],
                latents_mean=[0.1 * (i % 5) for i in range(48)], latents_std=[1.0 + 0.1 * (i % 3) for i in range(48)])


def build_tiny_wan22_ti2v_components(seed: int = 0, text_width: int = 32, flow_shift: float = 5.0) -> dict:
    """Components of a tiny Wan2.2-TI2V-5B-layout ``WanPipeline`` used as text-to-video: the Wan2.2 VAE
    (48 channels, 16x) and a transformer on 48-channel latents; build the pipeline with
    ``WanPipeline(**parts, expand_timesteps=True)`` (one timestep per latent token, as TI2V-5B)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    parts = build_tiny_wan_components(seed, text_width, flow_shift)
    torch.manual_seed(seed + 1)
    parts["vae"] = AutoencoderKLWan(**tiny_wan22_vae_config())
    parts["transformer"] = WanTransformer3DModel(**{**tiny_wan_transformer_config(text_width), "in_channels": 48,
                                                    "out_channels": 48})
    _eval(parts["vae"], parts["transformer"])
    return parts
