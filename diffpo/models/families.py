"""Model families: everything that differs between SD1.x/2.x, SDXL, the text-to-video stacks and the
flow-matching transformers (SD3/SD3.5, FLUX.1, Wan2.1 / Wan2.2) lives here and only here.

A family knows which components its pipeline folder holds, which UNet class it loads, how to turn
prompts into UNet conditioning (SDXL: two text encoders, penultimate hidden states, pooled
embeddings and real ``add_time_ids`` from original size / crop offset / target size), which of the
UNet's modules are temporal (video families: LoRA on spatial layers, motion modules or both), and
which pipeline class loads and saves its LoRA weights. It is chosen from ``model_index.json``'s
``_class_name``. Video latents are (B, C, F, H, W) throughout; the kernel never needs to know.

A family also builds the two things a trainer calls without knowing the model: the noise process
(``noise_process``: DDPM for the UNets, rectified flow for SD3 and FLUX) and the denoiser
(``denoiser``: (x_t, timesteps, conditioning) -> prediction, for a UNet or a transformer; FLUX's
2x2 packing, position ids and guidance embedding stay inside it). ``denoiser_attr`` names the
pipeline component that denoises (``unet`` / ``transformer``: its subfolder, its pipeline argument,
``final/<denoiser_attr>`` of a full fine-tune) and ``lora_layers_argument`` the keyword of the
pipeline's ``save_lora_weights``.
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


def _tokenize(tokenizer, prompts: list[str], device, max_length: int | None = None) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


class StableDiffusionFamily:
    """SD1.x / SD2.x: one CLIP text encoder, last hidden state, no added conditioning."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    unet_class_name = "UNet2DConditionModel"
    text_encoder_names = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    tokenizer_class_names: tuple[str, ...] = ("CLIPTokenizer",)  # one per text encoder, transformers classes
    denoiser_attr = "unet"  # the pipeline component that denoises (and its folder)
    lora_layers_argument = "unet_lora_layers"  # the pipeline's save_lora_weights keyword for it
    training_scheduler_class_name = "DDPMScheduler"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # lora.target_modules=null: the attention projections
    cache_text_dtype: str | None = None  # the text embeddings' cache dtype when cache.text_dtype=auto (None: cache.dtype)
    takes_guidance = False  # a guidance-embedding value goes into every forward (FLUX.1-dev: model.guidance)
    max_sequence_length: int | None = None  # T5 tokens per prompt (families with a T5 encoder)
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

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str], max_sequence_length: int | None = None) -> TextEmbeddings:
        encoder = text_encoders[0]
        hidden = encoder(_tokenize(tokenizers[0], prompts, encoder.device))[0]
        return TextEmbeddings(hidden)

    def unet_conditioning(self, text: TextEmbeddings, time_ids: torch.Tensor | None = None) -> dict:
        return {"encoder_hidden_states": text.hidden}

    @property
    def scheduler_class(self):
        import diffusers

        return getattr(diffusers, self.training_scheduler_class_name)

    def noise_process(self, scheduler, prediction_type: str, flow_sampling=None):
        """The DDPM forward process of ``scheduler`` with ``prediction_type`` targets."""
        from diffpo.kernel.noise_process import DDPMProcess

        if flow_sampling is not None:
            raise ValueError(f"model.timestep_sampling / loss_weighting / flow_shift apply to flow-matching models; "
                             f"{self.pipeline_class_name} is a DDPM model: leave them at their defaults")
        return DDPMProcess(scheduler, prediction_type)

    def denoiser(self, unet, guidance: float | None = None):
        """The kernel's ``Denoiser`` for a UNet: (x_t, t, conditioning) -> raw prediction. Video UNets
        take (B, C, F, H, W) latents; those that want their text per frame get it repeated here."""
        per_frame = text_per_frame(unet)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
            if per_frame:
                conditioning = repeat_text_per_frame(conditioning, noisy.shape[2])
            return unet(noisy, timesteps, **conditioning, return_dict=False)[0]

        return denoise

    def sampling_scheduler(self, training_scheduler):
        """The scheduler a pipeline built by diffpo samples with (DDIM for the DDPM UNets)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(training_scheduler.config)

    # ---- the VAE: class, scale factor, encoding, the denoiser's latent space, decoding ----------
    vae_class_name = "AutoencoderKL"

    @property
    def vae_class(self):
        import diffusers

        return getattr(diffusers, self.vae_class_name)

    def load_training_scheduler(self, source: str, revision: str | None = None):
        """The training scheduler from the pipeline folder's ``scheduler/`` config."""
        return self.scheduler_class.from_pretrained(source, subfolder="scheduler", revision=revision)

    def resolve(self, index: dict):
        """The family for a pipeline folder's ``model_index.json`` (variants of one pipeline class)."""
        return self

    def vae_scale_factor(self, vae) -> int:
        """Pixels per latent position along height and width."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def check_clip(self, stack, num_frames: int | None, resolution: int, section: str = "data") -> None:
        """Refuse a frame count or resolution the VAE and denoiser cannot take (one-line errors naming
        ``section``.num_frames / ``section``.resolution)."""

    @torch.no_grad()
    def encode_pixels(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] (N, 3, H, W) -> the VAE's latent distribution mean and std, fp32; videos
        (N, F, 3, H, W) are encoded frame by frame into (N, C, F, h, w) latents."""
        if pixels.ndim == 5:
            n, f = pixels.shape[:2]
            mean, std = self.encode_pixels(vae, pixels.flatten(0, 1))
            return (x.view(n, f, *x.shape[1:]).transpose(1, 2).contiguous() for x in (mean, std))
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def to_denoiser_space(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """A VAE latent sample z -> the denoiser's latents: (z - shift) * scale (the VAE config's factors)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> pixels in [0, 1] on the CPU: (N, 3, H, W), or (N, F, 3, H, W) from
        video latents (N, C, F, h, w), decoded frame by frame."""
        if latents.ndim == 5:
            n, f = latents.shape[0], latents.shape[2]
            frames = self.decode(vae, latents.transpose(1, 2).flatten(0, 1))
            return frames.view(n, f, *frames.shape[1:])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()

    def latent_channels(self, stack) -> int:
        return int(stack.unet.config.in_channels)

    def latent_frames(self, vae, num_frames: int) -> int:
        """Latent frames of a clip of ``num_frames`` frames (frame-by-frame VAEs: as many)."""
        return num_frames

    def latent_shape(self, stack, resolution: int, num_frames: int | None = None) -> tuple[int, ...]:
        """A training sample's denoiser latents: (C, h, w) for an image of side ``resolution``, (C, F', h, w)
        for a clip of ``num_frames`` frames (F' = ``latent_frames``: Wan's causal VAE keeps 1 + (F - 1) / 4)."""
        side = resolution // self.vae_scale_factor(stack.vae)
        channels = self.latent_channels(stack)
        if num_frames is None:
            return (channels, side, side)
        return (channels, self.latent_frames(stack.vae, num_frames), side, side)

    default_sampler = "ddim"  # sampling.scheduler=auto
    sampler_names: tuple[str, ...] | None = None  # the eval samplers this family takes (None: every DDPM-family one)

    def pipeline_latent_shape(self, pipe, side: int | None = None, num_frames: int | None = None) -> tuple[int, ...]:
        """x_T's shape (C, [F,] h, w) for ``pipe``; ``side``: latent height and width (None: native)."""
        unet = getattr(pipe, self.denoiser_attr)
        side = side or unet.config.sample_size
        channels = unet.config.in_channels
        return (channels, side, side) if num_frames is None else (channels, num_frames, side, side)

    def pipeline_inputs(self, pipe, latents: torch.Tensor, guidance_scale: float, eta: float) -> dict:
        """The keyword arguments of ``pipe(...)`` that start it from ``latents`` (N, C, [F,] h, w)."""
        return {"latents": latents, "guidance_scale": guidance_scale, "eta": eta}

    def native_resolution(self, stack) -> int:
        return int(stack.unet.config.sample_size) * stack.vae_scale_factor


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
    tokenizer_class_names = ("CLIPTokenizer", "CLIPTokenizer")

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str], max_sequence_length: int | None = None) -> TextEmbeddings:
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


