"""One sampler layer for online methods: stochastic samplers that record the exact Gaussian
log-probability of every step they take, deterministic ODE sampling, and re-scoring of a stored
transition under any other model (policy, reference, old policy).

A stochastic step is x_next ~ N(mu_theta(x, t), std^2 I) with a std that does not depend on the
model, so the log-probability of a stored step under another model is a closed form of that
model's output there. Convention (diffpo's, DDPO's, Flow-GRPO's and DanceGRPO's): the recorded
log-probability is the **mean over all non-batch dims** of the per-element Gaussian log-density,
computed in fp32 whatever the model dtype: (B,) per step.

Samplers (``SAMPLERS``; the noise process of the model decides which are valid):

* ``ddim`` (DDPM models; DDIM, Song et al. 2021, Eq. 12 and 16): eta = ``noise_level``;
  ``diffpo.kernel.trajectory`` holds its step, reused here unchanged.
* ``flow_sde`` (rectified flow; Flow-GRPO, Liu et al. 2025, Eq. 8-9): with a = ``noise_level``,
  s = a sqrt(sigma / (1 - sigma)) (sigma = 1 in the denominator replaced by the largest sigma of the
  schedule below 1, as the official code), dt = sigma_next - sigma < 0,
  mu = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt, std = s sqrt(-dt).
* ``dance_sde`` (rectified flow; DanceGRPO, Xue et al. 2025, Eq. 6-7 and the official
  ``flux_step``): with eta = ``noise_level``, x0_hat = x - sigma v, score = -(x - (1 - sigma) x0_hat) / sigma^2,
  mu = x + dt v - eta^2 / 2 score dt, std = eta sqrt(-dt).
* ``cps`` (rectified flow; coefficients-preserving sampling, Wang & Yu 2025, Eq. 11): with
  s = sigma_next sin(eta pi / 2), x0_hat = x - sigma v, x1_hat = x + (1 - sigma) v,
  mu = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) x1_hat, std = s. Its last step
  (sigma_next = 0) has std 0: it is taken deterministically and not recorded. The official code's
  CPS "log-prob" drops the Gaussian's 1/(2 s^2) and constants (-||x_next - mu||^2); diffpo records the
  exact Gaussian log-density, so its ratios are those of the true transition kernel.
* ``ode`` (rectified flow): Euler steps x_next = x + dt v, as ``FlowMatchEulerDiscreteScheduler``
  (and so ``StableDiffusion3Pipeline`` / ``FluxPipeline``); no log-probabilities.

A ``window`` (start, end) makes only steps start <= i < end stochastic and recorded; the others are
the deterministic step of the same family (DDIM eta = 0, or Euler), as MixGRPO and Flow-GRPO-Fast
sample. Classifier-free guidance is applied to the model output before every step (optional).

The flow samplers keep the trajectory in fp32 (the model sees it cast to the dtype of ``x_T``);
``ddim`` keeps the dtype of ``x_T`` as ``diffpo.kernel.trajectory`` always has, and ``ode`` steps as
the diffusers scheduler does (fp32 arithmetic, the state cast back to the model dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffpo.kernel.trajectory import (
    Denoiser,
    ddim_mean,
    epsilon_from_prediction,
    gaussian_logprob,
    guided,
    guided_and_conditional,
    step_coefficients,
)

SAMPLERS = ("ddim", "flow_sde", "dance_sde", "cps", "ode")
DDPM_SAMPLERS = ("ddim",)
FLOW_SAMPLERS = ("flow_sde", "dance_sde", "cps", "ode")
STOCHASTIC_SAMPLERS = ("ddim", "flow_sde", "dance_sde", "cps")
# the official defaults: DDPO/D3PO eta 1, Flow-GRPO a = 0.7, DanceGRPO eta = 0.3, Flow-GRPO's CPS configs 0.8
DEFAULT_NOISE_LEVELS = {"ddim": 1.0, "flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.8, "ode": 0.0}


class SamplerMismatch(ValueError):
    """A sampler that does not fit the model's noise process (or an unknown sampler name)."""


