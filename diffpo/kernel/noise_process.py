"""Forward noise processes: what x_t is, what the denoiser should predict, and how a pair's noise and
timestep are drawn. The model family picks the process (``diffpo.models.families``); the trainers
only call its four methods, so a loop never branches on DDPM versus rectified flow.

A process has

* ``draw(latents_w, generator) -> (noise, timesteps)``: one Gaussian noise tensor and one timestep per
  *pair* (winner and loser share both, Diffusion-DPO Eq. 14), drawn on the CPU (``PairStreams`` or one
  generator) so a seed gives the same numbers on every device and process count. Timesteps are in the
  units the denoiser takes (DDPM: integer steps 0..T-1; flow: sigma * num_train_timesteps, as the
  diffusers flow pipelines pass them);
* ``add_noise(latents, noise, timesteps) -> x_t``;
* ``target(latents, noise, timesteps) -> what the denoiser should output``;
* ``error_weights(timesteps) -> (B,) fp32 or None``: a per-sample weight on the squared error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from diffpo.kernel.denoising import PairStreams, pair_noise, prediction_target, to_device

TIMESTEP_SAMPLINGS = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like`` (images and video alike)."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class DDPMProcess:
    """The variance-preserving DDPM process of a diffusers ``DDPMScheduler`` (Ho et al. 2020, Eq. 4):
    x_t = sqrt(a_t)·x_0 + sqrt(1 - a_t)·eps, with an epsilon or v target (Salimans & Ho 2022, Sec. 4)."""

    def __init__(self, scheduler, prediction_type: str):
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def draw(self, latents_w: torch.Tensor, generator=None, timestep_range: tuple[int, int] | None = None):
        return pair_noise(latents_w, self.num_train_timesteps, generator, timestep_range)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return prediction_target(self.prediction_type, self.scheduler, latents, noise, timesteps)

    def error_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        return None

    def invert(self, denoise, latents: torch.Tensor, conditioning: dict, timesteps: torch.Tensor, num_steps: int,
               grid: str = "per_sample") -> torch.Tensor:
        """x~_t by DDIM ReNoise inversion of x_0 with ``denoise`` (SmPO, Lu et al. 2025, Sec. 4.2)."""
        from diffusers import DDIMScheduler

        from diffpo.kernel.inversion import invert_to_timesteps

        if self.prediction_type != "epsilon":
            raise ValueError("the inversion target is a noise: it needs an epsilon-prediction model")
        if not hasattr(self, "_inversion_scheduler"):
            self._inversion_scheduler = DDIMScheduler.from_config(self.scheduler.config)
        return invert_to_timesteps(denoise, self._inversion_scheduler, latents, conditioning, timesteps, num_steps, grid=grid)

    def inversion_target(self, noisy: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """tau = (x~_t - sqrt(a_t) x_0) / sqrt(1 - a_t): the noise that reaches x~_t in one jump."""
        from diffpo.kernel.inversion import inversion_target

        return inversion_target(noisy, latents, self.scheduler.alphas_cumprod[timesteps.cpu()])


@dataclass(frozen=True)
class FlowSampling:
    """How sigma is drawn during training (Esser et al. 2024, SD3, Sec. 3.1): ``logit_normal``
    (sigmoid of N(mean, std), Eq. 19), ``mode`` (mode sampling with heavy tails, ``mode_scale``,
    Eq. 20) or ``uniform``; ``loss_weighting`` of the per-sample error: ``none``, ``sigma_sqrt``
    (sigma^-2) or ``cosmap`` (2 / (pi (1 - 2 sigma + 2 sigma^2)), Eq. 21)."""

    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    shift: float | None = None  # None: the scheduler config's shift

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling {self.timestep_sampling!r} is unknown: use one of {', '.join(TIMESTEP_SAMPLINGS)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting {self.loss_weighting!r} is unknown: use one of {', '.join(LOSS_WEIGHTINGS)}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std={self.logit_std} must be positive")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"flow shift={self.shift} must be positive")


@dataclass(frozen=True)
class DynamicShift:
    """FLUX's resolution-dependent shift: mu grows linearly in the image token count from
    ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (diffusers'
    ``calculate_shift``), and sigma -> e^mu / (e^mu + 1/sigma - 1)."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def mu(self, seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * slope + self.base_shift - slope * self.base_seq_len


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024, Eq. 23): sigma' = s·sigma / (1 + (s - 1)·sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def exponential_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's shift: sigma' = e^mu / (e^mu + 1/sigma - 1) (sigma = 0 stays 0)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


