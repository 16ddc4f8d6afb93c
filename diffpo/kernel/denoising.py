"""The shared denoising kernel: pure tensor functions, no I/O, no accelerate.

Every trainer in diffpo noises pairs, computes targets and per-sample errors here, so the
conventions of DESIGN.md hold in one place:

* winner and loser of a pair share one noise tensor and one timestep (Diffusion-DPO, Wallace et
  al. 2024, Eq. 14 evaluates both at the same x_t construction), including input-perturbation noise;
* the per-sample error is the mean over every non-batch dim of (target - prediction)^2, in fp32, so
  image (B, C, H, W) and video (B, C, F, H, W) latents go through the same code;
* the policy sees winners and losers as one concatenated batch [w_1..w_B, l_1..l_B], and the
  reference runs on that same batch under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

# A denoiser maps (noisy latents, timesteps, conditioning kwargs) to the model's raw prediction.
Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class NoisedPairs:
    """Winners then losers along the batch dim: (2B, ...) tensors, plus the (2B,) timesteps."""

    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    latents: torch.Tensor


# apart from the per-pair draws of diffpo.data.pairs: random crops [seed, epoch, index, 0], flips [..., 1]
PAIR_STREAM_TAG = 2


class PairStreams:
    """One CPU random stream per pair, seeded from (seed, epoch, the pair's dataset index).

    Every draw for a pair (latent sample, prompt dropout, noise, timestep) then depends on the pair
    alone, never on the batch it is in, the process it runs on or the accumulation step: 2
    processes x batch b draw exactly what 1 process x batch 2b (or batch b x 2 accumulation steps)
    draws, and a resumed run with another process count continues with the same numbers. Draws
    are (B, *shape) stacks of one draw per stream, always on the CPU (the same on every device)."""

    def __init__(self, seed: int, epoch: int, indices: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(np.random.SeedSequence(
            [seed, epoch, int(index), PAIR_STREAM_TAG]).generate_state(1, np.uint64)[0])) for index in indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])

    def rand(self) -> torch.Tensor:
        return torch.stack([torch.rand((), generator=g) for g in self.generators])

    def randint(self, low: int, high: int) -> torch.Tensor:
        return torch.stack([torch.randint(low, high, (), generator=g) for g in self.generators])


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor onto ``device`` without a host-device sync: through pinned memory and an
    asynchronous copy on CUDA (a plain ``.to`` from pageable memory waits for the stream)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def pair_noise(
    latents_w: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator | PairStreams | None = None,
    timestep_range: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian noise tensor (B, ...) and one timestep (B,) per pair, drawn on ``generator``
    (one generator for the batch, or ``PairStreams``: each pair from its own stream).

    Drawn on the CPU so that a seed gives the same numbers on every device and process count.
    """
    low, high = timestep_range or (0, num_train_timesteps)
    if isinstance(generator, PairStreams):
        if len(generator) != latents_w.shape[0]:
            raise ValueError(f"{len(generator)} pair streams for a batch of {latents_w.shape[0]} pairs")
        noise, timesteps = generator.randn(latents_w.shape[1:]), generator.randint(low, high)
    else:
        noise = torch.randn(latents_w.shape, generator=generator, dtype=torch.float32)
        timesteps = torch.randint(low, high, (latents_w.shape[0],), generator=generator)
    return to_device(noise, latents_w.device).to(latents_w.dtype), to_device(timesteps, latents_w.device)


def noise_pairs(
    process,
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    input_perturbation: float = 0.0,
    perturbation: torch.Tensor | None = None,
) -> NoisedPairs:
    """Noise winners and losers by ``process`` (``diffpo.kernel.noise_process``: DDPM or rectified
    flow) with the *same* ``noise`` and ``timesteps`` (each (B, ...)/(B,), from ``process.draw``).

    ``input_perturbation`` (Ning et al. 2023) adds ``gamma * perturbation`` to the noise that
    builds x_t but not to the target; the perturbation is shared by the pair as well.
    """
    if latents_w.shape != latents_l.shape:
        raise ValueError(f"winner latents {tuple(latents_w.shape)} and loser latents {tuple(latents_l.shape)} differ")
    if noise.shape != latents_w.shape or timesteps.shape != latents_w.shape[:1]:
        raise ValueError("noise must match the winner latents and timesteps must be (B,)")
    latents = torch.cat([latents_w, latents_l])
    noise2 = noise.repeat(2, *([1] * (noise.ndim - 1)))
    timesteps2 = timesteps.repeat(2)
    build_noise = noise2
    if input_perturbation:
        if perturbation is None:
            raise ValueError("input_perturbation > 0 needs a perturbation tensor")
        build_noise = noise2 + input_perturbation * perturbation.repeat(2, *([1] * (noise.ndim - 1)))
    noisy = process.add_noise(latents, build_noise, timesteps2)
    return NoisedPairs(noisy=noisy, noise=noise2, timesteps=timesteps2, latents=latents)


def prediction_target(
    prediction_type: str, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What a DDPM UNet should predict: the noise (``epsilon``) or v = sqrt(a)·eps - sqrt(1-a)·x0
    (the DDPM process's target; rectified flow's is in ``noise_process.RectifiedFlowProcess``)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"prediction_type {prediction_type!r} is not supported: use 'epsilon' or 'v_prediction' "
        "(set model.prediction_type or the scheduler config)"
    )


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """e = mean over every non-batch dim of (target - prediction)^2, computed in fp32 -> (B,);
    times ``weights`` (B,) when the noise process weights its loss (SD3's sigma_sqrt / cosmap)."""
    diff = target.float() - prediction.float()
    error = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
    return error if weights is None else error * weights.to(error.device, torch.float32)


@dataclass
class PairErrors:
    """Per-pair errors of policy and reference on winners (w) and losers (l), each (B,); the
    losers' entries are None when only the winners ran (SFT)."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor | None
    ref_w: torch.Tensor | None
    ref_l: torch.Tensor | None


def pair_errors(
    policy: Denoiser,
    reference: Denoiser | None,
    noised: NoisedPairs,
    conditioning: dict,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    winners_only: bool = False,
) -> PairErrors:
    """Errors of the policy (with grad) and the reference (no grad) from one forward each on the
    concatenated (2B, ...) batch; ``reference=None`` skips it (reference-free objectives, SFT).
    ``weights`` (2B,): the process's per-sample error weights. ``winners_only`` runs the policy on
    the winners' half alone (SFT: the losers would cost a forward and backward for nothing)."""
    if winners_only:
        if reference is not None:
            raise ValueError("winners_only runs the policy alone: pass reference=None")
        half = noised.noisy.shape[0] // 2
        conditioning = {key: _first_half(value, half) for key, value in conditioning.items()}
        prediction = policy(noised.noisy[:half], noised.timesteps[:half], conditioning)
        error = per_sample_error(prediction, target[:half], None if weights is None else weights[:half])
        return PairErrors(policy_w=error, policy_l=None, ref_w=None, ref_l=None)
    return batch_errors(policy, reference, noised.noisy, noised.timesteps, conditioning, target, weights)


def _first_half(value, half: int):
    """The winners' rows of a conditioning entry: tensors and dicts of tensors (SDXL's added_cond_kwargs)."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 2 * half:
        return value[:half]
    if isinstance(value, dict):
        return {key: _first_half(inner, half) for key, inner in value.items()}
    return value


def batch_errors(
    policy: Denoiser,
    reference: Denoiser | None,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: dict,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> PairErrors:
    """``pair_errors`` on any concatenated [first half, second half] batch of noisy latents and
    targets (Diffusion-DRO: noised experts, then stored online samples against their own targets)."""
    prediction = policy(noisy, timesteps, conditioning)
    policy_w, policy_l = per_sample_error(prediction, target, weights).chunk(2)
    ref_w = ref_l = None
    if reference is not None:
        with torch.no_grad():
            ref_prediction = reference(noisy, timesteps, conditioning)
        ref_w, ref_l = per_sample_error(ref_prediction, target, weights).chunk(2)
    return PairErrors(policy_w=policy_w, policy_l=policy_l, ref_w=ref_w, ref_l=ref_l)
