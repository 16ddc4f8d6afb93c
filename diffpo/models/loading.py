"""Load a diffusion stack from a hub id, a local diffusers folder, or the bundled tiny model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffpo.models.families import TextEmbeddings, family_for
from diffpo.resources import assets_dir

BUNDLED = {"tiny": "tiny-sd-shapes", "tiny-video": "tiny-video-shapes", "tiny-flow": "tiny-flow-shapes",
           "tiny-wan": "tiny-wan-shapes"}


def resolve_source(pretrained: str) -> str:
    """``tiny`` -> the bundled model folder; a local folder must exist; else a hub id."""
    if pretrained in BUNDLED:
        path = assets_dir() / BUNDLED[pretrained]
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"the bundled model {pretrained!r} is missing at {path}: reinstall diffpo (pip install --force-reinstall diffpo)")
        return str(path)
    path = Path(pretrained).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json): pass the folder that holds it")
        return str(path)
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise FileNotFoundError(f"model path {pretrained!r} does not exist: pass a local diffusers folder or a hub id like 'org/name'")
    return pretrained


def read_model_index(source: str, revision: str | None = None) -> dict:
    local = Path(source) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source, revision=revision)
    except Exception as error:  # hub errors come in many classes; the message is what matters
        from diffpo.hub import unreachable

        raise OSError(unreachable("the model", source, error)) from None


@dataclass
class DiffusionStack:
    """The components a trainer needs, plus the family that knows how to use them.

    ``unet`` is the denoiser of any family: a UNet, or the transformer of SD3 / FLUX (the family's
    ``denoiser_attr`` says which pipeline component it is). ``noise_process`` is the forward process
    the trainers noise with (``diffpo.kernel.noise_process``), chosen by the family."""

    source: str
    family: object
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: object  # the training scheduler: DDPMScheduler, or FlowMatchEulerDiscreteScheduler
    prediction_type: str  # epsilon / v_prediction, or "flow" (velocity) for rectified-flow models
    revision: str | None = None
    extra: dict = field(default_factory=dict)
    noise_process: object = None
    guidance: float | None = None  # the guidance-embedding value of distilled flow models (FLUX.1-dev)
    max_sequence_length: int | None = None  # T5 tokens (None: the family's default)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent position along height and width (the family reads its VAE config)."""
        return self.family.vae_scale_factor(self.vae)

    @property
    def native_resolution(self) -> int:
        return self.family.native_resolution(self)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self)

    def latent_shape(self, resolution: int, num_frames: int | None = None) -> tuple[int, ...]:
        """x_T's shape for one sample: (C, h, w) of an image of side ``resolution``, (C, F', h, w) of a clip
        of ``num_frames`` frames (the family knows how many latent frames its VAE makes of them)."""
        return self.family.latent_shape(self, resolution, num_frames)

    def denoiser(self, module=None):
        """The kernel's ``Denoiser`` over ``module`` (default: this stack's): (x_t, t, conditioning) -> prediction."""
        return self.family.denoiser(self.unet if module is None else module, self.guidance)

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A VAE latent sample mean + std·eps, normalised as the denoiser expects (shift and scale, or
        Wan's per-channel mean and std)."""
        return self.family.to_denoiser_space(self.vae, mean + std * eps)

    @property
    def is_video(self) -> bool:
        return self.family.video

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] (N, 3, H, W) -> latent distribution mean and std, fp32; videos
        (N, F, 3, H, W) -> (N, C, F', h, w) latents (frame by frame, or whole clips by a 3-D VAE)."""
        return self.family.encode_pixels(self.vae, pixels)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> pixels in [0, 1] on the CPU: (N, 3, H, W), or (N, F, 3, H, W) from video
        latents (N, C, F', h, w)."""
        return self.family.decode(self.vae, latents)

    def check_clip(self, num_frames: int | None, resolution: int, section: str = "data") -> None:
        """Refuse a clip length or resolution this model's VAE and denoiser cannot take."""
        self.family.check_clip(self, num_frames, resolution, section)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEmbeddings:
        return self.family.encode_prompts(self.tokenizers, self.text_encoders, list(prompts), self.max_sequence_length)

    def load_unet(self, dtype=torch.float32):
        """A fresh copy of the base denoiser read from the source (for a frozen reference)."""
        if self.extra.get("motion_adapter"):
            return with_motion_adapter(self.source, self.extra["motion_adapter"], self.revision, dtype)
        return self.family.unet_class.from_pretrained(self.source, subfolder=self.family.denoiser_attr,
                                                      revision=self.revision, torch_dtype=dtype)

    def pipeline(self, unet=None, scheduler=None):
        """A diffusers pipeline over these components (optionally another denoiser/scheduler)."""
        parts = {self.family.denoiser_attr: unet or self.unet, "vae": self.vae,
                 "scheduler": scheduler or self.family.sampling_scheduler(self.noise_scheduler)}
        for (tok_name, enc_name, _), tok, enc in zip(self.family.text_encoder_names, self.tokenizers, self.text_encoders):
            parts[tok_name], parts[enc_name] = tok, enc
        parts.update(self.family.pipeline_extras)
        return self.family.pipeline_class(**parts)


def load_stack(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    prediction_type: str | None = None,
    vae: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    motion_adapter: str | None = None,
    flow_sampling=None,
    guidance: float | None = None,
    max_sequence_length: int | None = None,
) -> DiffusionStack:
    """Load the denoiser (UNet or transformer), VAE, text encoder(s), tokenizer(s) and the family's
    training scheduler and noise process.

    ``motion_adapter`` (AnimateDiff) turns an SD1.x model's UNet into a ``UNetMotionModel`` with
    that adapter's motion modules; the stack is then of the AnimateDiff family. ``flow_sampling``
    (``diffpo.kernel.noise_process.FlowSampling``): how flow models draw sigma during training;
    ``guidance``: the guidance-embedding value of distilled flow models; ``max_sequence_length``:
    T5 tokens per prompt."""
    import transformers

    source = resolve_source(pretrained)
    index = read_model_index(source, revision)
    family = family_for(index.get("_class_name", "")).resolve(index)
    flow = family.training_scheduler_class_name != "DDPMScheduler"
    if guidance is not None and not family.takes_guidance:
        raise ValueError(f"model.guidance={guidance} is the guidance embedding of distilled flow models (FLUX.1-dev); "
                         f"{index.get('_class_name')} has none: set model.guidance=null")
    if max_sequence_length is not None and family.max_sequence_length is None:
        raise ValueError(f"model.max_sequence_length={max_sequence_length} sets the T5 length; {index.get('_class_name')} "
                         "has no T5 encoder: set model.max_sequence_length=null")
    if flow and prediction_type is not None:
        raise ValueError(f"model.prediction_type={prediction_type} sets a DDPM target; {index.get('_class_name')} is a "
                         "flow-matching model (velocity target): set model.prediction_type=null")
    common = dict(revision=revision, variant=variant)
    if motion_adapter:
        if family.name != "sd":
            raise ValueError(f"model.motion_adapter adds AnimateDiff motion modules to an SD1.x UNet; {source} is a "
                             f"{index.get('_class_name')}: drop model.motion_adapter")
        family = family_for("AnimateDiffPipeline")
        unet = with_motion_adapter(source, motion_adapter, revision, dtype, variant)
    else:
        unet = family.unet_class.from_pretrained(source, subfolder=family.denoiser_attr, torch_dtype=dtype, **common)
    vae_model = (
        family.vae_class.from_pretrained(resolve_source(vae), torch_dtype=dtype)
        if vae
        else family.vae_class.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common)
    )
    tokenizers, encoders = [], []
    for (tok_name, enc_name, enc_class), tok_class in zip(family.text_encoder_names, family.tokenizer_class_names, strict=True):
        tokenizers.append(getattr(transformers, tok_class).from_pretrained(source, subfolder=tok_name, revision=revision))
        encoder_cls = getattr(transformers, enc_class)
        encoders.append(encoder_cls.from_pretrained(source, subfolder=enc_name, torch_dtype=dtype, **common))
    scheduler = family.load_training_scheduler(source, revision)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    resolved_prediction = "flow" if flow else scheduler.config.prediction_type
    for module in [unet, vae_model, *encoders]:
        module.to(device)
        module.requires_grad_(False)
        module.eval()
    return DiffusionStack(
        source=source,
        family=family,
        unet=unet,
        vae=vae_model,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler,
        prediction_type=resolved_prediction,
        revision=revision,
        extra={"motion_adapter": motion_adapter} if motion_adapter else {},
        noise_process=family.noise_process(scheduler, resolved_prediction, flow_sampling),
        guidance=guidance,
        max_sequence_length=max_sequence_length,
    )


def with_motion_adapter(source: str, adapter: str, revision: str | None, dtype: torch.dtype, variant: str | None = None):
    """An SD1.x UNet from ``source`` with the ``MotionAdapter`` ``adapter`` (hub id or folder): AnimateDiff."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, variant=variant, torch_dtype=dtype)
    path = Path(adapter).expanduser()
    motion = MotionAdapter.from_pretrained(str(path) if path.exists() else adapter, torch_dtype=dtype)
    return UNetMotionModel.from_unet2d(unet, motion).to(dtype)


def unet_denoiser(unet):
    """The kernel's ``Denoiser`` for a UNet of the DDPM families (tests and benchmarks on UNets);
    trainers take ``stack.denoiser(module)``, which covers transformers too."""
    from diffpo.models.families import StableDiffusionFamily

    return StableDiffusionFamily().denoiser(unet)
