"""The rectified-flow noise process: noising, target, sigma draws, shifts and loss weights, checked
against hand-computed values and diffusers' own training utilities and scheduler."""

import math

import pytest
import torch

from diffpo.kernel.denoising import PairStreams, noise_pairs, pair_errors, per_sample_error
from diffpo.kernel.noise_process import (
    DynamicShift,
    FlowSampling,
    RectifiedFlowProcess,
    exponential_shift,
    static_shift,
)


def test_flow_noising_and_velocity_target_by_hand():
    process = RectifiedFlowProcess(num_train_timesteps=1000)
    x0 = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 4.0]]]])  # (2, 1, 1, 2)
    eps = torch.tensor([[[[0.0, 1.0]]], [[[-1.0, 2.0]]]])
    t = torch.tensor([250.0, 900.0])  # sigma 0.25 and 0.9
    noisy = process.add_noise(x0, eps, t)
    # x_t = (1 - sigma) x0 + sigma eps
    expected = torch.tensor([[[[0.75 * 1.0 + 0.0, 0.75 * -2.0 + 0.25]]], [[[0.1 * 0.5 - 0.9, 0.1 * 4.0 + 1.8]]]])
    torch.testing.assert_close(noisy, expected)
    torch.testing.assert_close(process.target(x0, eps, t), torch.tensor([[[[-1.0, 3.0]]], [[[-1.5, -2.0]]]]))
    # the velocity integrates x_t: x_t - sigma * v = x0 exactly
    torch.testing.assert_close(noisy - (t / 1000).view(-1, 1, 1, 1) * process.target(x0, eps, t), x0)
    assert process.error_weights(t) is None


