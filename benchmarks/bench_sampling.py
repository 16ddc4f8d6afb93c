"""Cost of the sampler layer's records on the bundled tiny flow model (SD3 transformer): each
stochastic flow sampler (``Sampler.sample``: history, fp32 state, per-step log-probabilities) vs
the same step arithmetic without records, and the ODE sampler vs a plain Euler loop; and the
on-policy check in fp32 and bf16 (max |ratio - 1| when sampled transitions are re-scored with the
sampling weights, in the sampling batch layout, in a shuffled one as a trainer's batches are, and
one transition per forward).

    python benchmarks/bench_sampling.py [--batch 8] [--steps 10] [--repeats 5] [--threads 1] [--out FILE.json]
Target (issue 20): sampling with log-probs / plain sampling <= 1.10. Reported: the ratio of the best
times, and the median of the back-to-back (interleaved) pair ratios with a 95% bootstrap interval,
which a loaded machine moves less.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import RESULTS, print_table, write_result
from diffpo.kernel.samplers import (
    FlowSampler,
    cps_mean_std,
    dance_sde_mean_std,
    euler_step,
    flow_sde_mean_std,
    make_sampler,
    max_ratio_error,
)
from diffpo.kernel.trajectory import guided
from diffpo.models.loading import load_stack

MEANS = {"flow_sde": flow_sde_mean_std, "dance_sde": dance_sde_mean_std, "cps": cps_mean_std}


@torch.no_grad()
def plain(sampler: FlowSampler, denoise, latents, cond, uncond, guidance, steps, generator):
    """The same steps with nothing kept: no history, no log-probabilities, the state in the model dtype."""
    schedule = sampler.schedule(steps, latents.shape[1:])
    sigmas, sample = schedule.sigmas, latents
    sigma_max = sigmas[sigmas < 1].max()
    for i in range(steps):
        t = schedule.timesteps[i].repeat(sample.shape[0])
        v = guided(denoise, sample, t, cond, uncond, guidance)
        s, s_next = sigmas[i], sigmas[i + 1]
        if sampler.spec.name == "ode":
            sample = euler_step(sample.float(), v.float(), s, s_next).to(latents.dtype)
            continue
        if sampler.spec.name == "cps" and i == steps - 1:
            sample = cps_mean_std(sample.float(), v.float(), s, s_next, 0.0)[0].to(latents.dtype)
            continue
        extra = (sigma_max,) if sampler.spec.name == "flow_sde" else ()
        mean, std = MEANS[sampler.spec.name](sample.float(), v.float(), s, s_next, sampler.spec.noise_level, *extra)
        sample = (mean + std * torch.randn(sample.shape, generator=generator)).to(latents.dtype)
    return sample


def bootstrap_median_ci(values: torch.Tensor, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(values), (draws, len(values)), generator=gen)
    medians = values[picks].median(dim=1).values
    return float(medians.quantile(0.025)), float(medians.quantile(0.975))


def conditioning(stack, batch: int, dtype):
    text = stack.encode_prompts(["a red circle on a blue background"] * batch)
    empty = stack.encode_prompts([""] * batch)
    as_dtype = lambda e: {k: v.to(dtype) for k, v in stack.family.unet_conditioning(e).items()}  # noqa: E731
    return as_dtype(text), as_dtype(empty)


def ratio_errors(stack, batch: int, steps: int, dtype) -> list[dict]:
    """max |ratio - 1| per sampler: re-scored in the sampling layout (one step, the whole batch), in
    a shuffled layout (each row a different (step, sample) transition) and one transition at a time."""
    transformer = stack.unet.to(dtype)
    denoise = stack.denoiser(transformer)
    cond, uncond = conditioning(stack, batch, dtype)
    rows = []
    for name in MEANS:
        sampler = make_sampler(name, stack.noise_process, stack.family.sampling_scheduler(stack.noise_scheduler))
        x_T = torch.randn(batch, stack.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
        traj = sampler.sample(denoise, x_T, cond, uncond, 4.5, steps, torch.Generator().manual_seed(1))
        same = max_ratio_error(sampler, denoise, traj, cond, uncond, 4.5)
        recorded = traj.steps
        perm = torch.randperm(batch, generator=torch.Generator().manual_seed(2))
        worst = 0.0
        with torch.no_grad():
            for j in range(recorded.numel()):  # row n: step recorded[(j + n) % S] of sample perm[n]
                step_of_row = recorded[(j + torch.arange(batch)) % recorded.numel()]
                logp = sampler.rescore(denoise, traj, step_of_row, perm, {k: v[perm] for k, v in cond.items()},
                                       {k: v[perm] for k, v in uncond.items()}, 4.5)
                stored = traj.recorded_log_probs(step_of_row, perm)
                worst = max(worst, float((torch.exp(logp - stored) - 1).abs().max()))
        single = 0.0
        with torch.no_grad():  # each transition re-scored alone (batch 1 instead of the sampling batch)
            for j, step in enumerate(recorded.tolist()):
                for b in range(batch):
                    one = torch.tensor([b])
                    logp = sampler.rescore(denoise, traj, torch.tensor([step]), one, {k: v[one] for k, v in cond.items()},
                                           {k: v[one] for k, v in uncond.items()}, 4.5)
                    single = max(single, float((torch.exp(logp - traj.log_probs[j, b]) - 1).abs().max()))
        rows.append({"dtype": str(dtype).replace("torch.", ""), "sampler": name, "same_layout": same, "shuffled_layout": worst,
                     "one_per_batch": single})
    stack.unet.to(torch.float32)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stack = load_stack("tiny-flow")
    denoise = stack.denoiser()
    cond, uncond = conditioning(stack, args.batch, torch.float32)
    side = stack.native_resolution // stack.vae_scale_factor
    latents = torch.randn(args.batch, stack.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in ("flow_sde", "dance_sde", "cps", "ode"):
        sampler = make_sampler(name, stack.noise_process, stack.family.sampling_scheduler(stack.noise_scheduler))
        timings = {"plain": [], "sampler": []}
        for _ in range(args.repeats):  # interleaved so that machine noise hits both
            start = time.perf_counter()
            plain(sampler, denoise, latents, cond, uncond, 4.5, args.steps, torch.Generator().manual_seed(1))
            timings["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            sampler.sample(denoise, latents, cond, uncond, 4.5, args.steps, torch.Generator().manual_seed(1))
            timings["sampler"].append(time.perf_counter() - start)
        best = {k: min(v) for k, v in timings.items()}
        paired = torch.tensor(timings["sampler"]) / torch.tensor(timings["plain"])  # back-to-back pairs
        low, high = bootstrap_median_ci(paired)
        rows.append({"sampler": name, "plain_s": best["plain"], "with_logprobs_s": best["sampler"],
                     "ratio_of_best": best["sampler"] / best["plain"], "median_paired_ratio": float(paired.median()),
                     "ci95_low": low, "ci95_high": high})
    print_table(rows, ["sampler", "plain_s", "with_logprobs_s", "ratio_of_best", "median_paired_ratio", "ci95_low", "ci95_high"])
    checks = ratio_errors(stack, args.batch, args.steps, torch.float32) + ratio_errors(stack, args.batch, args.steps, torch.bfloat16)
    print_table(checks, ["dtype", "sampler", "same_layout", "shuffled_layout", "one_per_batch"])
    out = write_result({"model": "tiny-flow-shapes", "batch": args.batch, "steps": args.steps, "guidance": 4.5,
                        "repeats": args.repeats, "threads": args.threads, "timing": rows, "on_policy": checks}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
