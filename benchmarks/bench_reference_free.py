"""What skipping the reference saves: one offline-pairs training step (policy forward, reference
forward, loss, backward, AdamW) of ``objective.name=dpo`` vs the reference-free ``simpo``, for
LoRA (reference = adapters disabled) and full fine-tuning (reference = a frozen copy), on the
bundled tiny model with the trainer's own pieces (load_policy, the reference classes, the kernel).

    python benchmarks/bench_reference_free.py [--pairs 8] [--steps 10] [--threads 1] [--out FILE.json]

Memory is the process's resident set from /proc (VmRSS, and VmHWM reset through
/proc/self/clear_refs before the steps): torch's CPU allocator is invisible to tracemalloc, which
only sees Python objects. Each case runs in its own subprocess so that one case's peak cannot
hide another's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types

CASES = [("lora", "dpo"), ("lora", "simpo"), ("full", "dpo"), ("full", "simpo")]


def _mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def run_case(finetune: str, objective: str, pairs: int, steps: int, threads: int) -> dict:
    import torch

    from diffpo.config import TrainConfig, from_dict
    from diffpo.kernel.denoising import noise_pairs, pair_errors
    from diffpo.models.loading import unet_denoiser
    from diffpo.models.reference import AdaptersDisabledReference, FrozenCopyReference
    from diffpo.objectives import METHODS
    from diffpo.trainers.common import build_optimizer, load_policy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = from_dict(TrainConfig, {"finetune": finetune, "objective": {"name": objective, "beta": 2000.0}})
    stack, unet, params = load_policy(config, types.SimpleNamespace(device=torch.device("cpu")), torch.float32)
    rss_policy = _mb("VmRSS")
    reference = None  # the offline loop's rule
    if METHODS[config.method].needs_reference and not config.objective.reference_free:
        reference = (AdaptersDisabledReference(unet) if finetune == "lora" else
                     FrozenCopyReference(stack.load_unet(), "cpu", torch.float32))
    rss_setup = _mb("VmRSS")
    unet.train()
    optimizer = build_optimizer(params, config.optim)
    policy = unet_denoiser(unet)
    size = stack.unet.config.sample_size
    conditioning = stack.family.unet_conditioning(stack.encode_prompts(["a red circle"] * pairs).repeat_pairs())
    generator = torch.Generator().manual_seed(0)
    latents_w = torch.randn(pairs, stack.unet.config.in_channels, size, size, generator=generator)
    latents_l = torch.randn(latents_w.shape, generator=generator)

    gaps = []

    def step():
        noise, timesteps = stack.noise_process.draw(latents_w, generator)
        noised = noise_pairs(stack.noise_process, latents_w, latents_l, noise, timesteps)
        target = stack.noise_process.target(noised.latents, noised.noise, noised.timesteps)
        errors = pair_errors(policy, reference, noised, conditioning, target)
        gaps.append(float((errors.policy_w - errors.policy_l).abs().mean()))  # simpo's beta acts on this raw gap
        loss, _ = METHODS[config.method].loss(errors, config.objective, None)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: AdamW state and oneDNN kernels are allocated here
        step()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM: the peak below is the steps' own
    rss_before = _mb("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _mb("VmHWM")
    return {"finetune": finetune, "objective": objective, "reference": reference.kind if reference else "none",
            "pairs": pairs, "steps": steps, "threads": threads,
            "step_s_median": statistics.median(times), "step_s_min": min(times),
            "reference_setup_mb": rss_setup - rss_policy, "rss_before_steps_mb": rss_before,
            "peak_rss_steps_mb": peak, "step_peak_over_rss_mb": peak - rss_before,
            "abs_policy_gap_mean": statistics.mean(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # FINETUNE:OBJECTIVE, in a child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case.split(":"), args.pairs, args.steps, args.threads)))
        return
    rows = []
    for finetune, objective in CASES:
        child = subprocess.run([sys.executable, __file__, "--case", f"{finetune}:{objective}", "--pairs",
                                str(args.pairs), "--steps", str(args.steps), "--threads", str(args.threads)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"{'finetune':8} {'objective':9} {'reference':17} {'step s (median)':>15} {'ref setup MB':>12} "
          f"{'RSS MB':>8} {'peak MB':>8} {'step peak +MB':>13}")
    for r in rows:
        print(f"{r['finetune']:8} {r['objective']:9} {r['reference']:17} {r['step_s_median']:15.3f} "
              f"{r['reference_setup_mb']:12.1f} {r['rss_before_steps_mb']:8.1f} {r['peak_rss_steps_mb']:8.1f} "
              f"{r['step_peak_over_rss_mb']:13.1f}")
    by = {(r["finetune"], r["objective"]): r for r in rows}
    summary = {ft: {"step_time_saving": 1 - by[(ft, "simpo")]["step_s_median"] / by[(ft, "dpo")]["step_s_median"],
                    "peak_rss_saving_mb": by[(ft, "dpo")]["peak_rss_steps_mb"] - by[(ft, "simpo")]["peak_rss_steps_mb"]}
               for ft in ("lora", "full")}
    for ft, s in summary.items():
        print(f"{ft}: reference-free step {100 * s['step_time_saving']:.1f}% faster, peak RSS "
              f"{s['peak_rss_saving_mb']:.1f} MB lower")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"model": "tiny-sd-shapes", "cases": rows, "summary": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