def test_flow_noising_matches_diffusers_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = scheduler.timesteps[[0, 400, 999]]
    ours = RectifiedFlowProcess(num_train_timesteps=1000).add_noise(x0, eps, t)
    torch.testing.assert_close(ours, scheduler.scale_noise(x0, t, eps))


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sigma_draws_equal_diffusers_density(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sampling = FlowSampling(timestep_sampling=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    process = RectifiedFlowProcess(sampling, shift=1.0)
    ours = process.unshifted_draw(4096, torch.Generator().manual_seed(7))
    theirs = compute_density_for_timestep_sampling(scheme, 4096, 0.3, 1.2, 1.29, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs)
    assert 0 <= ours.min() and ours.max() <= 1


def test_logit_normal_sigma_has_the_distribution_it_claims():
    process = RectifiedFlowProcess(FlowSampling(logit_mean=0.5, logit_std=0.8), shift=1.0)
    _, t = process.draw(torch.zeros(20000, 1, 2, 2), torch.Generator().manual_seed(0))
    logits = torch.logit(t / 1000)
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(0.8, abs=0.03)


def test_static_shift_equals_the_schedulers_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(static_shift(unshifted, 3.0), scheduler.sigmas, rtol=1e-6, atol=1e-6)
    # by hand: sigma 0.5 at shift 3 -> 1.5 / 2 = 0.75
    assert static_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_dynamic_shift_equals_flux_calculate_shift_and_the_schedulers_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    dynamic = DynamicShift(0.5, 1.15, 256, 4096)
    for seq_len in (64, 256, 1024, 4096):
        assert dynamic.mu(seq_len) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sigmas = [0.9, 0.7, 0.5, 0.3, 0.1]
    mu = dynamic.mu(1024)  # 1024 tokens: a 512 px FLUX image (64x64 latents, 2x2 patches)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    torch.testing.assert_close(exponential_shift(torch.tensor(sigmas), mu), scheduler.sigmas[:-1], rtol=1e-6, atol=1e-6)
    # the process picks mu from the latent size: 64x64 latents, 4 latent positions per token
    process = RectifiedFlowProcess(FlowSampling(timestep_sampling="uniform"), dynamic=dynamic, latent_tokens=4)
    _, t = process.draw(torch.zeros(3, 16, 64, 64), torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    torch.randn(3, 16, 64, 64, generator=generator)  # the noise is drawn first, then sigma
    u = process.unshifted_draw(3, generator)
    torch.testing.assert_close(t / 1000, exponential_shift(u, mu))
    assert (t / 1000 > u).all()  # mu > 0 shifts towards noise


def test_flow_shift_override_replaces_the_schedulers():
    assert RectifiedFlowProcess(FlowSampling(shift=1.0), shift=3.0).shift == 1.0
    assert RectifiedFlowProcess(FlowSampling(), shift=3.0).shift == 3.0


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_loss_weights_equal_diffusers_sd3_weighting(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    process = RectifiedFlowProcess(FlowSampling(loss_weighting=scheme))
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99])
    torch.testing.assert_close(process.error_weights(sigmas * 1000), compute_loss_weighting_for_sd3(scheme, sigmas).float())


def test_weighted_error_is_weight_times_mean_square():
    pred, target = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    torch.testing.assert_close(per_sample_error(pred, target, torch.tensor([2.0, 0.5])), torch.tensor([2.0, 0.5]))


def test_a_pair_shares_noise_and_sigma_and_draws_do_not_depend_on_the_batch():
    process = RectifiedFlowProcess(FlowSampling(), shift=3.0)
    lw, ll = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4)
    noise, t = process.draw(lw, PairStreams(0, 0, [3, 1, 4, 5]))
    assert t.dtype == torch.float32 and ((t > 0) & (t < 1000)).all()
    noised = noise_pairs(process, lw, ll, noise, t)
    sigma = (noised.timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.equal(noised.timesteps[:4], noised.timesteps[4:])
    # both halves are (1 - sigma) x0 + sigma * the same eps
    eps_from_w = (noised.noisy[:4] - (1 - sigma[:4]) * lw) / sigma[:4]
    eps_from_l = (noised.noisy[4:] - (1 - sigma[4:]) * ll) / sigma[4:]
    torch.testing.assert_close(eps_from_w, eps_from_l, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_from_w, noise, rtol=1e-4, atol=1e-4)
    # each pair draws from its own stream: a pair in another batch gets the same noise and sigma
    noise_2, t_2 = process.draw(lw[:2], PairStreams(0, 0, [4, 3]))
    assert torch.equal(noise_2[1], noise[0]) and torch.equal(t_2[1], t[0]) and torch.equal(t_2[0], t[2])


def test_flow_pair_errors_use_the_velocity_and_the_weights():
    process = RectifiedFlowProcess(FlowSampling(loss_weighting="cosmap"))
    lw, ll = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    noise, t = process.draw(lw, torch.Generator().manual_seed(0))
    noised = noise_pairs(process, lw, ll, noise, t)
    target = process.target(noised.latents, noised.noise, noised.timesteps)
    exact = lambda x, t, c: target  # noqa: E731 - a perfect velocity predictor
    errors = pair_errors(exact, exact, noised, {}, target, process.error_weights(noised.timesteps))
    assert torch.equal(errors.policy_w, torch.zeros(2)) and torch.equal(errors.ref_l, torch.zeros(2))
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    errors = pair_errors(zero, None, noised, {}, target, process.error_weights(noised.timesteps))
    sigma = t / 1000
    weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    torch.testing.assert_close(errors.policy_w, weight * (noise - lw).pow(2).mean(dim=(1, 2, 3)))


def test_winners_only_runs_the_policy_on_the_winners_alone():
    process = RectifiedFlowProcess()
    lw, ll = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    noise, t = process.draw(lw, torch.Generator().manual_seed(0))
    noised = noise_pairs(process, lw, ll, noise, t)
    target = process.target(noised.latents, noised.noise, noised.timesteps)
    seen = []

    def policy(x, t, c):
        seen.append((x.shape[0], c["hidden"].shape[0]))
        return x * 0.5

    full = pair_errors(policy, None, noised, {"hidden": torch.zeros(6, 2)}, target)
    alone = pair_errors(policy, None, noised, {"hidden": torch.zeros(6, 2)}, target, winners_only=True)
    assert seen == [(6, 6), (3, 3)]
    torch.testing.assert_close(alone.policy_w, full.policy_w)
    assert alone.policy_l is None


def test_flow_processes_refuse_bad_settings():
    with pytest.raises(ValueError, match="timestep_sampling 'beta' is unknown"):
        FlowSampling(timestep_sampling="beta")
    with pytest.raises(ValueError, match="loss_weighting"):
        FlowSampling(loss_weighting="snr")
    with pytest.raises(ValueError, match="DDPM-step window"):
        RectifiedFlowProcess().draw(torch.zeros(1, 1, 2, 2), None, (0, 10))
