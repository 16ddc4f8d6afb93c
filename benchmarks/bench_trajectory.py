"""Cost of recording per-step log-probabilities: ``sample_trajectory`` vs the same DDIM loop
without log-probs, on the bundled tiny model (same UNet, batch, steps, guidance, eta).

    python benchmarks/bench_trajectory.py [--batch 16] [--steps 20] [--repeats 3] [--threads 2] [--out FILE.json]
Target (the online-trainers issue): overhead <= ~10%.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffpo.kernel.trajectory import ddim_step, epsilon_from_prediction, guided, sample_trajectory, sampling_timesteps, step_coefficients
from diffpo.models.loading import load_stack, unet_denoiser


@torch.no_grad()
def plain_ddim(denoise, scheduler, latents, cond, uncond, guidance, steps, eta, generator):
    """The same sampler, not keeping history or log-probs (diffusers' DDIMScheduler does the same arithmetic)."""
    sample = latents
    for t, prev in zip(*sampling_timesteps(scheduler, steps)):
        tb = t.repeat(sample.shape[0])
        coef = step_coefficients(scheduler, tb, prev.repeat(sample.shape[0]), eta, sample.ndim)
        eps = epsilon_from_prediction(guided(denoise, sample, tb, cond, uncond, guidance), sample, coef.alpha_t, "epsilon")
        mean = coef.c1 * sample + coef.c2 * eps
        sample = mean + coef.sigma * torch.randn(sample.shape, generator=generator)
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stack = load_stack("tiny")
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(stack.noise_scheduler.config)
    denoise = unet_denoiser(stack.unet)
    text = stack.encode_prompts(["a red circle on a blue background"] * args.batch)
    empty = stack.encode_prompts([""] * args.batch)
    cond, uncond = stack.family.unet_conditioning(text), stack.family.unet_conditioning(empty)
    size = stack.unet.config.sample_size
    latents = torch.randn(args.batch, 4, size, size, generator=torch.Generator().manual_seed(0))
    timings = {"plain": [], "with_logprobs": []}
    for _ in range(args.repeats):  # interleaved so that machine noise hits both
        start = time.perf_counter()
        plain_ddim(denoise, scheduler, latents, cond, uncond, 5.0, args.steps, 1.0, torch.Generator().manual_seed(1))
        timings["plain"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sample_trajectory(denoise, scheduler, latents, cond, uncond, 5.0, args.steps, 1.0, torch.Generator().manual_seed(1))
        timings["with_logprobs"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    result = {"batch": args.batch, "steps": args.steps, "seconds_best": best,
              "overhead": best["with_logprobs"] / best["plain"] - 1, "threads": args.threads, "model": "tiny-sd-shapes"}
    print(f"plain DDIM {best['plain']:.3f} s, with log-probs {best['with_logprobs']:.3f} s, overhead {100 * result['overhead']:.1f}%")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
