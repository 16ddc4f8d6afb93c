"""The sampler layer: each step's log-probability against an independent Gaussian computation, the
ODE against diffusers' own pipelines, DDIM against diffusers' scheduler, on-policy ratio 1 for every
sampler, re-scoring under another model, windows, and the errors for a sampler that does not fit."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from diffpo.kernel.noise_process import DDPMProcess, RectifiedFlowProcess
from diffpo.kernel.samplers import (
    FLOW_SAMPLERS,
    STOCHASTIC_SAMPLERS,
    OffPolicyError,
    SampledTrajectory,
    SamplerMismatch,
    Schedule,
    check_on_policy,
    jittered_flow_sigmas,
    make_sampler,
    max_ratio_error,
    random_window,
)


def ddim_scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def flow_sampler(name, noise_level=None, window=None, shift=3.0):
    return make_sampler(name, RectifiedFlowProcess(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift), noise_level, window)


def toy_denoiser(scale):
    """A denoiser whose output depends on x, t and the conditioning (so guidance matters)."""
    def denoise(x, t, cond):
        return scale * x + cond["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, *[1] * (x.ndim - 1)) * 0.1 \
            + 1e-3 * t.view(-1, *[1] * (x.ndim - 1)).to(x)
    return denoise


COND = {"encoder_hidden_states": torch.ones(3, 2, 4)}
UNCOND = {"encoder_hidden_states": torch.zeros(3, 2, 4)}


# ---- one step against torch.distributions.Normal, by hand ------------------------------------------

def _hand_step():
    """Hand-set tensors: x, v (B=2, 1x2x2) at sigma 0.8 -> 0.6 (sample 0) and 1.0 -> 0.75 (sample 1)."""
    x = torch.tensor([[[[0.5, -1.0], [2.0, 0.25]]], [[[1.5, 0.0], [-0.5, -2.0]]]])
    v = torch.tensor([[[[0.1, 0.2], [-0.3, 0.4]]], [[[-1.0, 0.5], [0.0, 1.0]]]])
    x_next = torch.tensor([[[[0.4, -1.2], [2.1, 0.1]]], [[[1.7, -0.2], [-0.4, -2.3]]]])
    sigmas = torch.tensor([[0.8, 1.0], [0.6, 0.75], [0.0, 0.0]])  # per-sample grids (T+1, B), T = 2
    return x, v, x_next, sigmas


@pytest.mark.parametrize("name", ["flow_sde", "dance_sde", "cps"])
def test_flow_step_logprob_is_an_independent_gaussian(name):
    x, v, x_next, sigmas = _hand_step()
    sampler = flow_sampler(name, noise_level=0.7)
    schedule = Schedule(sigmas[:-1] * 1000, sigmas[1:] * 1000, sigmas)
    out = sampler.step(schedule, torch.tensor([0, 0]), torch.arange(2), x, v, prev_sample=x_next)
    for b, (s, s_next) in enumerate([(0.8, 0.6), (1.0, 0.75)]):
        xd, vd = x[b].double(), v[b].double()
        dt = s_next - s
        if name == "flow_sde":  # Flow-GRPO Eq. 9, sigma = 1 replaced by the (per-sample) schedule's max below 1
            smax = [0.8, 0.75][b]
            std_t = 0.7 * math.sqrt(s / (1 - (smax if s == 1 else s)))
            mean = xd * (1 + std_t**2 / (2 * s) * dt) + vd * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
            std = std_t * math.sqrt(-dt)
        elif name == "dance_sde":  # DanceGRPO: Euler + score correction, std = eta sqrt(-dt)
            x0 = xd - s * vd
            score = -(xd - (1 - s) * x0) / s**2
            mean = xd + dt * vd - 0.5 * 0.7**2 * score * dt
            std = 0.7 * math.sqrt(-dt)
        else:  # CPS: s_t = sigma_next sin(eta pi/2), mean from x0_hat and x1_hat
            st = s_next * math.sin(0.7 * math.pi / 2)
            mean = (xd - s * vd) * (1 - s_next) + (xd + (1 - s) * vd) * math.sqrt(s_next**2 - st**2)
            std = st
        expected = Normal(mean, std).log_prob(x_next[b].double()).mean()
        assert out.log_prob[b].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
        torch.testing.assert_close(out.mean[b].double(), mean, rtol=1e-5, atol=1e-6)


def test_flow_sde_sigma_one_uses_the_schedules_max_below_one_as_flow_grpo():
    sampler = flow_sampler("flow_sde", noise_level=0.7)
    schedule = sampler.schedule(5, (4, 2, 2))
    assert schedule.sigmas[0] == 1.0 and schedule.sigmas[1] < 1
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = sampler.step(schedule, torch.tensor([0]), torch.arange(1), x, v, noise=torch.zeros_like(x))
    s1 = float(schedule.sigmas[1])  # the official code's self.sigmas[1]
    std_t = 0.7 * math.sqrt(1 / (1 - s1))
    assert float(out.std.flatten()[0]) == pytest.approx(std_t * math.sqrt(1 - s1), rel=1e-6)
    assert torch.isfinite(out.log_prob).all()


# ---- diffusers equality -----------------------------------------------------------------------------

def test_ddim_eta_step_equals_diffusers_ddim_step_with_the_same_variance_noise():
    scheduler = ddim_scheduler()
    sampler = make_sampler("ddim", DDPMProcess(scheduler, "epsilon"), scheduler, 0.6)
    schedule = sampler.schedule(20)
    gen = torch.Generator().manual_seed(0)
    for i in (0, 7, 19):
        x, eps, noise = (torch.randn(2, 4, 4, 4, generator=gen) for _ in range(3))
        ours = sampler.step(schedule, torch.full((2,), i), torch.arange(2), x, eps, noise=noise).prev_sample
        theirs = scheduler.step(eps, schedule.timesteps[i], x, eta=0.6, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _sd3_setup(seed=0):
    from diffusers import StableDiffusion3Pipeline

    from diffpo.models.families import FAMILIES
    from diffpo.models.tiny import build_tiny_sd3_components

    parts = build_tiny_sd3_components(seed=seed)
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    family = FAMILIES["StableDiffusion3Pipeline"]
    tokenizers = [parts["tokenizer"], parts["tokenizer_2"], parts["tokenizer_3"]]
    encoders = [parts["text_encoder"], parts["text_encoder_2"], parts["text_encoder_3"]]
    text = family.encode_prompts(tokenizers, encoders, ["a red circle", "a blue square"])
    empty = family.encode_prompts(tokenizers, encoders, ["", ""])
    return pipe, family, text, empty


def test_ode_sampler_equals_stable_diffusion_3_pipeline():
    pipe, family, text, empty = _sd3_setup()
    x_T = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = pipe(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled, negative_prompt_embeds=empty.hidden,
                      negative_pooled_prompt_embeds=empty.pooled, latents=x_T.clone(), num_inference_steps=4,
                      guidance_scale=5.0, height=32, width=32, output_type="latent").images
    process = family.noise_process(pipe.scheduler, "flow")
    sampler = make_sampler("ode", process, family.sampling_scheduler(pipe.scheduler))
    ours = sampler.sample(family.denoiser(pipe.transformer), x_T, {"encoder_hidden_states": text.hidden,
                          "pooled_projections": text.pooled}, {"encoder_hidden_states": empty.hidden,
                          "pooled_projections": empty.pooled}, guidance=5.0, num_inference_steps=4)
    assert ours.steps.numel() == 0 and ours.log_probs.shape == (0, 2)
    torch.testing.assert_close(ours.final, theirs, rtol=1e-5, atol=1e-5)


def test_ode_sampler_equals_flux_pipeline_with_its_dynamic_shift():
    from diffusers import FluxPipeline

    from diffpo.models.families import FAMILIES, pack_latents, unpack_latents
    from diffpo.models.tiny import build_tiny_flux_components

    parts = build_tiny_flux_components(seed=0)
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    family = FAMILIES["FluxPipeline"]
    text = family.encode_prompts([parts["tokenizer"], parts["tokenizer_2"]], [parts["text_encoder"], parts["text_encoder_2"]],
                                 ["a red circle"])
    x_T = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))  # 32 px: the tiny VAE's factor is 2
    with torch.no_grad():
        theirs = pipe(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled, latents=pack_latents(x_T),
                      num_inference_steps=3, guidance_scale=3.5, height=32, width=32, output_type="latent").images
    process = family.noise_process(pipe.scheduler, "flow")
    sampler = make_sampler("ode", process, family.sampling_scheduler(pipe.scheduler))
    ours = sampler.sample(family.denoiser(pipe.transformer, 3.5), x_T, {"encoder_hidden_states": text.hidden,
                          "pooled_projections": text.pooled}, num_inference_steps=3)
    torch.testing.assert_close(ours.final, unpack_latents(theirs, 16, 16), rtol=1e-5, atol=1e-5)


# ---- on-policy ratio and re-scoring -------------------------------------------------------------------

@pytest.mark.parametrize("name", STOCHASTIC_SAMPLERS)
def test_rescoring_with_the_sampling_model_gives_ratio_one(name):
    x_T = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    if name == "ddim":
        scheduler = ddim_scheduler()
        sampler = make_sampler("ddim", DDPMProcess(scheduler, "epsilon"), scheduler, 1.0)
    else:
        sampler = flow_sampler(name)
    traj = sampler.sample(toy_denoiser(0.3), x_T, COND, UNCOND, guidance=4.0, num_inference_steps=6,
                          generator=torch.Generator().manual_seed(1))
    assert traj.log_probs.shape == (traj.steps.numel(), 3) and traj.log_probs.dtype == torch.float32
    assert max_ratio_error(sampler, toy_denoiser(0.3), traj, COND, UNCOND, 4.0) <= 1e-6
    # under another model the log-probability differs, and equals the step computed directly
    step = int(traj.steps[1])
    steps, samples = torch.full((3,), step), torch.arange(3)
    other = sampler.rescore(toy_denoiser(0.5), traj, steps, samples, COND, UNCOND, 4.0)
    assert not torch.allclose(other, traj.log_probs[1])
    x = traj.latents[step]
    u, c = toy_denoiser(0.5)(x, _t(traj, step), UNCOND), toy_denoiser(0.5)(x, _t(traj, step), COND)
    schedule = Schedule(traj.timesteps, traj.prev_timesteps, traj.sigmas)
    direct = sampler.step(schedule, steps, samples, x, u + 4.0 * (c - u), prev_sample=traj.latents[step + 1])
    torch.testing.assert_close(other, direct.log_prob)


def _t(traj, step):
    return traj.timesteps[step].repeat(3)


@pytest.mark.parametrize("name", ["flow_sde", "dance_sde", "cps"])
def test_on_policy_ratio_is_one_on_the_tiny_sd3_transformer(name):
    pipe, family, text, empty = _sd3_setup()
    sampler = make_sampler(name, family.noise_process(pipe.scheduler, "flow"), family.sampling_scheduler(pipe.scheduler))
    cond = {"encoder_hidden_states": text.hidden, "pooled_projections": text.pooled}
    uncond = {"encoder_hidden_states": empty.hidden, "pooled_projections": empty.pooled}
    denoise = family.denoiser(pipe.transformer)
    x_T = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    traj = sampler.sample(denoise, x_T, cond, uncond, 4.5, 4, torch.Generator().manual_seed(4))
    assert max_ratio_error(sampler, denoise, traj, cond, uncond, 4.5) <= 1e-6
    # one transition per sample at different steps, re-scored in one batch, equals the stored log-probs
    steps = traj.steps[torch.tensor([0, len(traj.steps) - 1])]
    logp = sampler.rescore(denoise, traj, steps, torch.arange(2), cond, uncond, 4.5)
    torch.testing.assert_close(logp, traj.recorded_log_probs(steps, torch.arange(2)), rtol=0, atol=1e-5)


# ---- windows, schedules, records -------------------------------------------------------------------

@pytest.mark.parametrize("name", FLOW_SAMPLERS[:3] + ("ddim",))
def test_window_records_only_its_steps_and_the_rest_is_deterministic(name):
    x_T = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    cond, uncond = ({k: v[:2] for k, v in c.items()} for c in (COND, UNCOND))
    if name == "ddim":
        scheduler = ddim_scheduler()
        sampler = make_sampler("ddim", DDPMProcess(scheduler, "epsilon"), scheduler, 1.0, window=(2, 4))
    else:
        sampler = flow_sampler(name, window=(2, 4))
    runs = [sampler.sample(toy_denoiser(0.3), x_T, cond, uncond, 3.0, 6, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert runs[0].steps.tolist() == [2, 3] and runs[0].log_probs.shape == (2, 2)
    # before the window both seeds walk the same deterministic path; inside it they diverge
    assert torch.equal(runs[0].latents[2], runs[1].latents[2])
    assert not torch.allclose(runs[0].latents[3], runs[1].latents[3])
    assert max_ratio_error(sampler, toy_denoiser(0.3), runs[0], cond, uncond, 3.0) <= 1e-6
    with pytest.raises(ValueError, match="no log-probability"):
        sampler.rescore(toy_denoiser(0.3), runs[0], torch.tensor([0, 0]), torch.arange(2), cond, uncond, 3.0)
    # a per-call window overrides the configured one
    assert sampler.sample(toy_denoiser(0.3), x_T, cond, uncond, 3.0, 6, window=(0, 1)).steps.tolist() == [0]


def test_random_window_covers_its_range_and_fits():
    gen = torch.Generator().manual_seed(0)
    starts = {random_window(3, 1, 6, gen)[0] for _ in range(200)}
    assert starts == {1, 2, 3} and random_window(2, 0, 2) == (0, 2)
    with pytest.raises(ValueError, match="does not fit"):
        random_window(4, 0, 3)


def test_rescore_step_gives_the_gaussian_of_flow_grpo_kl():
    sampler = flow_sampler("flow_sde")
    traj = sampler.sample(toy_denoiser(0.3), torch.randn(3, 4, 2, 2), COND, UNCOND, 2.0, 4)
    steps, samples = torch.full((3,), 1), torch.arange(3)
    policy = sampler.rescore_step(toy_denoiser(0.3), traj, steps, samples, COND, UNCOND, 2.0)
    ref = sampler.rescore_step(toy_denoiser(0.4), traj, steps, samples, COND, UNCOND, 2.0)
    torch.testing.assert_close(policy.log_prob, traj.log_probs[1], rtol=0, atol=0)
    # the log-ratio of two Gaussians with one std at x' is linear in x': check it against the means
    x_next = traj.latents[2].float()
    direct = (((x_next - ref.mean) ** 2 - (x_next - policy.mean) ** 2) / (2 * policy.std**2)).flatten(1).mean(1)
    torch.testing.assert_close(policy.log_prob - ref.log_prob, direct, rtol=1e-4, atol=1e-5)


def test_cps_last_step_is_deterministic_and_not_recorded():
    traj = flow_sampler("cps").sample(toy_denoiser(0.3), torch.randn(3, 4, 2, 2), COND, UNCOND, 2.0, 5)
    assert traj.steps.tolist() == [0, 1, 2, 3]


def test_flow_schedule_is_the_schedulers_and_jitter_keeps_grids_decreasing():
    sampler = flow_sampler("flow_sde")
    schedule = sampler.schedule(8, (16, 4, 4))
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(8)
    assert torch.equal(schedule.sigmas, reference.sigmas) and torch.equal(schedule.timesteps, reference.timesteps)
    sigmas = jittered_flow_sigmas(RectifiedFlowProcess(shift=3.0), 6, 4, (16, 4, 4), True, torch.Generator().manual_seed(0))
    assert sigmas.shape == (7, 4) and (sigmas[:-1] > sigmas[1:]).all() and (sigmas[-1] == 0).all() and (sigmas <= 1).all()
    assert not torch.equal(sigmas[:, 0], sigmas[:, 1])
    flat = jittered_flow_sigmas(RectifiedFlowProcess(shift=1.0), 4, 2, (16, 4, 4), False)
    torch.testing.assert_close(flat[:, 0], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # a trajectory on per-sample grids re-scores to ratio 1 as well
    traj = sampler.sample(toy_denoiser(0.3), torch.randn(4, 16, 4, 4), {"encoder_hidden_states": torch.ones(4, 2, 4)},
                          guidance=1.0, schedule=sampler.per_sample_schedule(sigmas), record_outputs="guided")
    assert traj.timesteps.shape == (6, 4) and traj.outputs.shape == (6, 4, 16, 4, 4)
    assert max_ratio_error(sampler, toy_denoiser(0.3), traj, {"encoder_hidden_states": torch.ones(4, 2, 4)}) <= 1e-6


def test_trajectory_state_round_trips_and_old_round_files_read_as_ddim(tmp_path):
    from diffpo.serialization import load_state_file, save_state_file

    sampler = flow_sampler("dance_sde", window=(1, 3))
    traj = sampler.sample(toy_denoiser(0.3), torch.randn(3, 4, 2, 2), COND, UNCOND, 2.0, 4)
    save_state_file(traj.state_dict(), tmp_path / "t.safetensors")
    back = SampledTrajectory.from_state_dict(load_state_file(tmp_path / "t.safetensors"))
    assert back.spec == traj.spec and back.model_dtype == torch.float32
    for key in ("latents", "timesteps", "prev_timesteps", "sigmas", "steps", "log_probs"):
        assert torch.equal(getattr(back, key), getattr(traj, key))
    old = {"latents": torch.zeros(3, 2, 1), "timesteps": torch.tensor([501, 1]), "prev_timesteps": torch.tensor([1, -1]),
           "log_probs": torch.zeros(2, 2), "eta": 0.5}
    ddim = SampledTrajectory.from_state_dict(old)
    assert ddim.spec.name == "ddim" and ddim.spec.noise_level == 0.5 and ddim.steps.tolist() == [0, 1]


# ---- errors -------------------------------------------------------------------------------------------

def test_a_sampler_that_does_not_fit_the_noise_process_names_the_valid_ones():
    scheduler = ddim_scheduler()
    with pytest.raises(SamplerMismatch, match="^sampler 'flow_sde' does not fit a DDPM model: use one of ddim$"):
        make_sampler("flow_sde", DDPMProcess(scheduler, "epsilon"), scheduler)
    with pytest.raises(SamplerMismatch, match="use one of flow_sde, dance_sde, cps, ode$"):
        make_sampler("ddim", RectifiedFlowProcess(), FlowMatchEulerDiscreteScheduler())
    with pytest.raises(SamplerMismatch, match="unknown"):
        make_sampler("euler_a", RectifiedFlowProcess(), FlowMatchEulerDiscreteScheduler())
    assert make_sampler("auto", RectifiedFlowProcess(), FlowMatchEulerDiscreteScheduler()).spec.name == "flow_sde"
    assert make_sampler("auto", DDPMProcess(scheduler, "epsilon"), scheduler).spec.name == "ddim"


def test_rescoring_with_another_sampler_and_the_on_policy_error_are_explicit():
    traj = flow_sampler("flow_sde").sample(toy_denoiser(0.3), torch.randn(3, 4, 2, 2), COND, UNCOND, 2.0, 3)
    with pytest.raises(ValueError, match="sampled with sampler flow_sde"):
        flow_sampler("flow_sde", noise_level=0.5).rescore(toy_denoiser(0.3), traj, torch.zeros(3, dtype=torch.long),
                                                          torch.arange(3), COND, UNCOND, 2.0)
    check_on_policy(1e-7, 1e-6, traj.spec, torch.float32)
    with pytest.raises(OffPolicyError, match="bfloat16 and sampler flow_sde \\(noise_level=0.7, stochastic on all steps\\)"):
        check_on_policy(0.02, 1e-3, traj.spec, torch.bfloat16)
    with pytest.raises(OffPolicyError):
        check_on_policy(float("nan"), 1e-3, traj.spec, torch.float32)


# ---- the official step code, rewritten from its source, on the same tensors ---------------------------

def _flow_grpo_sde_step(scheduler, model_output, timestep, sample, noise_level, prev_sample):
    """yifan123/flow_grpo (ac4c86e) ``sd3_sde_with_logprob.sde_step_with_logprob``: sigmas looked up
    from the scheduler by timestep, sigma_max = ``self.sigmas[1]``."""
    step_index = [scheduler.index_for_timestep(t) for t in timestep]
    sigma = scheduler.sigmas[step_index].view(-1, 1, 1, 1)
    sigma_prev = scheduler.sigmas[[i + 1 for i in step_index]].view(-1, 1, 1, 1)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * torch.sqrt(-1 * dt)
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _dance_grpo_flux_step(model_output, latents, eta, sigmas, index, prev_sample):
    """XueZeyue/DanceGRPO (15cc71d) ``train_grpo_flux.flux_step`` with grpo=True, sde_solver=True."""
    sigma = sigmas[index]
    dsigma = sigmas[index + 1] - sigma
    mean = latents + dsigma * model_output
    x0 = latents - sigma * model_output
    std = eta * math.sqrt(sigma - sigmas[index + 1])
    score = -(latents - x0 * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score) * dsigma
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - math.log(std) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def test_flow_sde_equals_the_official_flow_grpo_step_at_every_step():
    sampler = flow_sampler("flow_sde", noise_level=0.7)
    traj = sampler.sample(toy_denoiser(0.3), torch.randn(3, 4, 3, 3), COND, UNCOND, 4.5, 10,
                          torch.Generator().manual_seed(0), record_outputs="guided")
    official = FlowMatchEulerDiscreteScheduler(shift=3.0)
    official.set_timesteps(10)
    for i in range(10):  # the first step has sigma = 1 (sigma_max rule), the last sigma_next = 0
        theirs = _flow_grpo_sde_step(official, traj.outputs[i], official.timesteps[i].repeat(3), traj.latents[i], 0.7,
                                     traj.latents[i + 1])
        torch.testing.assert_close(traj.log_probs[i], theirs, rtol=1e-5, atol=1e-5)


def test_dance_sde_equals_the_official_dance_grpo_step_on_its_schedule():
    from diffpo.kernel.noise_process import static_shift

    sigmas = static_shift(torch.linspace(1, 0, 6), 3.0)  # DanceGRPO's sigma_schedule: sd3_time_shift of linspace(1, 0)
    sampler = flow_sampler("dance_sde", noise_level=0.3)
    schedule = sampler.per_sample_schedule(sigmas[:, None].repeat(1, 3))
    traj = sampler.sample(toy_denoiser(0.3), torch.randn(3, 4, 3, 3), COND, UNCOND, 3.5, schedule=schedule,
                          generator=torch.Generator().manual_seed(0), record_outputs="guided")
    for i in range(5):
        theirs = _dance_grpo_flux_step(traj.outputs[i], traj.latents[i], 0.3, sigmas, i, traj.latents[i + 1])
        torch.testing.assert_close(traj.log_probs[i], theirs, rtol=1e-5, atol=1e-5)
