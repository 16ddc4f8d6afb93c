"""The shared denoising kernel: per-sample error, shared noise, targets, concatenated forwards."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffpo.kernel.denoising import noise_pairs, pair_errors, pair_noise, per_sample_error, prediction_target
from diffpo.kernel.noise_process import DDPMProcess


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 4, 5, 8, 8)])
def test_per_sample_error_is_mean_over_non_batch_dims(shape):
    pred, target = torch.randn(shape), torch.randn(shape)
    expected = torch.stack([((target[i] - pred[i]) ** 2).mean() for i in range(shape[0])])
    assert torch.allclose(per_sample_error(pred, target), expected)


def test_per_sample_error_is_fp32_for_half_inputs():
    # (2^-13)^2 = 2^-26 underflows to 0 in fp16 but not in fp32
    pred = torch.zeros((2, 4, 4, 4), dtype=torch.float16)
    target = torch.full((2, 4, 4, 4), 2**-13, dtype=torch.float16)
    assert ((target - pred) ** 2).mean().item() == 0.0
    err = per_sample_error(pred, target)
    assert err.dtype == torch.float32
    assert err[0].item() == pytest.approx(2**-26, rel=1e-6)


def test_winner_and_loser_share_noise_and_timestep(scheduler):
    gen = torch.Generator().manual_seed(0)
    lw, ll = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noise, t = pair_noise(lw, 1000, gen)
    noised = noise_pairs(DDPMProcess(scheduler, "epsilon"), lw, ll, noise, t)
    nw, nl = noised.noise.chunk(2)
    tw, tl = noised.timesteps.chunk(2)
    assert torch.equal(nw, nl) and torch.equal(tw, tl)
    # x_t - sqrt(abar) x_0 = sqrt(1 - abar) eps is the same for winner and loser
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    xw, xl = noised.noisy.chunk(2)
    assert torch.allclose(xw - abar.sqrt() * lw, xl - abar.sqrt() * ll, atol=1e-5)
    assert torch.allclose(xw - abar.sqrt() * lw, (1 - abar).sqrt() * noise, atol=1e-5)


def test_input_perturbation_is_shared_and_not_in_target(scheduler):
    lw = ll = torch.zeros(2, 4, 4, 4)
    noise, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    pert = torch.randn(2, 4, 4, 4)
    noised = noise_pairs(DDPMProcess(scheduler, "epsilon"), lw, ll, noise, t, input_perturbation=0.1, perturbation=pert)
    xw, xl = noised.noisy.chunk(2)
    assert torch.equal(xw, xl)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(xw, (1 - abar).sqrt() * (noise + 0.1 * pert), atol=1e-6)
    assert torch.equal(noised.noise.chunk(2)[0], noise)


def test_targets(scheduler):
    x0, eps, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([0, 999])
    assert torch.equal(prediction_target("epsilon", scheduler, x0, eps, t), eps)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert torch.allclose(prediction_target("v_prediction", scheduler, x0, eps, t), v, atol=1e-6)
    with pytest.raises(ValueError, match="sample"):
        prediction_target("sample", scheduler, x0, eps, t)


def test_pair_errors_one_concatenated_forward_each_and_reference_without_grad(scheduler):
    calls = []
    weight = torch.nn.Parameter(torch.tensor(1.5))

    def policy(x, t, cond):
        calls.append(("policy", x.shape[0]))
        return x * weight

    def reference(x, t, cond):
        calls.append(("reference", x.shape[0], torch.is_grad_enabled()))
        return x * weight

    lw, ll = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    noise, t = pair_noise(lw, 1000, torch.Generator().manual_seed(1))
    noised = noise_pairs(DDPMProcess(scheduler, "epsilon"), lw, ll, noise, t)
    errors = pair_errors(policy, reference, noised, {}, noised.noise)
    assert calls == [("policy", 6), ("reference", 6, False)]
    assert errors.policy_w.requires_grad and not errors.ref_w.requires_grad
    assert torch.equal(errors.policy_w.detach(), errors.ref_w) and torch.equal(errors.policy_l.detach(), errors.ref_l)
    expected = per_sample_error(noised.noisy * 1.5, noised.noise)
    assert torch.allclose(torch.cat([errors.policy_w, errors.policy_l]), expected)


def test_mismatched_pair_shapes_raise(scheduler):
    with pytest.raises(ValueError, match="differ"):
        noise_pairs(DDPMProcess(scheduler, "epsilon"), torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4), torch.zeros(2, dtype=torch.long))
