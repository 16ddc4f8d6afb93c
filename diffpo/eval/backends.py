"""The diffusers text-to-image (and text-to-video) generation backend and the model entries it resolves: a base model
(hub id, local folder or ``tiny``), optionally with a LoRA, a full fine-tuned UNet, or a diffpo run
dir (``final/`` with a LoRA or ``unet/``, ``final/diffpo.json`` naming ``base_model``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffpo.eval.config import EvalModelConfig, SamplingConfig

SCHEDULER_CLASSES = {  # name -> (diffusers class, config changes)
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),  # SD3 / FLUX: Euler steps of the flow ODE
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def make_scheduler(name: str, base_config):
    """Scheduler ``name`` (a key of SCHEDULER_CLASSES) built from a model's scheduler config."""
    import diffusers

    class_name, changes = SCHEDULER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(base_config, **changes)


@dataclass
class ResolvedModel:
    """Where a model entry's weights are: checked before anything is generated."""

    base: str
    lora: str | None = None  # a folder with LORA_WEIGHT_NAME, a .safetensors file, or a hub id
    unet: str | None = None
    unet_subfolder: str | None = None


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists() or path.count("/") != 1


def resolve_model(entry: EvalModelConfig) -> ResolvedModel:
    """Check that local paths exist and read a run dir's ``final/diffpo.json``; hub ids pass through."""
    from diffpo.models.loading import resolve_source

    where = f"model {entry.name!r}"
    if entry.run_dir is not None:
        final = Path(entry.run_dir).expanduser() / "final"
        meta_file = final / "diffpo.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{where}: run_dir {entry.run_dir!r} has no final/diffpo.json: pass a finished diffpo run")
        meta = json.loads(meta_file.read_text())
        base = resolve_source(meta.get("base_model") or entry.pretrained)
        if (final / LORA_WEIGHT_NAME).is_file():
            return ResolvedModel(base, lora=str(final))
        for folder in ("unet", "transformer"):  # a full fine-tune: the family's denoiser folder
            if (final / folder / "config.json").is_file():
                return ResolvedModel(base, unet=str(final / folder))
        raise FileNotFoundError(f"{where}: {final} holds neither {LORA_WEIGHT_NAME} nor unet/ (transformer/)")
    try:
        base = resolve_source(entry.pretrained)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{where}: {error}") from None
    if entry.lora is not None:
        lora = Path(entry.lora).expanduser()
        if lora.is_dir() and not (lora / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"{where}: lora folder {entry.lora!r} has no {LORA_WEIGHT_NAME}")
        if not lora.exists() and _is_local(entry.lora):
            raise FileNotFoundError(f"{where}: lora {entry.lora!r} not found (a folder with {LORA_WEIGHT_NAME}, a file, or a hub id)")
        return ResolvedModel(base, lora=str(lora) if lora.exists() else entry.lora)
    if entry.unet is not None:
        unet = Path(entry.unet).expanduser()
        if unet.exists():
            if (unet / "config.json").is_file():
                return ResolvedModel(base, unet=str(unet))
            if (unet / "unet" / "config.json").is_file():
                return ResolvedModel(base, unet=str(unet), unet_subfolder="unet")
            raise FileNotFoundError(f"{where}: unet folder {entry.unet!r} holds no config.json (nor unet/config.json)")
        if _is_local(entry.unet):
            raise FileNotFoundError(f"{where}: unet {entry.unet!r} not found (a UNet folder or a hub id)")
        return ResolvedModel(base, unet=entry.unet, unet_subfolder=entry.unet_subfolder)
    return ResolvedModel(base)


class DiffusersBackend:
    """Text-to-image sampling with a diffusers pipeline. Each sample has its own CPU generator:
    x_T is its first draw and any step noise (eta, ancestral samplers) continues from it, so a
    sample does not depend on the batch it lands in or on the device."""

    def __init__(self, entry: EvalModelConfig, sampling: SamplingConfig, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, resolved: ResolvedModel | None = None):
        from diffpo.models.loading import load_stack

        resolved = resolved or resolve_model(entry)
        stack = load_stack(resolved.base, entry.revision, entry.variant, dtype=dtype, device=device)
        unet = None
        if resolved.unet is not None:
            unet = stack.family.unet_class.from_pretrained(resolved.unet, subfolder=resolved.unet_subfolder,
                                                           torch_dtype=dtype).to(device).eval()
        family = stack.family
        sampler = family.default_sampler if sampling.scheduler == "auto" else sampling.scheduler
        if family.sampler_names is not None and sampler not in family.sampler_names:
            raise ValueError(f"sampling.scheduler={sampler} does not sample {family.pipeline_class_name}: use "
                             f"{' or '.join(family.sampler_names)} (or auto)")
        if family.sampler_names is None and sampler == "flow-euler":
            raise ValueError(f"sampling.scheduler=flow-euler samples flow-matching models; {family.pipeline_class_name} "
                             "is a DDPM model: use ddim (or auto)")
        self.pipe = stack.pipeline(unet=unet, scheduler=make_scheduler(sampler, stack.noise_scheduler.config))
        self.family = family
        if resolved.lora is not None:
            lora = Path(resolved.lora)
            if lora.is_file():
                self.pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="diffpo_eval_lora")
            else:
                self.pipe.load_lora_weights(resolved.lora, adapter_name="diffpo_eval_lora")
            self.pipe.set_adapters(["diffpo_eval_lora"], adapter_weights=[entry.lora_scale])
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.sampling = sampling
        self.device = torch.device(device)
        self.resolution = sampling.resolution or stack.native_resolution
        if stack.is_video:  # the family's limits (Wan: 4k+1 frames, sides a multiple of VAE factor x patch)
            stack.check_clip(sampling.num_frames, self.resolution, "sampling")
        side = self.resolution // stack.vae_scale_factor
        self.num_frames = sampling.num_frames if stack.is_video else None  # video: (C, F, h, w) noise, (F, 3, H, W) clips
        self.latent_shape = family.pipeline_latent_shape(self.pipe, side, self.num_frames)
        self.info = {"pipeline": type(self.pipe).__name__, "scheduler": type(self.pipe.scheduler).__name__,
                     "base": resolved.base, "lora": resolved.lora, "unet": resolved.unet,
                     "resolution": self.resolution, "steps": sampling.steps, "guidance_scale": sampling.guidance_scale,
                     "eta": sampling.eta, **({"num_frames": self.num_frames} if self.num_frames else {})}

    def initial_noise(self, seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """x_T per seed (CPU draws, equal to ``generate.initial_latents``) and the generators, which
        continue from there for the step noise."""
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators]), generators

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        latents, generators = self.initial_noise(seeds)
        video = {} if self.num_frames is None else {"num_frames": self.num_frames}
        denoiser = getattr(self.pipe, self.family.denoiser_attr)
        inputs = {"height": self.resolution, "width": self.resolution,
                  **self.family.pipeline_inputs(self.pipe, latents.to(self.device, denoiser.dtype),
                                                self.sampling.guidance_scale, self.sampling.eta)}
        out = self.pipe(prompt=list(prompts), num_inference_steps=self.sampling.steps, generator=generators,
                        output_type="pt", **inputs, **video)
        return (out.images if self.num_frames is None else out.frames).float().cpu().clamp(0, 1)