@dataclass(frozen=True)
class SamplerSpec:
    """What a trajectory was sampled with: enough, with the model, to re-score any of its steps.
    ``noise_level`` is the sampler's one stochasticity knob (DDIM eta, Flow-GRPO a, DanceGRPO eta, CPS eta);
    ``window`` = (start, end) step indices that are stochastic and recorded (None: every step)."""

    name: str
    noise_level: float
    window: tuple[int, int] | None = None

    def describe(self) -> str:
        window = "all steps" if self.window is None else f"steps [{self.window[0]}, {self.window[1]})"
        return f"sampler {self.name} (noise_level={self.noise_level:g}, stochastic on {window})"


@dataclass
class StepOutput:
    """One step: the next latent, its log-probability (B,) fp32 (None for a deterministic step), and
    the Gaussian's mean and std (std broadcastable over the latent; 0 for a deterministic step)."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class SampledTrajectory:
    """A sampled trajectory.

    * ``latents`` (T+1, B, ...): x at every point, x_T first, x_0 last (flow samplers: fp32);
    * ``timesteps`` (T,) or (T, B): what the denoiser was given at each step (DDPM: integer steps;
      flow: sigma * num_train_timesteps); ``prev_timesteps`` the same for each step's end point
      (DDIM: -1 at the end, the final alpha);
    * ``sigmas`` (T+1,) or (T+1, B): flow samplers' noise levels (empty for DDIM);
    * ``steps`` (S,): the transitions that were stochastic and recorded, ascending;
      ``log_probs`` (S, B) fp32: their log-probabilities under the sampling model;
    * ``outputs`` (T, B, ...): the model output at every step when asked for (``record_outputs``:
      "guided", the output that stepped the sampler, or "conditional", the conditional one; else None);
    * ``spec``: the sampler; ``model_dtype``: the dtype the model was given (re-scoring feeds the
      stored latents in the same one)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    sigmas: torch.Tensor
    steps: torch.Tensor
    log_probs: torch.Tensor
    spec: SamplerSpec
    outputs: torch.Tensor | None = None
    model_dtype: torch.dtype | None = None  # None: the stored latents' dtype

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]

    @property
    def num_steps(self) -> int:
        return int(self.latents.shape[0]) - 1

    def recorded_log_probs(self, steps: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """The stored log-probabilities (N,) of transitions (``steps[n]``, ``samples[n]``)."""
        rows = _rows_of(self.steps, steps)
        return self.log_probs[rows, samples.cpu()]

    def state_dict(self) -> dict:
        """Tensors and plain values for ``diffpo.serialization.save_state_file``."""
        state = {"latents": self.latents.cpu(), "timesteps": self.timesteps.cpu(), "prev_timesteps": self.prev_timesteps.cpu(),
                 "sigmas": self.sigmas.cpu(), "steps": self.steps.cpu(), "log_probs": self.log_probs.cpu(),
                 "sampler": self.spec.name, "noise_level": self.spec.noise_level,
                 "window": list(self.spec.window) if self.spec.window is not None else [],
                 "model_dtype": str(self.model_dtype or self.latents.dtype).replace("torch.", "")}
        if self.outputs is not None:
            state["outputs"] = self.outputs.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "SampledTrajectory":
        """The inverse of ``state_dict``; a D3PO round file written before samplers existed (keys
        latents, timesteps, prev_timesteps, log_probs, eta) reads as a DDIM trajectory."""
        latents = state["latents"].to(device) if device is not None else state["latents"]
        if "sampler" not in state:
            steps = torch.arange(state["timesteps"].shape[0])
            spec = SamplerSpec("ddim", float(state["eta"]))
            return cls(latents, state["timesteps"], state["prev_timesteps"], torch.zeros(0), steps, state["log_probs"], spec)
        window = tuple(int(v) for v in state["window"]) or None
        spec = SamplerSpec(str(state["sampler"]), float(state["noise_level"]), window)
        return cls(latents, state["timesteps"], state["prev_timesteps"], state["sigmas"], state["steps"], state["log_probs"],
                   spec, state.get("outputs"), getattr(torch, str(state["model_dtype"])))


def _rows_of(recorded: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Rows of ``recorded`` holding ``steps``; an unrecorded (deterministic) step is an error."""
    steps = steps.cpu()
    lookup = torch.full((int(max(recorded.max().item() if recorded.numel() else 0, steps.max().item())) + 1,), -1,
                        dtype=torch.long)
    lookup[recorded.cpu()] = torch.arange(recorded.numel())
    rows = lookup[steps]
    if (rows < 0).any():
        missing = sorted(set(steps[rows < 0].tolist()))
        raise ValueError(f"steps {missing} were taken deterministically (outside the window, or CPS's last step): "
                         f"they have no log-probability; re-score only trajectory.steps ({recorded.tolist()})")
    return rows


def _at(values: torch.Tensor, steps: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """values[steps] for a shared schedule (T,), values[steps, samples] for per-sample ones (T, B)."""
    return values[steps] if values.ndim == 1 else values[steps, samples]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _normal_noise(shape, generator, device) -> torch.Tensor:
    """Standard normal noise drawn in fp32 on the CPU (a seed gives the same numbers on every device)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


# ------------------------------------------------------------------------------------------------
# Flow steps: pure functions of (x, v, sigma, sigma_next) in fp32
# ------------------------------------------------------------------------------------------------


def flow_sde_mean_std(sample, velocity, sigma, sigma_next, noise_level: float, sigma_max):
    """Flow-GRPO's SDE step (Liu et al. 2025, Eq. 9): the score-corrected Euler-Maruyama mean and the
    step std. ``sigma``, ``sigma_next``, ``sigma_max`` broadcast over the latent (fp32)."""
    dt = sigma_next - sigma
    s = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, sigma_max, sigma)))
    mean = sample * (1 + s**2 / (2 * sigma) * dt) + velocity * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * torch.sqrt(-dt)


