"""The trajectory kernel: DDIM log-probabilities against the closed-form Gaussian, re-scoring,
and the implied-target form of the log-prob ratio."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffpo.kernel.trajectory import (
    ddim_step,
    implied_logprob_ratio,
    rescore_step,
    sample_trajectory,
    step_coefficients,
)


@pytest.fixture
def scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def test_ddim_step_logprob_is_the_closed_form_gaussian(scheduler):
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    t, prev = torch.tensor([501, 801]), torch.tensor([451, 751])
    coef = step_coefficients(scheduler, t, prev, eta=1.0, ndim=4)
    prev_sample, log_prob = ddim_step(coef, x, eps, generator=gen)
    for i in range(2):  # by hand, from the DDIM equations, in float64
        a_t = scheduler.alphas_cumprod[t[i]].double()
        a_p = scheduler.alphas_cumprod[prev[i]].double()
        sigma = torch.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        x0 = (x[i].double() - torch.sqrt(1 - a_t) * eps[i].double()) / torch.sqrt(a_t)
        mean = torch.sqrt(a_p) * x0 + torch.sqrt(1 - a_p - sigma**2) * eps[i].double()
        density = torch.distributions.Normal(mean, sigma).log_prob(prev_sample[i].double()).mean()
        assert log_prob[i].item() == pytest.approx(density.item(), rel=1e-4, abs=1e-4)


def test_step_matches_diffusers_ddim_mean(scheduler):
    """With the same noise, our step equals diffusers' DDIMScheduler.step (eta = 1)."""
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[5]
    x, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    ours, _ = ddim_step(step_coefficients(scheduler, t.view(1), (t - 50).view(1), 1.0, 4), x, eps,
                        generator=torch.Generator().manual_seed(7))
    theirs = scheduler.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def _denoiser(scale):
    def denoise(x, t, cond):
        return scale * x + cond["encoder_hidden_states"].mean() * 0.1
    return denoise


def test_sample_then_rescore_with_the_same_model_reproduces_the_log_probs(scheduler):
    cond = {"encoder_hidden_states": torch.ones(2, 3, 8)}
    uncond = {"encoder_hidden_states": torch.zeros(2, 3, 8)}
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    traj = sample_trajectory(_denoiser(0.3), scheduler, x_T, cond, uncond, guidance=5.0, num_inference_steps=10, eta=1.0,
                             generator=torch.Generator().manual_seed(2))
    assert traj.latents.shape == (11, 2, 4, 4, 4) and traj.log_probs.shape == (10, 2)
    for step in (0, 4, 9):
        again = rescore_step(_denoiser(0.3), scheduler, traj, step, cond, uncond, guidance=5.0)
        assert torch.allclose(again, traj.log_probs[step], atol=1e-5)
        other = rescore_step(_denoiser(0.5), scheduler, traj, step, cond, uncond, guidance=5.0)
        assert not torch.allclose(other, traj.log_probs[step])


def test_same_x_T_diverges_through_eta_noise_only(scheduler):
    cond = {"encoder_hidden_states": torch.ones(2, 3, 8)}
    x_T = torch.randn(1, 4, 4, 4).repeat(2, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    traj = sample_trajectory(_denoiser(0.3), scheduler, x_T, cond, None, guidance=1.0, num_inference_steps=5, eta=1.0, generator=gen)
    assert torch.equal(traj.latents[0, 0], traj.latents[0, 1]) and not torch.allclose(traj.final[0], traj.final[1])
    deterministic = sample_trajectory(_denoiser(0.3), scheduler, x_T, cond, None, guidance=1.0, num_inference_steps=5, eta=0.0)
    assert torch.allclose(deterministic.final[0], deterministic.final[1])


def test_implied_target_ratio_equals_the_direct_logprob_difference(scheduler):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 5, generator=gen)
    eps_sampler, eps_policy, eps_ref = (torch.randn(3, 4, 5, 5, generator=gen) for _ in range(3))
    t, prev = torch.tensor([961, 500, 101]), torch.tensor([911, 450, 51])
    coef = step_coefficients(scheduler, t, prev, 1.0, 4)
    prev_sample, _ = ddim_step(coef, x, eps_sampler, generator=gen)
    direct = ddim_step(coef, x, eps_policy, prev_sample)[1] - ddim_step(coef, x, eps_ref, prev_sample)[1]
    implied = implied_logprob_ratio(eps_policy, eps_ref, coef, x, prev_sample)
    assert torch.allclose(implied, direct, rtol=1e-3, atol=1e-4)
    assert not math.isclose(float(direct.abs().sum()), 0.0)