class StableDiffusion3Family(StableDiffusionFamily):
    """SD3 / SD3.5 (Esser et al. 2024): an MMDiT ``SD3Transformer2DModel`` with joint attention over
    image and text tokens, trained by rectified flow with a static timestep shift (3.0).

    Text: CLIP-L and CLIP-G penultimate hidden states side by side (77 tokens, 768 + 1280), padded
    with zeros (or cut, as the pipeline's ``F.pad`` does) to T5's width and followed by T5-XXL's
    last hidden state (``max_sequence_length`` tokens): (N, 77 + L, 4096); pooled = CLIP-L and CLIP-G
    projections side by side (N, 2048). 16-channel latents with the VAE's shift and scaling factors."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    unet_class_name = "SD3Transformer2DModel"
    denoiser_attr = "transformer"
    lora_layers_argument = "transformer_lora_layers"
    training_scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    pipeline_extras = {"image_encoder": None, "feature_extractor": None}
    text_encoder_names = (
        ("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
        ("tokenizer_3", "text_encoder_3", "T5EncoderModel"),
    )
    tokenizer_class_names = ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")
    # joint attention: the image stream's projections and the text (context) stream's added ones
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    cache_text_dtype = "bf16"  # T5 states are (L, 4096) per prompt: bf16 halves the cache
    max_sequence_length = 256  # T5 tokens (the pipeline's default)
    latent_tokens = 1  # latent positions per image token for the dynamic shift (patching happens inside)

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str], max_sequence_length: int | None = None) -> TextEmbeddings:
        import torch.nn.functional as F

        clip_hidden, pooled = [], []
        for tokenizer, encoder in zip(tokenizers[:2], text_encoders[:2]):
            out = encoder(_tokenize(tokenizer, prompts, encoder.device), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = text_encoders[2]
        t5_hidden = t5(_tokenize(tokenizers[2], prompts, t5.device, max_sequence_length or self.max_sequence_length))[0]
        clip = torch.cat(clip_hidden, dim=-1).to(t5_hidden.dtype)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return TextEmbeddings(torch.cat([clip, t5_hidden], dim=-2), torch.cat(pooled, dim=-1).to(t5_hidden.dtype))

    def unet_conditioning(self, text: TextEmbeddings, time_ids: torch.Tensor | None = None) -> dict:
        return {"encoder_hidden_states": text.hidden, "pooled_projections": text.pooled}

    def noise_process(self, scheduler, prediction_type: str, flow_sampling=None):
        """Rectified flow with the scheduler config's shift (FLUX: its dynamic shift when set)."""
        from diffpo.kernel.noise_process import DynamicShift, FlowSampling, RectifiedFlowProcess

        config = scheduler.config
        dynamic = None
        if config.get("use_dynamic_shifting", False):
            dynamic = DynamicShift(config.get("base_shift", 0.5), config.get("max_shift", 1.15),
                                   config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096))
        return RectifiedFlowProcess(flow_sampling or FlowSampling(), config.get("shift", 1.0), dynamic,
                                    config.num_train_timesteps, self.latent_tokens)

    def denoiser(self, transformer, guidance: float | None = None):
        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
            return transformer(hidden_states=noisy, timestep=timesteps, **conditioning, return_dict=False)[0]

        return denoise

    def sampling_scheduler(self, training_scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(training_scheduler.config)

    def latent_channels(self, stack) -> int:
        return int(stack.vae.config.latent_channels)

    default_sampler = "flow-euler"
    sampler_names = ("flow-euler",)
    native_latent_side = 128  # FLUX has no sample_size in its config: the pipeline's default (1024 px)

    def pipeline_latent_shape(self, pipe, side: int | None = None, num_frames: int | None = None) -> tuple[int, ...]:
        if num_frames is not None:
            raise ValueError(f"{self.pipeline_class_name} is an image model: drop num_frames")
        config = getattr(pipe, self.denoiser_attr).config
        side = side or getattr(config, "sample_size", None) or self.native_latent_side
        return (int(pipe.vae.config.latent_channels), side, side)

    def pipeline_inputs(self, pipe, latents: torch.Tensor, guidance_scale: float, eta: float) -> dict:
        """Flow samplers are deterministic ODE steps: ``eta`` > 0 has no meaning there."""
        if eta:
            raise ValueError(f"sampling.eta={eta} adds DDIM step noise; {self.pipeline_class_name} samples a "
                             "deterministic flow ODE: set sampling.eta=0")
        h, w = latents.shape[-2:]
        return {"latents": self.packed(latents), "guidance_scale": guidance_scale,
                "height": h * pipe.vae_scale_factor, "width": w * pipe.vae_scale_factor}

    def packed(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the pipeline takes them (SD3: as they are)."""
        return latents

    def native_resolution(self, stack) -> int:
        return int(getattr(stack.unet.config, "sample_size", None) or 128) * stack.vae_scale_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patching: (B, C, H, W) -> (B, H/2 · W/2, 4C) tokens, row-major over patches, each
    token's features channel-major over its 2x2 patch (as ``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents must have even height and width, got {h}x{w}: use a resolution divisible by "
                         "16 (the VAE factor 8 times the 2x2 patch)")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: (B, h/2 · w/2, 4C) -> (B, C, h, w) for latent size h x w."""
    b, _, features = tokens.shape
    c = features // 4
    patches = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's RoPE position ids of the packed image tokens, (h/2 · w/2, 3): (0, row, column)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device, dtype)


class FluxFamily(StableDiffusion3Family):
    """FLUX.1 (Black Forest Labs 2024): ``FluxTransformer2DModel`` (double-stream joint-attention
    blocks, then single-stream blocks) on 2x2-packed 16-channel latents with RoPE position ids,
    rectified flow with a resolution-dependent (dynamic) shift.

    Text: CLIP-L's pooled output (N, 768) and T5-XXL's last hidden state (N, L, 4096), L =
    ``max_sequence_length`` (512 for dev, 256 for schnell). The guidance-distilled models (dev) take
    the guidance value as an input embedding: ``model.guidance`` (diffusers' FLUX training default
    3.5) is passed with every training forward."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    unet_class_name = "FluxTransformer2DModel"
    text_encoder_names = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "T5EncoderModel"),
    )
    tokenizer_class_names = ("CLIPTokenizer", "T5TokenizerFast")
    # the double-stream blocks' joint attention (image and context projections); the single-stream
    # blocks' attention has q/k/v only (its output goes through proj_out with the MLP)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    max_sequence_length = 512
    latent_tokens = 4  # one image token per 2x2 latent patch
    default_guidance = 3.5
    takes_guidance = True

    def packed(self, latents: torch.Tensor) -> torch.Tensor:
        """FluxPipeline takes its initial latents packed; ``guidance_scale`` is then the embedded
        guidance of FLUX.1-dev (true classifier-free guidance is its ``true_cfg_scale``)."""
        return pack_latents(latents)

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str], max_sequence_length: int | None = None) -> TextEmbeddings:
        clip, t5 = text_encoders
        pooled = clip(_tokenize(tokenizers[0], prompts, clip.device), output_hidden_states=False).pooler_output
        hidden = t5(_tokenize(tokenizers[1], prompts, t5.device, max_sequence_length or self.max_sequence_length))[0]
        return TextEmbeddings(hidden, pooled.to(hidden.dtype))

    def denoiser(self, transformer, guidance: float | None = None):
        """Packs (B, 16, h, w) latents into tokens, adds position ids and, for guidance-distilled
        transformers, the guidance value; unpacks the velocity back to (B, 16, h, w). FLUX's
        transformer takes timesteps / 1000 (it scales them back itself, as ``FluxPipeline`` passes them)."""
        config = getattr(transformer, "module", transformer).config
        embeds_guidance = bool(config.guidance_embeds)
        scale = self.default_guidance if guidance is None else guidance

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
            b, _, h, w = noisy.shape
            text = conditioning["encoder_hidden_states"]
            out = transformer(
                hidden_states=pack_latents(noisy),
                timestep=timesteps / 1000,  # the transformer casts it to its own dtype
                guidance=torch.full((b,), scale, device=noisy.device, dtype=noisy.dtype) if embeds_guidance else None,
                pooled_projections=conditioning["pooled_projections"],
                encoder_hidden_states=text,
                txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                img_ids=latent_image_ids(h, w, noisy.device, noisy.dtype),
                return_dict=False,
            )[0]
            return unpack_latents(out, h, w)

        return denoise


def wan_prompt(text: str) -> str:
    """A prompt cleaned as ``WanPipeline`` cleans it before tokenizing (ftfy when installed, HTML
    entities, whitespace runs): training and sampling then see the same token ids."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


class WanFamily(StableDiffusion3Family):
    """Wan2.1 / Wan2.2 text-to-video (Wan Team 2025): a ``WanTransformer3DModel`` (self-attention over
    (1, 2, 2) patches of 5-D latents with 3-D RoPE, cross-attention to the text, timestep modulation)
    trained by rectified flow with a static shift, over the causal 3-D ``AutoencoderKLWan``.

    * Text: UMT5-XXL's last hidden state with the attention mask, every position past the prompt's
      tokens set to zero, ``max_sequence_length`` (512, the pipeline's default) rows (N, L, 4096).
    * Latents: the VAE encodes a whole clip at once (causally: the first frame alone, then 4 frames per
      latent frame), so F = 4k + 1 frames give (C, k + 1, H/8, W/8) latents; the denoiser's latents are
      (z - mu_c) / sigma_c with the per-channel ``latents_mean`` / ``latents_std`` of the VAE config.
    * Sizes: height and width a multiple of the spatial factor times the patch (8 x 2 = 16).
    * The hub's scheduler folder holds a ``UniPCMultistepScheduler`` with ``flow_shift`` (3.0 for
      480p, 5.0 for 720p); training draws sigma with that shift, sampling uses flow Euler steps.
    * Wan2.2 TI2V-5B (``expand_timesteps`` in model_index.json): one timestep per latent token, as
      its pipeline passes them. Wan2.2 A14B's two experts (``transformer_2``, ``boundary_ratio``) are
      refused: diffpo trains one denoiser per run."""

    name = "wan"
    pipeline_class_name = "WanPipeline"
    unet_class_name = "WanTransformer3DModel"
    vae_class_name = "AutoencoderKLWan"
    text_encoder_names = (("tokenizer", "text_encoder", "UMT5EncoderModel"),)
    tokenizer_class_names = ("AutoTokenizer",)
    # self-attention (attn1) and cross-attention (attn2) projections of every block; the feed-forward
    # (ffn.net.0.proj, ffn.net.2) is opt-in through lora.target_modules
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    max_sequence_length = 512  # WanPipeline.__call__'s default
    pipeline_extras = {"transformer_2": None}
    video = True
    expand_timesteps = False
    native_side = 480  # WanPipeline's default height (its default width, 832, is not square)

    def resolve(self, index: dict):
        if index.get("transformer_2") and index["transformer_2"][0] is not None:
            raise ValueError("this Wan2.2 pipeline has two experts (transformer, transformer_2 with boundary_ratio): "
                             "diffpo trains one denoiser per run; use Wan2.1-T2V or Wan2.2-TI2V-5B")
        return WAN_EXPANDED if index.get("expand_timesteps") else self

    def load_training_scheduler(self, source: str, revision: str | None = None):
        """Flow-matching Euler with the folder's shift (UniPC's ``flow_shift``, or a flow scheduler's ``shift``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", revision=revision)
        shift = config.get("flow_shift") or config.get("shift") or 1.0
        if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler" and not config.get("use_flow_sigmas", True):
            raise ValueError(f"{source}'s scheduler ({config.get('_class_name')}) does not use flow sigmas: it is "
                             "not a flow-matching Wan checkpoint")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=shift)

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str], max_sequence_length: int | None = None) -> TextEmbeddings:
        encoder, length = text_encoders[0], max_sequence_length or self.max_sequence_length
        tokens = tokenizers[0]([wan_prompt(p) for p in prompts], padding="max_length", max_length=length,
                               truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(tokens.input_ids.to(encoder.device), mask).last_hidden_state
        return TextEmbeddings(hidden * mask[..., None].to(hidden.dtype))  # zeros past each prompt, as the pipeline

    def unet_conditioning(self, text: TextEmbeddings, time_ids: torch.Tensor | None = None) -> dict:
        return {"encoder_hidden_states": text.hidden}

    def denoiser(self, transformer, guidance: float | None = None):
        """(B, C, F, h, w) latents and sigma·1000 timesteps, as ``WanPipeline`` calls the transformer."""
        config = getattr(transformer, "module", transformer).config
        patch = config.patch_size

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
            if self.expand_timesteps:  # Wan2.2 TI2V: one (equal) timestep per latent token
                tokens = noisy.shape[2] // patch[0] * (noisy.shape[3] // patch[1]) * (noisy.shape[4] // patch[2])
                timesteps = timesteps[:, None].expand(-1, tokens)
            return transformer(hidden_states=noisy, timestep=timesteps, **conditioning, return_dict=False)[0]

        return denoise

    def latent_channels(self, stack) -> int:
        return int(stack.vae.config.z_dim)

    def vae_scale_factor(self, vae) -> int:
        return int(vae.config.scale_factor_spatial or 2 ** len(vae.config.temperal_downsample))

    def temporal_factor(self, vae) -> int:
        return int(vae.config.scale_factor_temporal or 2 ** sum(vae.config.temperal_downsample))

    def latent_frames(self, vae, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_factor(vae) + 1

    def check_clip(self, stack, num_frames: int | None, resolution: int, section: str = "data") -> None:
        self.check_frames(stack.vae, num_frames, f"{section}.num_frames")
        multiple = self.vae_scale_factor(stack.vae) * max(getattr(stack.unet, "module", stack.unet).config.patch_size[1:])
        if resolution % multiple:
            raise ValueError(f"{section}.resolution={resolution} is not a multiple of {multiple} (the Wan VAE's factor "
                             f"{self.vae_scale_factor(stack.vae)} x the transformer's patch): use "
                             f"{max(multiple, round(resolution / multiple) * multiple)}")

    def check_frames(self, vae, num_frames: int | None, key: str = "num_frames") -> None:
        factor = self.temporal_factor(vae)
        if num_frames is None or num_frames < 1 or (num_frames - 1) % factor:
            ok = ", ".join(str(factor * k + 1) for k in range(4))
            nearest = max(1, round(((num_frames or 1) - 1) / factor)) * factor + 1
            raise ValueError(f"{key}={num_frames}: the Wan VAE takes {factor}k+1 frames ({ok}, ...): use {nearest}")

    @torch.no_grad()
    def encode_pixels(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips in [-1, 1] (N, F, 3, H, W) -> latent mean and std (N, C, (F-1)/4+1, H/8, W/8), fp32: the
        causal 3-D VAE encodes each clip whole (frames are not independent)."""
        if pixels.ndim != 5:
            raise ValueError(f"the Wan VAE encodes clips (N, F, 3, H, W), got {tuple(pixels.shape)}: set data.num_frames")
        self.check_frames(vae, pixels.shape[1], "frames per clip")
        dist = vae.encode(pixels.transpose(1, 2).to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _statistics(self, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape)
        return mean.to(like.device), std.to(like.device)

    def to_denoiser_space(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """(z - latents_mean_c) / latents_std_c per channel (``WanPipeline`` decodes by the inverse)."""
        mean, std = self._statistics(vae, latents)
        return ((latents.float() - mean) / std).to(latents.dtype)

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, f, h, w) denoiser latents -> clips (N, 4(f-1)+1, 3, H, W) in [0, 1] on the CPU."""
        mean, std = self._statistics(vae, latents)
        video = vae.decode((latents.float() * std + mean).to(vae.dtype)).sample
        return ((video.float() + 1) / 2).clamp(0, 1).transpose(1, 2).cpu()

    def pipeline_latent_shape(self, pipe, side: int | None = None, num_frames: int | None = None) -> tuple[int, ...]:
        if num_frames is None:
            raise ValueError("WanPipeline is a video model: give sampling.num_frames (4k+1)")
        self.check_frames(pipe.vae, num_frames, "sampling.num_frames")
        side = side or self.native_latent_side(pipe.transformer, pipe.vae)
        return (int(pipe.vae.config.z_dim), self.latent_frames(pipe.vae, num_frames), side, side)

    def pipeline_inputs(self, pipe, latents: torch.Tensor, guidance_scale: float, eta: float) -> dict:
        """``WanPipeline`` from 5-D ``latents``; its frame count is given with them (``num_frames``)."""
        if eta:
            raise ValueError(f"sampling.eta={eta} adds DDIM step noise; WanPipeline samples a deterministic flow ODE: "
                             "set sampling.eta=0")
        h, w = latents.shape[-2:]
        factor = self.vae_scale_factor(pipe.vae)
        return {"latents": latents, "guidance_scale": guidance_scale, "height": h * factor, "width": w * factor}

    def native_latent_side(self, transformer, vae) -> int:
        """The transformer config's ``sample_size`` (latent side) where a folder records one, as the
        bundled tiny model does (32 px clips); else the pipeline's default height over the VAE factor."""
        recorded = getattr(getattr(transformer, "module", transformer).config, "sample_size", None)
        return int(recorded) if recorded else self.native_side // self.vae_scale_factor(vae)

    def native_resolution(self, stack) -> int:
        return self.native_latent_side(stack.unet, stack.vae) * self.vae_scale_factor(stack.vae)


class Wan22TI2VFamily(WanFamily):
    """Wan2.2 TI2V-5B as a text-to-video model: the pipeline passes one timestep per latent token
    (``expand_timesteps``); its VAE (48 channels, 16x spatial) patchifies inside encode / decode."""

    name = "wan2.2-ti2v"
    expand_timesteps = True
    pipeline_extras = {"transformer_2": None, "expand_timesteps": True}
    native_side = 704  # the TI2V-5B pipeline's 720p (704 x 1280) height


WAN_EXPANDED = Wan22TI2VFamily()


FAMILIES = {
    "StableDiffusionPipeline": StableDiffusionFamily(),
    "StableDiffusionXLPipeline": StableDiffusionXLFamily(),
    "AnimateDiffPipeline": AnimateDiffFamily(),
    "TextToVideoSDPipeline": TextToVideoFamily(),
    "StableDiffusion3Pipeline": StableDiffusion3Family(),
    "FluxPipeline": FluxFamily(),
    "WanPipeline": WanFamily(),
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


def family_of_pipeline(pipe):
    """The family of a pipeline object (an unregistered pipeline class: the SD1.x UNet family)."""
    return FAMILIES.get(type(pipe).__name__, FAMILIES["StableDiffusionPipeline"])


def family_for(pipeline_class_name: str):
    if pipeline_class_name not in FAMILIES:
        raise ValueError(
            f"pipeline class {pipeline_class_name!r} is not supported for training yet; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[pipeline_class_name]