def dance_sde_mean_std(sample, velocity, sigma, sigma_next, noise_level: float):
    """DanceGRPO's SDE step (Xue et al. 2025, Eq. 7; the official ``flux_step`` with sde_solver): Euler
    plus the score term -eta^2/2 * score * dt, score = -(x - (1 - sigma) x0_hat) / sigma^2."""
    dt = sigma_next - sigma
    x0_hat = sample - sigma * velocity
    score = -(sample - (1 - sigma) * x0_hat) / sigma**2
    mean = sample + dt * velocity - 0.5 * noise_level**2 * score * dt
    return mean, noise_level * torch.sqrt(-dt)


def cps_mean_std(sample, velocity, sigma, sigma_next, noise_level: float):
    """Coefficients-preserving sampling (Wang & Yu 2025, Eq. 11): x_next keeps total noise variance
    sigma_next^2 split into a deterministic part sqrt(sigma_next^2 - s^2) x1_hat and fresh noise s."""
    s = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat = sample - sigma * velocity
    x1_hat = sample + (1 - sigma) * velocity
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - s**2).clamp(min=0)) * x1_hat
    return mean, s


def euler_step(sample, velocity, sigma, sigma_next):
    """The flow ODE's Euler step x + (sigma_next - sigma) v (``FlowMatchEulerDiscreteScheduler.step``)."""
    return sample + (sigma_next - sigma) * velocity


def _sigma_max_below_one(sigmas: torch.Tensor) -> torch.Tensor:
    """The schedule's largest sigma below 1 (per sample for per-sample schedules (T+1, B))."""
    below = torch.where(sigmas < 1, sigmas, torch.zeros_like(sigmas))
    return below.max(dim=0).values


# ------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """A sampling schedule: model timesteps (T,) or (T, B), their successors, and (flow) sigmas (T+1,) or (T+1, B)."""

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    sigmas: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


