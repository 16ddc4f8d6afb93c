"""DDIM and ReNoise inversion: the step algebra, the SmPO target, round trips on the bundled tiny
model (with and without guidance), batching, partial inversion, video latents, regularisation.

Measured on the tiny model (3 shape images at its native 32 px, 4x16x16 latents; latent MSE of
the reconstruction / PSNR of its decoding against the decoded original latents; ReNoise with
4 predictions per step averaged over iterations 1..3):
    guidance 1, 10 steps: DDIM 1.31e-2 / 32.9 dB, ReNoise 1.33e-3 / 49.0 dB
    guidance 1, 25 steps: DDIM 3.54e-3 / 39.0 dB, ReNoise 5.15e-5 / 63.8 dB
    guidance 2, 10 steps: DDIM 1.25e-2 / 34.3 dB, ReNoise 1.41e-3 / 46.8 dB
    guidance 2, 25 steps: DDIM 2.96e-3 / 40.3 dB, ReNoise 6.32e-5 / 61.6 dB
(``pytest -s`` prints them.)
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffpo.kernel.inversion import (
    NoiseRegularization,
    ddim_inversion_step,
    inversion_target,
    invert,
    patch_kl_divergence,
    regularize_noise,
    sample_from,
)
from diffpo.kernel.trajectory import ddim_mean, sample_trajectory, step_coefficients

TINY = "assets/tiny-sd-shapes"


@pytest.fixture(scope="module")
def scheduler():
    return DDIMScheduler.from_config(DDPMScheduler.from_pretrained(TINY, subfolder="scheduler").config)


@pytest.fixture(scope="module")
def tiny():
    """The bundled model, 3 shape images encoded to latents, their captions' and empty conditioning."""
    from diffpo.data.shapes import sample_shapes
    from diffpo.models.loading import load_stack, unet_denoiser

    stack = load_stack("tiny")
    shapes = sample_shapes(3, size=stack.native_resolution, seed=0)
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1 for image, _ in shapes])
    mean, _ = stack.encode_images(pixels)
    text = stack.encode_prompts([caption for _, caption in shapes])
    empty = stack.encode_prompts([""] * len(shapes))
    return {
        "stack": stack,
        "denoise": unet_denoiser(stack.unet),
        "latents": mean * stack.vae.config.scaling_factor,
        "cond": stack.family.unet_conditioning(text),
        "uncond": stack.family.unet_conditioning(empty),
    }


def _decode(stack, latents):
    with torch.no_grad():
        return stack.vae.decode(latents / stack.vae.config.scaling_factor).sample.clamp(-1, 1)


def _psnr(a, b):
    """Mean over images of the PSNR of pixels in [-1, 1] (peak-to-peak 2)."""
    return (10 * torch.log10(4 / ((a - b) ** 2).mean(dim=(1, 2, 3)))).mean().item()


def test_inversion_step_is_undone_by_the_ddim_step(scheduler):
    gen = torch.Generator().manual_seed(0)
    x_prev, eps = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    t, prev = torch.tensor([1, 501, 981]), torch.tensor([-19, 481, 961])  # -19: the final alpha
    coef = step_coefficients(scheduler, t, prev, 0.0, 4)
    x_t = ddim_inversion_step(coef, x_prev, eps)
    assert torch.allclose(ddim_mean(coef, x_t, eps), x_prev, atol=1e-5)
    for i in range(3):  # the x0_hat form, by hand in float64
        a_t = scheduler.alphas_cumprod[t[i]].double()
        a_p = scheduler.alphas_cumprod[prev[i]].double() if prev[i] >= 0 else scheduler.final_alpha_cumprod.double()
        x0 = (x_prev[i].double() - (1 - a_p).sqrt() * eps[i].double()) / a_p.sqrt()
        assert torch.allclose(x_t[i].double(), a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps[i].double(), atol=1e-5)