class RectifiedFlowProcess:
    """Rectified flow (Liu et al. 2023; Esser et al. 2024, Eq. 1 and 3): x_t = (1 - sigma)·x_0 +
    sigma·eps, and the denoiser predicts the velocity v = eps - x_0.

    sigma is drawn per pair from ``sampling`` and shifted: by FLUX's ``dynamic`` shift (mu from the
    image token count, ``latent_tokens`` latent positions per token: 4 for FLUX's 2x2 packing) when
    given, else by the static ``shift`` (SD3: 3.0). Timesteps are sigma·num_train_timesteps."""

    def __init__(self, sampling: FlowSampling = FlowSampling(), shift: float = 1.0, dynamic: DynamicShift | None = None,
                 num_train_timesteps: int = 1000, latent_tokens: int = 1):
        self.sampling = sampling
        self.shift = sampling.shift if sampling.shift is not None else float(shift)
        self.dynamic = dynamic
        self.num_train_timesteps = int(num_train_timesteps)
        self.latent_tokens = latent_tokens

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def shifted(self, u: torch.Tensor, latent_shape) -> torch.Tensor:
        """The training sigma of an unshifted draw ``u`` in (0, 1) for latents of ``latent_shape`` (C, [F,] h, w)."""
        if self.dynamic is not None:
            seq_len = math.prod(latent_shape[1:]) // self.latent_tokens
            return exponential_shift(u, self.dynamic.mu(seq_len))
        return static_shift(u, self.shift)

    def unshifted_draw(self, count: int, generator) -> torch.Tensor:
        """u in (0, 1) per pair, as diffusers' ``compute_density_for_timestep_sampling`` draws it."""
        s = self.sampling
        if s.timestep_sampling == "logit_normal":
            z = generator.randn(()) if isinstance(generator, PairStreams) else torch.randn(count, generator=generator)
            return torch.sigmoid(s.logit_mean + s.logit_std * z)
        u = generator.rand() if isinstance(generator, PairStreams) else torch.rand(count, generator=generator)
        if s.timestep_sampling == "mode":
            return 1 - u - s.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def draw(self, latents_w: torch.Tensor, generator=None, timestep_range=None):
        if timestep_range is not None:
            raise ValueError("a timestep range is a DDPM-step window; flow models draw sigma from model.timestep_sampling")
        count = latents_w.shape[0]
        if isinstance(generator, PairStreams):
            if len(generator) != count:
                raise ValueError(f"{len(generator)} pair streams for a batch of {count} pairs")
            noise = generator.randn(latents_w.shape[1:])
        else:
            noise = torch.randn(latents_w.shape, generator=generator, dtype=torch.float32)
        sigmas = self.shifted(self.unshifted_draw(count, generator), latents_w.shape[1:])
        timesteps = sigmas * self.num_train_timesteps
        return to_device(noise, latents_w.device).to(latents_w.dtype), to_device(timesteps, latents_w.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = _expand(self.sigmas(timesteps).to(latents.device), latents)
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def invert(self, denoise, latents: torch.Tensor, conditioning: dict, timesteps: torch.Tensor, num_steps: int,
               grid: str = "per_sample") -> torch.Tensor:
        """x~_sigma by Euler inversion of the flow ODE with ReNoise iterations (SmPO on flow models)."""
        from diffpo.kernel.inversion import invert_flow_to_sigmas

        if grid != "per_sample":
            raise ValueError(f"inversion grid {grid!r} is the official SmPO code's DDIM grid; flow models invert on "
                             "each sample's own sigma grid: set objective.inversion_grid=per_sample")
        return invert_flow_to_sigmas(denoise, latents, conditioning, self.sigmas(timesteps), num_steps,
                                     num_train_timesteps=self.num_train_timesteps)

    def inversion_target(self, noisy: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = (x~_sigma - x_0) / sigma: the straight-path velocity through x_0 and the inverted x~."""
        from diffpo.kernel.inversion import flow_inversion_target

        return flow_inversion_target(noisy, latents, self.sigmas(timesteps))

    def error_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        sigma = self.sigmas(timesteps)
        if self.sampling.loss_weighting == "sigma_sqrt":
            return sigma.pow(-2.0)
        if self.sampling.loss_weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
        return None