class Sampler:
    """A sampler bound to a model's noise process. Build it with ``make_sampler``.

    * ``schedule(num_inference_steps, latent_shape)`` -> ``Schedule``;
    * ``step(schedule, steps, samples, sample, output, prev_sample=None, noise=None, generator=None,
      stochastic=True)`` -> ``StepOutput``: one step of samples ``samples`` at step indices ``steps``
      from the (guided) model output; with ``prev_sample`` it scores instead of drawing;
    * ``sample(denoise, x_T, cond, ...)`` -> ``SampledTrajectory``;
    * ``rescore(denoise, trajectory, steps, samples, cond, ...)`` -> log-probs (N,) fp32.
    """

    spec: SamplerSpec

    def __init__(self, spec: SamplerSpec):
        self.spec = spec

    @property
    def stochastic(self) -> bool:
        """Whether the sampler records log-probabilities (ode, and noise_level 0, do not)."""
        return self.spec.name in STOCHASTIC_SAMPLERS and self.spec.noise_level > 0

    def schedule(self, num_inference_steps: int, latent_shape) -> Schedule:
        raise NotImplementedError

    def step(self, schedule: Schedule, steps: torch.Tensor, samples: torch.Tensor, sample: torch.Tensor, output: torch.Tensor,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, stochastic: bool = True) -> StepOutput:
        raise NotImplementedError

    def is_recorded(self, index: int, num_steps: int, window: tuple[int, int] | None) -> bool:
        """Whether step ``index`` of ``num_steps`` is stochastic (and its log-probability recorded)."""
        if not self.stochastic:
            return False
        if window is not None and not window[0] <= index < window[1]:
            return False
        return True

    def model_input(self, sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return sample.to(dtype)

    def initial_state(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    @torch.no_grad()
    def sample(self, denoise: Denoiser, latents: torch.Tensor, cond: dict, uncond: dict | None = None,
               guidance: float = 1.0, num_inference_steps: int = 20, generator: torch.Generator | None = None,
               window: tuple[int, int] | None | str = "config", record_outputs: str | None = None,
               schedule: Schedule | None = None) -> SampledTrajectory:
        """Sample from x_T = ``latents`` (the model sees the dtype of ``latents``), recording the
        log-probability of every stochastic step. ``window``: "config" uses the sampler's own; a
        (start, end) pair or None overrides it for this call (Flow-GRPO-Fast draws one per batch).
        ``schedule`` overrides the sampler's (per-sample grids, as Diffusion-DRO jitters them);
        ``record_outputs`` ("guided" / "conditional") keeps the model output of every step."""
        if record_outputs not in (None, "guided", "conditional"):
            raise ValueError(f"record_outputs={record_outputs!r} is unknown: use 'guided', 'conditional' or None")
        window = self.spec.window if isinstance(window, str) else (tuple(window) if window is not None else None)
        schedule = schedule or self.schedule(num_inference_steps, latents.shape[1:])
        num_steps = schedule.timesteps.shape[0]
        _check_window(window, num_steps)
        model_dtype, b = latents.dtype, latents.shape[0]
        samples = torch.arange(b)
        sample = self.initial_state(latents)
        history, log_probs, recorded, outputs = [sample], [], [], []
        for i in range(num_steps):
            steps = torch.full((b,), i, dtype=torch.long)
            t = _at(schedule.timesteps, steps, samples).to(latents.device)
            output, conditional = guided_and_conditional(denoise, self.model_input(sample, model_dtype), t, cond, uncond, guidance)
            stochastic = self.is_recorded(i, num_steps, window)
            result = self.step(schedule, steps, samples, sample, output, generator=generator, stochastic=stochastic)
            sample = result.prev_sample
            history.append(sample)
            if record_outputs:
                outputs.append(output if record_outputs == "guided" else conditional)
            if stochastic and result.log_prob is not None:
                recorded.append(i)
                log_probs.append(result.log_prob)
        log_probs = torch.stack(log_probs) if log_probs else torch.zeros(0, b)
        spec = SamplerSpec(self.spec.name, self.spec.noise_level, window)
        return SampledTrajectory(torch.stack(history), schedule.timesteps, schedule.prev_timesteps, schedule.sigmas,
                                 torch.tensor(recorded, dtype=torch.long), log_probs, spec,
                                 torch.stack(outputs) if record_outputs else None, model_dtype)

    def rescore(self, denoise: Denoiser, trajectory: SampledTrajectory, steps: torch.Tensor, samples: torch.Tensor,
                cond: dict, uncond: dict | None = None, guidance: float = 1.0) -> torch.Tensor:
        """Log-probabilities (N,) fp32 of N stored transitions, transition n being step ``steps[n]`` of
        trajectory sample ``samples[n]``, under ``denoise`` (one batched forward; with grad if enabled).
        ``cond``/``uncond`` hold one row per transition."""
        return self.rescore_step(denoise, trajectory, steps, samples, cond, uncond, guidance).log_prob

    def rescore_step(self, denoise: Denoiser, trajectory: SampledTrajectory, steps: torch.Tensor, samples: torch.Tensor,
                     cond: dict, uncond: dict | None = None, guidance: float = 1.0) -> StepOutput:
        """As ``rescore``, with the step's Gaussian: ``mean`` (N, ...) fp32 and ``std`` under ``denoise``
        (Flow-GRPO's KL to the reference is ||mean_theta - mean_ref||^2 / (2 std^2), per element)."""
        _check_spec(self.spec, trajectory.spec)
        steps, samples = steps.cpu(), samples.cpu()
        _rows_of(trajectory.steps, steps)  # only recorded (stochastic) steps have a log-probability
        sample = trajectory.latents[steps, samples]
        prev_sample = trajectory.latents[steps + 1, samples]
        schedule = Schedule(trajectory.timesteps, trajectory.prev_timesteps, trajectory.sigmas)
        t = _at(schedule.timesteps, steps, samples).to(sample.device)
        model_dtype = trajectory.model_dtype or sample.dtype
        output = guided(denoise, self.model_input(sample, model_dtype), t, cond, uncond, guidance)
        return self.step(schedule, steps, samples, sample, output, prev_sample=prev_sample)


def _check_window(window, num_steps: int) -> None:
    if window is None:
        return
    start, end = window
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"sampler window [{start}, {end}) must satisfy 0 <= start < end <= num_inference_steps={num_steps}")


def _check_spec(sampler: SamplerSpec, stored: SamplerSpec) -> None:
    if (sampler.name, sampler.noise_level) != (stored.name, stored.noise_level):
        raise ValueError(f"this trajectory was sampled with {stored.describe()}; re-score it with the same sampler, "
                         f"not {sampler.describe()}")


class DDIMSampler(Sampler):
    """DDIM with eta = ``noise_level`` on a DDPM model (``diffpo.kernel.trajectory``'s step; steps
    outside the window use eta = 0). ``scheduler`` is a ``DDIMScheduler``."""

    def __init__(self, spec: SamplerSpec, scheduler, prediction_type: str):
        super().__init__(spec)
        self.scheduler = scheduler
        self.prediction_type = prediction_type

    def schedule(self, num_inference_steps: int, latent_shape=None) -> Schedule:
        from diffpo.kernel.trajectory import sampling_timesteps

        steps, prevs = sampling_timesteps(self.scheduler, num_inference_steps)
        return Schedule(steps, prevs)

    def step(self, schedule, steps, samples, sample, output, prev_sample=None, noise=None, generator=None, stochastic=True):
        t = _at(schedule.timesteps, steps, samples)
        prev_t = _at(schedule.prev_timesteps, steps, samples)
        eta = self.spec.noise_level if stochastic else 0.0
        coef = step_coefficients(self.scheduler, t, prev_t, eta, sample.ndim)
        eps = epsilon_from_prediction(output, sample, coef.alpha_t.to(sample), self.prediction_type)
        mean = ddim_mean(coef, sample, eps)
        std = coef.sigma.to(sample)
        if eta == 0:
            return StepOutput(mean if prev_sample is None else prev_sample, None, mean, std)
        if prev_sample is None:
            noise = noise.to(sample) if noise is not None else _normal_noise(sample.shape, generator, sample.device).to(sample)
            prev_sample = mean + std * noise
        return StepOutput(prev_sample, gaussian_logprob(prev_sample, mean, coef.sigma.to(sample.device)), mean, std)


class FlowSampler(Sampler):
    """The rectified-flow samplers (``flow_sde``, ``dance_sde``, ``cps``, ``ode``) on a
    ``FlowMatchEulerDiscreteScheduler`` schedule. ``dynamic_mu(latent_shape)`` gives FLUX's
    resolution-dependent shift (None: the scheduler's static shift)."""

    def __init__(self, spec: SamplerSpec, scheduler, dynamic_mu=None):
        super().__init__(spec)
        self.scheduler = scheduler
        self.dynamic_mu = dynamic_mu
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def schedule(self, num_inference_steps: int, latent_shape=None) -> Schedule:
        """The pipeline's own schedule: SD3 ``set_timesteps(N)``; with a dynamic shift, FLUX's
        sigmas linspace(1, 1/N, N) shifted by mu of the image token count."""
        if self.dynamic_mu is not None:
            import numpy as np

            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps),
                                         mu=self.dynamic_mu(latent_shape))
        else:
            self.scheduler.set_timesteps(num_inference_steps)
        sigmas = self.scheduler.sigmas.float().cpu()
        timesteps = self.scheduler.timesteps.float().cpu()
        return Schedule(timesteps, sigmas[1:] * self.num_train_timesteps, sigmas)

    def per_sample_schedule(self, sigmas: torch.Tensor) -> Schedule:
        """A schedule from per-sample sigmas (T+1, B), each column decreasing to 0."""
        sigmas = sigmas.float().cpu()
        return Schedule(sigmas[:-1] * self.num_train_timesteps, sigmas[1:] * self.num_train_timesteps, sigmas)

    def initial_state(self, latents):
        return latents if self.spec.name == "ode" else latents.float()

    def is_recorded(self, index, num_steps, window):
        if self.spec.name == "cps" and index == num_steps - 1:
            return False  # sigma_next = 0: CPS's std is 0, the step is deterministic
        return super().is_recorded(index, num_steps, window)

    def step(self, schedule, steps, samples, sample, output, prev_sample=None, noise=None, generator=None, stochastic=True):
        x, v = sample.float(), output.float()
        sigma = _expand(_at(schedule.sigmas, steps, samples), x).to(x.device)
        sigma_next = _expand(_at(schedule.sigmas, steps + 1, samples), x).to(x.device)
        name = self.spec.name
        if name == "ode" or not stochastic:
            if name == "cps":  # CPS with s = 0 is the DDIM-like deterministic step
                mean, _ = cps_mean_std(x, v, sigma, sigma_next, 0.0)
            else:
                mean = euler_step(x, v, sigma, sigma_next)
            nxt = mean.to(sample.dtype) if prev_sample is None else prev_sample
            return StepOutput(nxt, None, mean, torch.zeros_like(sigma))
        if name == "flow_sde":
            sigma_max = _sigma_max_below_one(schedule.sigmas)
            sigma_max = _expand(sigma_max if sigma_max.ndim == 0 else sigma_max[samples], x).to(x.device)
            mean, std = flow_sde_mean_std(x, v, sigma, sigma_next, self.spec.noise_level, sigma_max)
        elif name == "dance_sde":
            mean, std = dance_sde_mean_std(x, v, sigma, sigma_next, self.spec.noise_level)
        else:
            mean, std = cps_mean_std(x, v, sigma, sigma_next, self.spec.noise_level)
        if prev_sample is None:
            noise = noise.float().to(x.device) if noise is not None else _normal_noise(x.shape, generator, x.device)
            prev_sample = mean + std * noise
        return StepOutput(prev_sample, gaussian_logprob(prev_sample, mean, std.expand_as(sigma)), mean, std)


