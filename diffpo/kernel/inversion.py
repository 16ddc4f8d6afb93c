"""DDIM inversion and ReNoise inversion of clean latents into a diffusion trajectory.

A deterministic DDIM step (eta = 0, Song et al. 2021, Eq. 12) from x_t to x_{t_prev} is

    x_{t_prev} = c1 x_t + c2 eps,  c1 = sqrt(a_prev / a_t),  c2 = sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t),

so with eps known its exact inverse is x_t = (x_{t_prev} - c2 eps) / c1, i.e.

    x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps,  x0_hat = (x_{t_prev} - sqrt(1 - a_prev) eps) / sqrt(a_prev).

eps = eps(x_t, t) is unknown while x_t is being computed. Plain DDIM inversion uses eps(x_{t_prev}, t).
ReNoise (Garibi et al., ECCV 2024) refines it by fixed-point iterations on the same step:

    z^(0) = inv(x_{t_prev}, eps(x_{t_prev}, t)),  z^(k) = inv(x_{t_prev}, eps(z^(k-1), t)),

and takes the step with the mean of the predictions of the iterations in [average_from, average_to):
x_t = inv(x_{t_prev}, mean_k eps(z^(k-1), t)) (the paper's averaging). Optionally each prediction is
regularised (the paper's noise regularisation, after pix2pix-zero): gradient steps on a patch-wise
KL to the prediction at a forward-noised z_0 (L_KL), and on the pairwise autocorrelation of the
noise at several scales (L_pair).

Here ``renoise_steps`` counts the noise predictions per inversion step, iteration 0 included:
``renoise_steps = 1`` is plain DDIM inversion (the official code's ``num_renoise_steps`` is ours - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from diffpo.kernel.trajectory import (
    Denoiser,
    StepCoefficients,
    ddim_mean,
    epsilon_from_prediction,
    guided,
    sampling_timesteps,
    step_coefficients,
)

NoisePredictor = Callable[[torch.Tensor], torch.Tensor]
INVERSION_GRIDS = ("per_sample", "shared")


@dataclass
class NoiseRegularization:
    """ReNoise's noise regularisation (defaults: the official code's). Off unless passed to ``invert``."""

    kl_weight: float = 0.065  # lambda_KL, patch-wise KL to the noise predicted at a forward-noised z_0
    autocorrelation_weight: float = 20.0  # lambda_AC, pairwise autocorrelation at several scales
    steps: int = 4  # outer gradient steps per regularised prediction
    autocorrelation_rolls: int = 5  # inner autocorrelation steps (random shifts) per outer step
    patch_size: int = 4
    seed: int = 0  # forward noise and random shifts


@dataclass
class InversionResult:
    """An inverted trajectory: latents (S+1, B, ...) from x_0 up to x_{timesteps[-1]} (fp32),
    timesteps (S,) of latents[1:] (ascending: the sampling timesteps read backwards), alphas
    (S+1,) the cumulative alpha of every latent (latents[0] at the scheduler's final alpha)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    alphas: torch.Tensor
    num_inference_steps: int

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def ddim_inversion_step(coef: StepCoefficients, prev_sample: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (x_{t_prev} - c2 eps) / c1 (fp32): the exact inverse of the eta = 0 DDIM step with the
    same eps, = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps with x0_hat from x_{t_prev} (module docstring)."""
    # c1, c2 are the very coefficients of the forward step, so ddim_mean undoes this to rounding.
    device = prev_sample.device
    return (prev_sample.float() - coef.c2.to(device) * eps.float()) / coef.c1.to(device)


def inversion_target(x_t: torch.Tensor, x_0: torch.Tensor, alpha_t: torch.Tensor | float) -> torch.Tensor:
    """tau = (x_t - sqrt(a_t) x_0) / sqrt(1 - a_t): the noise that takes x_0 to x_t in one forward
    jump (what SmPO trains against instead of fresh Gaussian noise). alpha_t: scalar or (B,)."""
    alpha = torch.as_tensor(alpha_t, dtype=torch.float32, device=x_t.device)
    if alpha.ndim == 1:
        alpha = alpha.view(-1, *[1] * (x_t.ndim - 1))
    return (x_t.float() - alpha.sqrt() * x_0.float()) / (1 - alpha).sqrt()


def renoise_step(predict_eps: NoisePredictor, coef: StepCoefficients, prev_sample: torch.Tensor, renoise_steps: int = 1,
                 average_from: int = 1, average_to: int | None = None,
                 regularize_eps: NoisePredictor | None = None) -> torch.Tensor:
    """One ReNoise inversion step x_{t_prev} -> x_t: ``renoise_steps`` predictions, the k-th at the
    current estimate of x_t (the 0-th at x_{t_prev}), then the step with the mean of predictions
    k in [average_from, average_to) (default: up to the last); an empty window keeps the last estimate."""
    average_to = renoise_steps if average_to is None else average_to
    window = range(average_from, min(average_to, renoise_steps))
    # As in the official code: with averaging, the averaged iterations are regularised; without, all but the 0-th.
    first_regularized = window.start if len(window) else 1
    estimate, total = prev_sample.float(), None
    for k in range(renoise_steps):
        eps = predict_eps(estimate)
        if k in window:
            total = eps if total is None else total + eps  # the raw predictions are averaged
        if regularize_eps is not None and k >= first_regularized:
            eps = regularize_eps(eps)
        estimate = ddim_inversion_step(coef, prev_sample, eps)
    if total is None:
        return estimate
    average = total / len(window)
    if regularize_eps is not None:
        average = regularize_eps(average)
    return ddim_inversion_step(coef, prev_sample, average)


@torch.no_grad()
def invert(denoise: Denoiser, scheduler, latents_0: torch.Tensor, cond: dict, uncond: dict | None = None,
           guidance: float = 1.0, num_inference_steps: int = 50, renoise_steps: int = 1, average_from: int = 1,
           average_to: int | None = None, regularize: NoiseRegularization | None = None,
           prediction_type: str = "epsilon", upto_step: int | None = None) -> InversionResult:
    """Invert clean latents x_0 (B, C, ...) along the DDIM timesteps of ``num_inference_steps``;
    ``upto_step`` stops after that many steps (latents up to timestep ``timesteps[upto_step - 1]``).
    Sampling back from ``final`` (``sample_from``, same scheduler and steps) reconstructs x_0.
    ``renoise_steps = 1``: plain DDIM inversion; > 1: ReNoise (``renoise_step``); ``regularize``:
    its noise regularisation (None: off)."""
    if renoise_steps < 1 or average_from < 0:
        raise ValueError(f"need renoise_steps >= 1 (1 = plain DDIM) and average_from >= 0, got {renoise_steps}, {average_from}")
    steps, prevs = sampling_timesteps(scheduler, num_inference_steps)
    taken = len(steps) if upto_step is None else upto_step
    if not 0 <= taken <= len(steps):
        raise ValueError(f"upto_step must be in [0, {len(steps)}], got {upto_step}")
    batch, model_dtype = latents_0.shape[0], latents_0.dtype
    x_0 = latents_0.float()
    forward_noise = _forward_noise(x_0, regularize)
    generator = torch.Generator().manual_seed(regularize.seed) if regularize is not None else None
    # x_0 sits at the final alpha: the predecessor of the last sampling step is always < 0.
    sample, history = x_0, [x_0]
    alphas = [torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)]
    for index in reversed(range(len(steps) - taken, len(steps))):  # t = 1, 101, ..., i.e. least noisy first
        # Every prediction of this step is made at the target timestep t, x_{t_prev}'s included
        # (as ReNoise's code; x_0 has no sampling timestep of its own).
        t = steps[index].repeat(batch)
        coef = step_coefficients(scheduler, t, prevs[index].repeat(batch), 0.0, x_0.ndim)
        predict_eps = _noise_predictor(denoise, t.to(x_0.device), coef, cond, uncond, guidance, prediction_type, model_dtype)
        regularize_eps = None
        if regularize is not None:
            reference = predict_eps(coef.alpha_t.to(x_0).sqrt() * x_0 + (1 - coef.alpha_t.to(x_0)).sqrt() * forward_noise)
            regularize_eps = _regularizer(reference, regularize, generator)
        sample = renoise_step(predict_eps, coef, sample, renoise_steps, average_from, average_to, regularize_eps)
        history.append(sample)
        alphas.append(coef.alpha_t.reshape(-1)[0])
    timesteps = steps.flip(0)[:taken]
    return InversionResult(torch.stack(history), timesteps, torch.stack(alphas).float(), num_inference_steps)


@torch.no_grad()
@torch.no_grad()
def invert_to_timesteps(denoise: Denoiser, scheduler, latents_0: torch.Tensor, cond: dict, timesteps: torch.Tensor,
                        num_steps: int, renoise_steps: int = 2, average_from: int = 0,
                        prediction_type: str = "epsilon", grid: str = "per_sample") -> torch.Tensor:
    """x~_t for every sample at its own timestep ``timesteps[b]`` (SmPO's trajectory from inversion):
    ``num_steps`` ReNoise steps without guidance, starting from x_0 at the final alpha, on the
    per-sample grid round(t_b k / num_steps), k = 1..num_steps (``grid="per_sample"``: x~ lands on t_b),
    or on ``grid="shared"``: the inverse-scheduler points k (T / num_steps) + steps_offset below t_b,
    so x~ stays at the last such point while the loss uses t_b. ``shared`` is what the official SmPO
    code computes with diffusers >= 0.22; with the diffusers 0.20.0 its requirements pin (a
    DDIMInverseScheduler changed in diffusers PR #5145) its x~ lands instead on the first point at or
    above t_b (at most the last one), each step's predictions made at the timestep of the point it
    starts from (tests/test_official_losses.py; docs/methods.md, "Checked against the official code").
    Defaults: one re-prediction per step, averaged with the plain one (diffpo's reading of SmPO's
    "one ReNoise iteration with averaging", the official code's too)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if grid not in INVERSION_GRIDS:
        raise ValueError(f"inversion grid {grid!r} is unknown: use one of {', '.join(INVERSION_GRIDS)}")
    model_dtype = latents_0.dtype
    sample = latents_0.float()
    timesteps = timesteps.long().cpu()
    prev = torch.full_like(timesteps, -1)
    train_steps = scheduler.config.num_train_timesteps
    for k in range(1, num_steps + 1):
        if grid == "per_sample":
            t = torch.div(timesteps * k + num_steps // 2, num_steps, rounding_mode="floor")
            active = torch.ones_like(timesteps, dtype=torch.bool)
        else:  # the official code's: one grid for all, stopping below each sample's timestep
            point = (k - 1) * (train_steps // num_steps) + scheduler.config.get("steps_offset", 0)
            active = torch.full_like(timesteps, point) < timesteps
            if not active.any():
                break
            t = torch.where(active, torch.full_like(timesteps, point), prev.clamp(min=0))
        coef = step_coefficients(scheduler, t, prev, 0.0, sample.ndim)
        predict_eps = _noise_predictor(denoise, t.to(sample.device), coef, cond, None, 1.0, prediction_type, model_dtype)
        stepped = renoise_step(predict_eps, coef, sample, renoise_steps, average_from)
        mask = active.to(sample.device).view(-1, *[1] * (sample.ndim - 1))
        sample = torch.where(mask, stepped, sample)
        prev = torch.where(active, t, prev)
    return sample


def sample_from(denoise: Denoiser, scheduler, latents_T: torch.Tensor, cond: dict, uncond: dict | None = None,
                guidance: float = 1.0, num_inference_steps: int = 50, prediction_type: str = "epsilon") -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) from x_T: latents (T+1, B, ...) from x_T to x_0, fp32."""
    steps, prevs = sampling_timesteps(scheduler, num_inference_steps)
    batch, model_dtype = latents_T.shape[0], latents_T.dtype
    sample, history = latents_T.float(), [latents_T.float()]
    for t, prev in zip(steps, prevs):
        tb = t.repeat(batch)
        coef = step_coefficients(scheduler, tb, prev.repeat(batch), 0.0, sample.ndim)
        eps = _noise_predictor(denoise, tb.to(sample.device), coef, cond, uncond, guidance, prediction_type, model_dtype)(sample)
        sample = ddim_mean(coef, sample, eps)  # sigma = 0: the step is its mean (no log-prob of a point mass)
        history.append(sample)
    return torch.stack(history)


def _noise_predictor(denoise: Denoiser, t: torch.Tensor, coef: StepCoefficients, cond: dict, uncond: dict | None,
                     guidance: float, prediction_type: str, model_dtype: torch.dtype) -> NoisePredictor:
    """sample (fp32) -> guided eps_hat(sample, t) in fp32; the model sees its own dtype."""

    def predict(sample: torch.Tensor) -> torch.Tensor:
        out = guided(denoise, sample.to(model_dtype), t, cond, uncond, guidance).float()
        return epsilon_from_prediction(out, sample, coef.alpha_t.to(sample.device), prediction_type)

    return predict


def _forward_noise(x_0: torch.Tensor, regularize: NoiseRegularization | None) -> torch.Tensor | None:
    """One Gaussian draw for the whole inversion: z_t^fwd = sqrt(a_t) z_0 + sqrt(1 - a_t) noise."""
    if regularize is None:
        return None
    generator = torch.Generator().manual_seed(regularize.seed)
    return torch.randn(x_0.shape, generator=generator, dtype=torch.float32).to(x_0.device)


def _regularizer(reference: torch.Tensor, config: NoiseRegularization, generator: torch.Generator) -> NoisePredictor:
    return lambda eps: regularize_noise(eps, reference, config, generator)


def regularize_noise(eps: torch.Tensor, reference: torch.Tensor, config: NoiseRegularization,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """ReNoise's noise regularisation: ``steps`` times, a KL gradient step (gradient clipped to
    +-100, as in the official code), then ``autocorrelation_rolls`` autocorrelation steps."""
    eps = eps.float()
    for _ in range(config.steps):
        if config.kl_weight > 0:
            grad = _gradient(lambda e: patch_kl_divergence(e, reference, config.patch_size), eps)
            eps = eps - config.kl_weight * grad.clamp(-100, 100)
        if config.autocorrelation_weight > 0:
            for _ in range(config.autocorrelation_rolls):
                grad = _gradient(lambda e: autocorrelation_loss(e, generator), eps)
                eps = eps - config.autocorrelation_weight * grad / config.autocorrelation_rolls
    return eps.detach()


def patch_kl_divergence(eps: torch.Tensor, reference: torch.Tensor, patch_size: int = 4) -> torch.Tensor:
    """Sum over samples, patches and channels of |2 KL| between per-patch Gaussians of eps and of
    the reference: log(v1 / v0) + (v0 + (m0 - m1)^2) / v1 - 1 (ReNoise's L_KL)."""
    small = 1e-6  # keeps flat patches finite
    mean0, var0 = _patch_statistics(eps, patch_size)
    mean1, var1 = _patch_statistics(reference, patch_size)
    kl = torch.log((var1 + small) / (var0 + small)) + (var0 + (mean0 - mean1) ** 2) / (var1 + small) - 1
    return kl.abs().sum()


def autocorrelation_loss(eps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum of squared mean products of each channel with itself shifted by a random amount along
    each spatial axis, at 2x-pooled scales down to 8 px (pix2pix-zero's L_pair, used by ReNoise)."""
    frames = _as_frames(eps)
    loss = frames.new_zeros(())
    for channel in range(frames.shape[1]):
        noise = frames[:, channel : channel + 1]
        while True:
            shift = int(torch.randint(0, max(noise.shape[-2] // 2, 1), (1,), generator=generator))
            for dim in (-2, -1):
                loss = loss + ((noise * noise.roll(shift, dims=dim)).mean(dim=(1, 2, 3)) ** 2).sum()
            if noise.shape[-2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return loss


def _patch_statistics(x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) variance of every non-overlapping patch of every channel."""
    patches = _as_frames(x).unfold(-2, patch_size, patch_size).unfold(-2, patch_size, patch_size).flatten(-2)
    return patches.mean(dim=-1), patches.var(dim=-1)


def _as_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as is; (B, C, F, H, W) and higher as (B * F..., C, H, W): the terms are per frame."""
    if x.ndim == 4:
        return x
    return x.movedim(1, -3).reshape(-1, *x.shape[1:2], *x.shape[-2:])


def _gradient(loss_fn: Callable[[torch.Tensor], torch.Tensor], at: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        variable = at.detach().requires_grad_(True)
        return torch.autograd.grad(loss_fn(variable), variable)[0]


# ---- rectified flow --------------------------------------------------------------------------


@torch.no_grad()
def invert_flow_to_sigmas(denoise: Denoiser, latents_0: torch.Tensor, cond: dict, sigmas: torch.Tensor, num_steps: int,
                          renoise_steps: int = 2, average_from: int = 0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """x~_sigma for every sample at its own ``sigmas[b]``: Euler inversion of the flow ODE
    dx/dsigma = v(x, sigma) from x_0 (sigma = 0) in ``num_steps`` equal steps sigma_b k / num_steps,
    with ReNoise fixed-point iterations (Garibi et al., ECCV 2024, Alg. 1, written for the velocity):
    the 0-th velocity is predicted at the current point (plain Euler inversion), the k-th at the
    estimate x_prev + d·v_{k-1} of the next point and sigma; the step uses the mean of predictions
    ``average_from`` .. ``renoise_steps - 1``. The defaults (one re-prediction averaged with the plain
    one) mirror ``invert_to_timesteps``. The denoiser takes sigma · ``num_train_timesteps``."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if not 0 <= average_from < renoise_steps:
        raise ValueError(f"average_from={average_from} must lie in [0, renoise_steps={renoise_steps})")
    model_dtype = latents_0.dtype
    sample = latents_0.float()
    sigmas = sigmas.float().to(sample.device)
    shape = (-1, *[1] * (sample.ndim - 1))
    prev = torch.zeros_like(sigmas)
    for k in range(1, num_steps + 1):
        current = sigmas * k / num_steps
        step = (current - prev).view(shape)
        estimate, at, total, count = sample, prev, None, 0
        for j in range(renoise_steps):
            velocity = denoise(estimate.to(model_dtype), at * num_train_timesteps, cond).float()
            if j >= average_from:
                total = velocity if total is None else total + velocity
                count += 1
            estimate, at = sample + step * velocity, current
        sample = sample + step * (total / count)
        prev = current
    return sample


def flow_inversion_target(x_t: torch.Tensor, x_0: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """v = (x_t - x_0) / sigma: the velocity of the straight path through x_0 and x_t, i.e. eps - x_0
    for the eps with x_t = (1 - sigma) x_0 + sigma eps (SmPO's inversion target, for the velocity)."""
    sigma = sigmas.float().to(x_t.device).view(-1, *[1] * (x_t.ndim - 1))
    return (x_t.float() - x_0.float()) / sigma