def test_inversion_target_by_hand():
    # a = 0.64: sqrt(a) = 0.8, sqrt(1 - a) = 0.6
    assert inversion_target(torch.tensor([1.0]), torch.tensor([0.5]), 0.64).item() == pytest.approx((1 - 0.4) / 0.6)
    x_t, x_0 = torch.tensor([[2.0, -1.0], [0.0, 3.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    expected = torch.tensor([[(2 - 0.8) / 0.6, (-1 - 0.8) / 0.6], [(0 - 0.6 * 2) / 0.8, (3 - 0.6 * 2) / 0.8]])
    assert torch.allclose(inversion_target(x_t, x_0, torch.tensor([0.64, 0.36])), expected)
    noise, clean = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    alpha = torch.tensor([0.9, 0.2])
    noisy = alpha.sqrt().view(-1, 1, 1, 1) * clean + (1 - alpha).sqrt().view(-1, 1, 1, 1) * noise
    assert torch.allclose(inversion_target(noisy, clean, alpha), noise, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("steps", [10, 25])
def test_tiny_model_round_trip_renoise_beats_ddim(tiny, scheduler, guidance, steps):
    z_0, stack = tiny["latents"], tiny["stack"]
    args = (tiny["denoise"], scheduler)
    context = (tiny["cond"], tiny["uncond"], guidance, steps)
    reference = _decode(stack, z_0)
    figures = {}
    for name, renoise in (("ddim", dict(renoise_steps=1)), ("renoise", dict(renoise_steps=4, average_from=1, average_to=4))):
        inverted = invert(*args, z_0, *context, **renoise)
        assert inverted.latents.shape == (steps + 1, *z_0.shape) and 0.7 < inverted.final.std() < 1.3  # ~ N(0, I)
        x_0 = sample_from(*args, inverted.final, *context)[-1]
        figures[name] = (((x_0 - z_0) ** 2).mean().item(), _psnr(_decode(stack, x_0), reference))
    print(f"\n[inversion] guidance {guidance}, {steps} steps: latent MSE / PSNR  DDIM {figures['ddim'][0]:.2e} / "
          f"{figures['ddim'][1]:.1f} dB, ReNoise {figures['renoise'][0]:.2e} / {figures['renoise'][1]:.1f} dB")
    assert figures["ddim"][0] < 0.05 and figures["ddim"][1] > 28
    assert figures["renoise"][0] <= figures["ddim"][0] and figures["renoise"][1] > 40


def test_a_batch_inverts_as_its_samples_alone(tiny, scheduler):
    options = dict(uncond=tiny["uncond"], guidance=2.0, num_inference_steps=6, renoise_steps=3)
    together = invert(tiny["denoise"], scheduler, tiny["latents"], tiny["cond"], **options)
    for i in range(3):
        alone = {key: {"encoder_hidden_states": value["encoder_hidden_states"][i : i + 1]}
                 for key, value in (("cond", tiny["cond"]), ("uncond", tiny["uncond"]))}
        single = invert(tiny["denoise"], scheduler, tiny["latents"][i : i + 1], alone["cond"],
                        **{**options, "uncond": alone["uncond"]})
        assert torch.allclose(together.latents[:, i], single.latents[:, 0], atol=1e-4)


def test_partial_inversion_is_the_prefix_of_the_full_one(tiny, scheduler):
    args = (tiny["denoise"], scheduler, tiny["latents"], tiny["cond"])
    full = invert(*args, num_inference_steps=10, renoise_steps=2)
    part = invert(*args, num_inference_steps=10, renoise_steps=2, upto_step=4)
    assert part.latents.shape[0] == 5 and torch.equal(part.latents, full.latents[:5])
    assert part.timesteps.tolist() == [1, 101, 201, 301] == full.timesteps[:4].tolist()
    assert torch.equal(part.alphas, full.alphas[:5])
    assert part.alphas[0].item() == pytest.approx(scheduler.final_alpha_cumprod.item())
    assert part.alphas[-1].item() == pytest.approx(scheduler.alphas_cumprod[301].item())
    assert torch.equal(invert(*args, num_inference_steps=10, upto_step=0).latents, tiny["latents"][None])
    with pytest.raises(ValueError):
        invert(*args, num_inference_steps=10, upto_step=11)
    with pytest.raises(ValueError):
        invert(*args, num_inference_steps=10, renoise_steps=0)


def _linear(x, t, cond):
    return 0.1 * x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_video_latents_round_trip_and_renoise_reaches_the_fixed_point(scheduler, prediction_type):
    z_0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, F, H, W)
    cond = {"encoder_hidden_states": torch.zeros(2, 1, 8)}
    errors = {}
    for name, renoise in (("ddim", dict(renoise_steps=1)), ("renoise", dict(renoise_steps=12, average_from=11))):
        inverted = invert(_linear, scheduler, z_0, cond, num_inference_steps=8, prediction_type=prediction_type, **renoise)
        assert inverted.latents.shape == (9, *z_0.shape)
        back = sample_from(_linear, scheduler, inverted.final, cond, num_inference_steps=8, prediction_type=prediction_type)
        errors[name] = (back[-1] - z_0).abs().max().item()
    # ReNoise's iterations converge to x_t = inv(x_prev, eps(x_t)): sampling back is then exact.
    assert errors["renoise"] < 1e-4 and errors["renoise"] < errors["ddim"]


def test_sample_from_is_the_eta_0_trajectory(scheduler):
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, uncond = {"encoder_hidden_states": torch.ones(2, 1, 8)}, {"encoder_hidden_states": torch.zeros(2, 1, 8)}

    def denoise(x, t, c):
        return 0.2 * x + c["encoder_hidden_states"].mean() * 0.1

    ours = sample_from(denoise, scheduler, x_T, cond, uncond, 3.0, 7)
    kernel = sample_trajectory(denoise, scheduler, x_T, cond, uncond, guidance=3.0, num_inference_steps=7, eta=0.0)
    assert torch.allclose(ours, kernel.latents, atol=1e-6)


def test_regularisation_runs_and_changes_the_inversion(tiny, scheduler):
    args = (tiny["denoise"], scheduler, tiny["latents"], tiny["cond"])
    options = dict(num_inference_steps=4, renoise_steps=3, average_from=1)
    light = NoiseRegularization(steps=1, autocorrelation_rolls=2)
    off = invert(*args, **options)
    on = invert(*args, **options, regularize=light)
    assert torch.isfinite(on.latents).all() and not torch.allclose(on.final, off.final, atol=1e-3)
    assert torch.equal(invert(*args, **options, regularize=light).latents, on.latents)  # seeded
    # plain DDIM (one prediction, nothing averaged) has nothing to regularise
    plain = dict(num_inference_steps=4, renoise_steps=1)
    assert torch.equal(invert(*args, **plain, regularize=light).latents, invert(*args, **plain).latents)


def test_regularisation_pulls_towards_the_reference_statistics_on_video_latents():
    gen = torch.Generator().manual_seed(2)
    eps = 3 * torch.randn(2, 4, 3, 8, 8, generator=gen) + 1  # far from the reference N(0, I) patches
    reference = torch.randn(2, 4, 3, 8, 8, generator=gen)
    only_kl = NoiseRegularization(kl_weight=0.01, autocorrelation_weight=0.0, steps=5)
    out = regularize_noise(eps, reference, only_kl, gen)
    assert out.shape == eps.shape and torch.isfinite(out).all()
    assert patch_kl_divergence(out, reference) < patch_kl_divergence(eps, reference)


def test_invert_to_timesteps_matches_plain_inversion_on_a_shared_grid_and_is_per_sample():
    """With every sample at timestep 900 and 9 steps, the per-sample grid is 100, 200, ..., 900: a
    DDIM inversion along exactly those timesteps; each sample's result does not depend on the others."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from diffpo.kernel.inversion import invert_to_timesteps
    from diffpo.kernel.trajectory import step_coefficients

    scheduler = DDIMScheduler.from_config(DDPMScheduler.from_pretrained("assets/tiny-sd-shapes", subfolder="scheduler").config)
    denoise = lambda x, t, c: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000  # noqa: E731
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = invert_to_timesteps(denoise, scheduler, x0, {}, torch.tensor([900, 900, 900]), 9, renoise_steps=1)
    expected, prev = x0.clone(), torch.full((3,), -1)
    for t in range(100, 1000, 100):
        tt = torch.full((3,), t)
        coef = step_coefficients(scheduler, tt, prev, 0.0, 4)
        expected = (expected - coef.c2 * denoise(expected, tt, {})) / coef.c1
        prev = tt
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    mixed = invert_to_timesteps(denoise, scheduler, x0, {}, torch.tensor([900, 300, 50]), 5)
    alone = invert_to_timesteps(denoise, scheduler, x0[1:2], {}, torch.tensor([300]), 5)
    torch.testing.assert_close(mixed[1:2], alone)


def test_shared_grid_stops_at_the_last_official_point_below_each_timestep():
    """grid="shared" (the official SmPO code's): 5 steps on 1000 train steps visit offset, 200 +
    offset, ...; a sample at t = 550 is inverted through the points below 550 and no further, one
    at t = 0 is returned unchanged, and a batch gives what each sample gives alone."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from diffpo.kernel.inversion import invert_to_timesteps
    from diffpo.kernel.trajectory import step_coefficients

    scheduler = DDIMScheduler.from_config(DDPMScheduler.from_pretrained("assets/tiny-sd-shapes", subfolder="scheduler").config)
    offset = scheduler.config.get("steps_offset", 0)
    denoise = lambda x, t, c: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000  # noqa: E731
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([550, 0, 999])
    out = invert_to_timesteps(denoise, scheduler, x0, {}, timesteps, 5, renoise_steps=1, grid="shared")
    for b, t_b in enumerate(timesteps.tolist()):
        expected, prev = x0[b:b + 1].clone(), torch.full((1,), -1)
        for point in [k * 200 + offset for k in range(5) if k * 200 + offset < t_b]:
            tt = torch.full((1,), point)
            coef = step_coefficients(scheduler, tt, prev, 0.0, 4)
            expected = (expected - coef.c2 * denoise(expected, tt, {})) / coef.c1
            prev = tt
        torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], x0[1])
    with pytest.raises(ValueError, match="inversion grid"):
        invert_to_timesteps(denoise, scheduler, x0, {}, timesteps, 5, grid="coarse")
