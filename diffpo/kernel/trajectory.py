"""Sampled DDIM trajectories with per-step Gaussian log-probabilities (DDPO, Black et al. 2024;
D3PO, Yang et al. 2024), and re-scoring of stored transitions under another UNet.

A DDIM step with eta > 0 (eta = 1 is DDPM's posterior variance) is Gaussian:

    x_{t-1} ~ N(mu, sigma_t^2 I),  mu = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat,
    x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t),
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))       (DDIM, Song et al. 2021, Eq. 16)

and the recorded log-probability is the mean over latent dims of the Gaussian log-density (as
D3PO/DDPO compute it). Classifier-free guidance is applied inside eps_hat before the step.

Because mu is linear in eps_hat (mu = c1 x_t + c2 eps_hat), the log-probability of a stored step
depends on the model only through ||eps* - eps_hat||^2 with the implied target noise
eps* = (x_{t-1} - c1 x_t) / c2; so log p_theta - log p_ref = -(c2^2 / (2 sigma^2)) (e_theta - e_ref),
with e the shared kernel's per-sample error against eps* (``implied_logprob_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffpo.kernel.denoising import per_sample_error

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class StepCoefficients:
    """Per-sample coefficients of one DDIM step t -> prev_t, shaped to broadcast over latents."""

    alpha_t: torch.Tensor
    alpha_prev: torch.Tensor
    sigma: torch.Tensor
    c1: torch.Tensor  # mu = c1 * x_t + c2 * eps_hat
    c2: torch.Tensor


def step_coefficients(scheduler, timesteps: torch.Tensor, prev_timesteps: torch.Tensor, eta: float, ndim: int) -> StepCoefficients:
    """DDIM coefficients for (B,) timesteps; prev < 0 uses the scheduler's final alpha."""
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    shape = (-1,) + (1,) * (ndim - 1)
    a_t = alphas[timesteps.cpu()].view(shape)
    a_prev = torch.where(prev_timesteps.cpu() >= 0, alphas[prev_timesteps.clamp(min=0).cpu()], final).view(shape)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    c1 = a_prev.sqrt() / a_t.sqrt()
    c2 = (1 - a_prev - sigma**2).clamp(min=0).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    return StepCoefficients(*(v.float() for v in (a_t, a_prev, sigma, c1, c2)))


def epsilon_from_prediction(prediction: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise estimate eps_hat from the UNet output (epsilon or v-prediction)."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return alpha_t.sqrt() * prediction + (1 - alpha_t).sqrt() * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: use 'epsilon' or 'v_prediction'")