def make_sampler(name: str, process, scheduler, noise_level: float | None = None, window=None,
                 prediction_type: str = "epsilon") -> Sampler:
    """The sampler ``name`` for a model with noise process ``process`` (``DDPMProcess`` or
    ``RectifiedFlowProcess``) and its sampling ``scheduler`` (DDIM: a ``DDIMScheduler``; flow: the
    model's ``FlowMatchEulerDiscreteScheduler``, used for its schedule). ``name="auto"``: ``ddim``
    on DDPM models, ``flow_sde`` on flow models. ``noise_level`` None: the sampler's official default.
    A sampler that does not fit the process raises ``SamplerMismatch`` naming the valid ones."""
    from diffpo.kernel.noise_process import DDPMProcess, RectifiedFlowProcess

    is_flow = isinstance(process, RectifiedFlowProcess)
    if not is_flow and not isinstance(process, DDPMProcess):
        raise SamplerMismatch(f"no sampler for noise process {type(process).__name__}")
    valid = FLOW_SAMPLERS if is_flow else DDPM_SAMPLERS
    kind = "a rectified-flow" if is_flow else "a DDPM"
    if name == "auto":
        name = "flow_sde" if is_flow else "ddim"
    if name not in SAMPLERS:
        raise SamplerMismatch(f"sampler {name!r} is unknown: for {kind} model use one of {', '.join(valid)}")
    if name not in valid:
        raise SamplerMismatch(f"sampler {name!r} does not fit {kind} model: use one of {', '.join(valid)}")
    level = DEFAULT_NOISE_LEVELS[name] if noise_level is None else float(noise_level)
    if level < 0:
        raise SamplerMismatch(f"sampler {name} needs noise_level >= 0 (0: deterministic, no log-probabilities), got {level}")
    if name == "cps" and level > 1:
        raise SamplerMismatch(f"sampler cps needs noise_level in (0, 1] (s = sigma_next sin(noise_level pi/2)), got {level}")
    spec = SamplerSpec(name, level, tuple(window) if window is not None else None)
    if not is_flow:
        return DDIMSampler(spec, scheduler, prediction_type)
    if process.dynamic is None:
        return FlowSampler(spec, scheduler)

    def dynamic_mu(latent_shape) -> float:  # FLUX: mu of the image token count (latent positions per token)
        return process.dynamic.mu(math.prod(latent_shape[1:]) // process.latent_tokens)

    return FlowSampler(spec, scheduler, dynamic_mu)


def random_window(size: int, low: int, high: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    """A window of ``size`` consecutive steps starting uniformly in [low, high - size] (Flow-GRPO-Fast's
    ``sde_window_size`` within ``sde_window_range`` = (low, high)), for ``Sampler.sample(window=...)``."""
    if size < 1 or high - low < size:
        raise ValueError(f"a window of {size} steps does not fit in [{low}, {high})")
    start = low + int(torch.randint(0, high - low - size + 1, (1,), generator=generator))
    return start, start + size


def jittered_flow_sigmas(process, num_steps: int, batch: int, latent_shape, jitter: bool = True,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample sigma grids (T+1, B) for a flow model: the unshifted grid u_i = 1 - (i + o_b) / T,
    each sample's offset o_b uniform in [0, 1) when ``jitter`` (Diffusion-DRO's per-sample grids,
    on flow models), shifted as the model trains (``process.shifted``), then sigma = 0 appended."""
    offset = torch.rand(batch, generator=generator) if jitter else torch.zeros(batch)
    u = 1 - (torch.arange(num_steps, dtype=torch.float32)[:, None] + offset[None, :]) / num_steps
    return torch.cat([process.shifted(u, latent_shape).float(), torch.zeros(1, batch)])


# ------------------------------------------------------------------------------------------------
# On-policy check
# ------------------------------------------------------------------------------------------------


class OffPolicyError(ValueError):
    """Re-scoring with the sampling weights did not reproduce the sampled log-probabilities."""


@torch.no_grad()
def max_ratio_error(sampler: Sampler, denoise: Denoiser, trajectory: SampledTrajectory, cond: dict,
                    uncond: dict | None = None, guidance: float = 1.0) -> float:
    """max |exp(log p_rescored - log p_sampled) - 1| over every recorded transition, re-scored with
    ``denoise`` (the sampling weights: this is the PPO/GRPO ratio at its first inner step, which must
    be 1). ``cond``/``uncond`` hold one row per trajectory sample. 0.0 when nothing is recorded."""
    b = trajectory.latents.shape[1]
    worst = 0.0
    for row, step in enumerate(trajectory.steps.tolist()):
        logp = sampler.rescore(denoise, trajectory, torch.full((b,), step, dtype=torch.long), torch.arange(b), cond, uncond, guidance)
        ratio = torch.exp(logp.float() - trajectory.log_probs[row].to(logp.device).float())
        worst = max(worst, float((ratio - 1).abs().max()))
    return worst


def check_on_policy(error: float, tolerance: float, spec: SamplerSpec, dtype: torch.dtype) -> None:
    """Raise ``OffPolicyError`` naming the dtype and sampler when ``error`` (``max_ratio_error``)
    exceeds ``tolerance``: re-scoring no longer reproduces sampling, so importance ratios are biased."""
    if not error <= tolerance:
        raise OffPolicyError(f"on-policy ratio check failed: max |ratio - 1| = {error:.3g} > {tolerance:g} with model dtype "
                             f"{str(dtype).replace('torch.', '')} and {spec.describe()}: re-scoring does not reproduce "
                             "sampling (non-deterministic kernels, a different batch layout in low precision, or weights "
                             "changed between sampling and scoring); sample in fp32 or raise the tolerance")
