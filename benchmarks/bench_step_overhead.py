"""Step overhead: diffpo's Diffusion-DPO training step / the raw floor.

The step is the real loop (``run_training``: cache reads, per-pair draws, shared-noise kernel,
policy and reference forwards, loss, backward, clipping, AdamW, accelerate) timed by its own
metrics over steps K+1..2K (log_every = K, so nothing is read on the host in between). The floor,
timed in the same process on the same UNet, LoRA and batch: policy forward + backward on the 2B
concatenated batch and the reference forward on it, nothing else; "floor + AdamW" adds the
optimizer step. Target: step / floor <= 1.10.

    python benchmarks/bench_step_overhead.py [--model tiny] [--pairs 8] [--steps 20] [--threads 1] [--out FILE]
    python benchmarks/bench_step_overhead.py --model tiny-sd3 --resolution 32 --out benchmarks/results/step_overhead_sd3.json

``--model tiny-sd3`` / ``tiny-flux``: a random tiny flow transformer (rectified flow, joint-attention
LoRA), the same loop and the same floor through the family's denoiser.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch

from _common import RESULTS, model_source, print_table, shapes_pairs, steady_pairs_per_s, train_config, write_result


def time_floor(config, pairs: int, repeats: int, device: torch.device, with_optimizer: bool, resolution: int) -> float:
    """Median seconds of the floor step on the run's denoiser + LoRA (adapters disabled = reference)."""
    from diffpo.dtypes import MIXED_PRECISION_DTYPES
    from diffpo.models.reference import AdaptersDisabledReference
    from diffpo.trainers.common import build_optimizer, load_policy

    dtype = MIXED_PRECISION_DTYPES[config.mixed_precision]
    stack, unet, params = load_policy(config, types.SimpleNamespace(device=device), dtype)
    unet.train()
    policy, reference = stack.denoiser(unet), AdaptersDisabledReference(unet, stack.denoiser)
    optimizer = build_optimizer(params, config.optim)
    size = resolution // stack.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2 * pairs, stack.latent_channels, size, size, generator=generator).to(device, dtype)
    _, timesteps = stack.noise_process.draw(noisy, generator)
    conditioning = stack.family.unet_conditioning(stack.encode_prompts(["a red circle on a blue background"] * 2 * pairs))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = policy(noisy, timesteps, conditioning).float().pow(2).mean()
        loss.backward()
        with torch.no_grad(), autocast:
            reference(noisy, timesteps, conditioning)
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(repeats + 3):  # 3 warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="hub id or diffusers folder (default: the bundled tiny model), "
                        "or tiny-sd3 / tiny-flux (random tiny flow transformers)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (B; the UNet sees 2B images)")
    parser.add_argument("--steps", type=int, default=20, help="K: steps timed after K warm-up steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                        help="default: bf16 on CUDA, no on the CPU")
    parser.add_argument("--out", default=str(RESULTS / "step_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffpo.models.loading import load_stack
    from diffpo.trainers import run_training

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = model_source(args.model, tmp / "model")
        resolution = args.resolution or load_stack(source).native_resolution
        data = shapes_pairs(tmp, args.pairs * 2 * args.steps, resolution)  # one epoch: no loader restart
        config = train_config(source, data, tmp / "run", f"train_batch_size={args.pairs}",
                              f"max_steps={2 * args.steps}", f"log_every={args.steps}", "cache.enabled=true",
                              f"cache.dir={tmp / 'cache'}", f"mixed_precision={precision}", f"data.resolution={resolution}")
        floors = [time_floor(config, args.pairs, args.steps, device, False, resolution)]
        run_training(config)
        step = args.pairs / steady_pairs_per_s(tmp / "run", args.pairs)
        floors.append(time_floor(config, args.pairs, args.steps, device, False, resolution))  # before and after: machine noise
        with_adamw = time_floor(config, args.pairs, args.steps, device, True, resolution)
    floor = min(floors)
    result = {"model": args.model, "resolution": resolution, "pairs": args.pairs, "images_per_forward": 2 * args.pairs, "steps_timed": args.steps,
              "device": device.type, "mixed_precision": precision, "step_s": step, "floor_s": floor,
              "floor_s_runs": floors, "floor_with_adamw_s": with_adamw, "overhead": step / floor,
              "overhead_vs_floor_with_adamw": step / with_adamw, "target": "<= 1.10"}
    print_table([{"what": "diffpo DPO step (run_training)", "seconds": step, "x floor": step / floor},
                 {"what": "floor: policy fwd+bwd (2B) + ref fwd", "seconds": floor, "x floor": 1.0},
                 {"what": "floor + AdamW step", "seconds": with_adamw, "x floor": with_adamw / floor}],
                ["what", "seconds", "x floor"])
    print(f"overhead {result['overhead']:.3f}x the floor (target <= 1.10); written to {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
