"""Generation on fixed seeds: every (prompt, seed) gets the same initial noise in every model."""

from __future__ import annotations

import torch
from tqdm import tqdm


def initial_latents(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """x_T for each seed, drawn on the CPU so that it does not depend on the device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int = 25, guidance_scale: float = 5.0,
             eta: float = 0.0, batch_size: int = 16, latents: torch.Tensor | None = None,
             eta_seeds: list[int] | None = None, progress: bool = False, desc: str = "generate",
             num_frames: int | None = None) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W), for ``prompts[i]`` with initial noise from ``seeds[i]``;
    with ``num_frames`` (a text-to-video pipeline) videos (N, F, 3, H, W) from (C, F, h, w) noise.

    With ``eta > 0`` the DDIM step noise is drawn from per-image generators seeded by
    ``eta_seeds`` (default: ``seeds``), so two samples may share x_T and still differ.
    """
    from diffpo.models.families import family_of_pipeline

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    family = family_of_pipeline(pipe)  # UNet or flow transformer: x_T's shape and how the pipeline takes it
    denoiser = getattr(pipe, family.denoiser_attr)
    shape = family.pipeline_latent_shape(pipe, None, num_frames)
    video = {} if num_frames is None else {"num_frames": num_frames}
    if latents is None:
        latents = initial_latents(seeds, shape)
    eta_seeds = eta_seeds or seeds
    device = pipe.device if hasattr(pipe, "device") else torch.device("cpu")
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        stop = min(start + batch_size, len(prompts))
        generators = [torch.Generator().manual_seed(s) for s in eta_seeds[start:stop]]
        inputs = family.pipeline_inputs(pipe, latents[start:stop].to(device, denoiser.dtype), guidance_scale, eta)
        out = pipe(prompt=prompts[start:stop], num_inference_steps=num_inference_steps, generator=generators,
                   output_type="pt", **inputs, **video)
        images.append((out.images if num_frames is None else out.frames).float().cpu())
    return torch.cat(images).clamp(0, 1)


def to_pil(images: torch.Tensor):
    """(N, 3, H, W) in [0, 1] -> N PIL images; videos (N, F, 3, H, W) -> N lists of F frames."""
    from PIL import Image

    if images.ndim == 5:
        return [to_pil(video) for video in images]
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]