def gaussian_logprob(prev_sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of log N(prev; mean, sigma^2), in fp32 -> (B,)."""
    prev, mean = prev_sample.float(), mean.float()
    sigma = sigma.float().expand_as(prev)
    log_density = -((prev - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return log_density.reshape(prev.shape[0], -1).mean(dim=1)


def ddim_mean(coef: StepCoefficients, sample: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The DDIM step's mean mu = c1 x_t + c2 eps_hat (the whole step when eta = 0)."""
    return coef.c1.to(sample) * sample + coef.c2.to(sample) * eps


def ddim_step(coef: StepCoefficients, sample: torch.Tensor, eps: torch.Tensor, prev_sample: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step: (x_{t-1}, its log-probability (B,)). With ``prev_sample`` given, the step is
    not drawn but scored (re-scoring a stored transition)."""
    mean = ddim_mean(coef, sample, eps)
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, dtype=torch.float32).to(sample)
        prev_sample = mean + coef.sigma.to(sample) * noise
    return prev_sample, gaussian_logprob(prev_sample, mean, coef.sigma.to(sample.device))


def guided(denoise: Denoiser, sample: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None, guidance: float) -> torch.Tensor:
    """The model output with classifier-free guidance: u + g (c - u), from one batched forward."""
    return guided_and_conditional(denoise, sample, t, cond, uncond, guidance)[0]


def guided_and_conditional(denoise: Denoiser, sample: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None,
                           guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(u + g (c - u), c): the guided output that steps the sampler and the conditional output c
    that a model trained on the caption alone is compared with; one batched forward."""
    if uncond is None or guidance == 1.0:
        out = denoise(sample, t, cond)
        return out, out
    both = _cat_conditioning(uncond, cond)
    out_u, out_c = denoise(torch.cat([sample, sample]), torch.cat([t, t]), both).chunk(2)
    return out_u + guidance * (out_c - out_u), out_c


def _cat_conditioning(a: dict, b: dict) -> dict:
    out = {}
    for key in a:
        if isinstance(a[key], dict):
            out[key] = _cat_conditioning(a[key], b[key])
        else:
            out[key] = torch.cat([a[key], b[key]])
    return out


@dataclass
class Trajectory:
    """A sampled trajectory: latents (T+1, B, ...) from x_T to x_0, timesteps (T,) and
    prev_timesteps (T,), and the per-step log-probabilities (T, B) of the taken steps."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    eta: float

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def sampling_timesteps(scheduler, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM timesteps and their predecessors (the last predecessor is -1: the final alpha)."""
    scheduler.set_timesteps(num_inference_steps)
    steps = scheduler.timesteps.clone().long()
    ratio = scheduler.config.num_train_timesteps // num_inference_steps
    return steps, steps - ratio


@torch.no_grad()
def sample_trajectory(denoise: Denoiser, scheduler, latents: torch.Tensor, cond: dict, uncond: dict | None = None,
                      guidance: float = 5.0, num_inference_steps: int = 20, eta: float = 1.0,
                      generator: torch.Generator | None = None, prediction_type: str = "epsilon") -> Trajectory:
    """Sample from x_T = ``latents`` recording every step's log-probability."""
    steps, prevs = sampling_timesteps(scheduler, num_inference_steps)
    sample, history, log_probs = latents, [latents], []
    for t, prev in zip(steps, prevs):
        tb = t.repeat(sample.shape[0]).to(sample.device)
        coef = step_coefficients(scheduler, tb, prev.repeat(sample.shape[0]), eta, sample.ndim)
        eps = epsilon_from_prediction(guided(denoise, sample, tb, cond, uncond, guidance), sample, coef.alpha_t.to(sample), prediction_type)
        sample, log_prob = ddim_step(coef, sample, eps, generator=generator)
        history.append(sample)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(history), steps, prevs, torch.stack(log_probs), eta)


def rescore_step(denoise: Denoiser, scheduler, trajectory: Trajectory, step: int, cond: dict, uncond: dict | None = None,
                 guidance: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Log-probability (B,) of the stored transition ``step`` under another model (with grad if enabled)."""
    b = trajectory.latents.shape[1]
    steps = torch.full((b,), step, dtype=torch.long)
    return rescore_transitions(denoise, scheduler, trajectory, steps, torch.arange(b), cond, uncond, guidance, prediction_type)


def rescore_transitions(denoise: Denoiser, scheduler, trajectory: Trajectory, steps: torch.Tensor, samples: torch.Tensor,
                        cond: dict, uncond: dict | None = None, guidance: float = 5.0,
                        prediction_type: str = "epsilon") -> torch.Tensor:
    """Log-probabilities (N,) of N stored transitions, transition n being step ``steps[n]`` of
    trajectory ``samples[n]`` (D3PO shuffles the step order per pair), from one batched forward."""
    steps, samples = steps.cpu(), samples.cpu()
    sample = trajectory.latents[steps, samples]
    prev_sample = trajectory.latents[steps + 1, samples]
    t = trajectory.timesteps[steps].to(sample.device)
    coef = step_coefficients(scheduler, t, trajectory.prev_timesteps[steps], trajectory.eta, sample.ndim)
    eps = epsilon_from_prediction(guided(denoise, sample, t, cond, uncond, guidance), sample, coef.alpha_t.to(sample), prediction_type)
    return ddim_step(coef, sample, eps, prev_sample=prev_sample)[1]


def implied_target(coef: StepCoefficients, sample: torch.Tensor, prev_sample: torch.Tensor) -> torch.Tensor:
    """eps* = (x_{t-1} - c1 x_t) / c2: the noise estimate that would make the stored step its mean."""
    return (prev_sample.float() - coef.c1.to(sample.device) * sample.float()) / coef.c2.to(sample.device)


def implied_logprob_ratio(eps_policy: torch.Tensor, eps_reference: torch.Tensor, coef: StepCoefficients,
                          sample: torch.Tensor, prev_sample: torch.Tensor) -> torch.Tensor:
    """log p_theta - log p_ref of a stored step through the shared kernel:
    -(c2^2 / (2 sigma^2)) * (e_theta - e_ref), e = per-sample error against the implied target."""
    target = implied_target(coef, sample, prev_sample)
    scale = (coef.c2**2 / (2 * coef.sigma**2)).reshape(-1).to(sample.device)
    return -scale * (per_sample_error(eps_policy, target) - per_sample_error(eps_reference, target))


@dataclass
class SolverTrajectory:
    """A DPM-Solver++ trajectory, per step: the latent the model saw (T, B, ...), its output there
    (T, B, ...; the conditional output, or the guided one that stepped the solver, as
    ``sample_dpm_solver``'s ``record`` says) and the timestep (T, B); plus the final x_0."""

    latents: torch.Tensor
    predictions: torch.Tensor
    timesteps: torch.Tensor
    final: torch.Tensor


def solver_timesteps(num_train_timesteps: int, num_steps: int, batch: int, jitter: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample timestep grids (T, B): ``num_steps`` evenly spaced steps from high to low noise;
    ``jitter`` shifts each sample's grid by its own offset in [0, stride) (Diffusion-DRO), so the
    stored online samples cover every training timestep, not only the grid's."""
    stride = num_train_timesteps // num_steps
    grid = (torch.arange(num_steps) * stride).flip(0)
    offset = torch.randint(0, stride, (1, batch), generator=generator) if jitter else torch.zeros(1, batch, dtype=torch.long)
    return grid[:, None] + offset


@torch.no_grad()
def sample_dpm_solver(denoise: Denoiser, scheduler, latents: torch.Tensor, cond: dict, timesteps: torch.Tensor,
                      uncond: dict | None = None, guidance: float = 1.0, prediction_type: str = "epsilon",
                      record: str = "conditional") -> SolverTrajectory:
    """Sample with DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, in diffusers' midpoint form) on per-sample
    grids ``timesteps`` (T, B), recording what the model saw and predicted at every step.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda = log(alpha/sigma), h = lambda_t - lambda_s:
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, with D = x0_s at the first step and
    D = x0_s + (x0_s - x0_prev) / (2 r), r = h_prev / h, after it; the last step goes to sigma = 0 at
    first order, which returns its x0 prediction (as diffusers' ``final_sigmas_type="zero"``).

    ``record="conditional"`` stores the model's conditional output c at each step even when the
    guided u + g (c - u) steps the solver; ``"guided"`` stores the guided one. Why it matters for
    Diffusion-DRO, whose policy is trained on c: a stored guided target pulls c towards u by
    (g - 1)(c - u) per step, away from the caption (docs/methods.md, Diffusion-DRO)."""
    if record not in ("conditional", "guided"):
        raise ValueError(f"record={record!r} is unknown: use 'conditional' or 'guided'")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not supported: use 'epsilon' or 'v_prediction'")
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    shape = (-1,) + (1,) * (latents.ndim - 1)

    def scales(t: torch.Tensor):
        a = alphas[t.cpu()].view(shape)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return alpha.to(latents.device), sigma.to(latents.device), (alpha.log() - sigma.log()).to(latents.device)

    sample, seen, predicted = latents, [], []
    previous_x0 = previous_lambda = None
    for i in range(timesteps.shape[0]):
        alpha_s, sigma_s, lambda_s = scales(timesteps[i])
        output, conditional = guided_and_conditional(denoise, sample, timesteps[i].to(sample.device), cond, uncond, guidance)
        seen.append(sample)
        predicted.append(conditional if record == "conditional" else output)
        x = sample.double()
        x0 = (x - sigma_s * output.double()) / alpha_s if prediction_type == "epsilon" else alpha_s * x - sigma_s * output.double()
        if i == timesteps.shape[0] - 1:
            new = x0
        else:
            alpha_t, sigma_t, lambda_t = scales(timesteps[i + 1])
            h = lambda_t - lambda_s
            direction = x0 if previous_x0 is None else x0 + (x0 - previous_x0) / (2 * (lambda_s - previous_lambda) / h)
            new = (sigma_t / sigma_s) * x - alpha_t * torch.expm1(-h) * direction
        previous_x0, previous_lambda = x0, lambda_s
        sample = new.to(latents.dtype)
    return SolverTrajectory(torch.stack(seen), torch.stack(predicted), timesteps, sample)
