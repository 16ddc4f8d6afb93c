"""Memory: peak of a training step for LoRA-DPO (reference = adapters disabled) vs LoRA-SFT, and
full fine-tuning with a frozen reference copy vs full SFT, on the trainer's own pieces
(``load_policy``, the reference classes, the kernel, the objectives, AdamW).

The peak covers everything the case allocates: weights, LoRA, the reference, gradients, AdamW
states and the step's activations. On CUDA it is ``torch.cuda.max_memory_allocated``; on the CPU
the process's resident-set peak (VmHWM) minus its resident set before the model was loaded
(torch's CPU allocator is invisible to tracemalloc). Each case runs in its own process. SFT here
is the offline loop's: the policy sees the same 2B-image batch, so the ratio is the cost of the
reference. Target: LoRA-DPO <= 1.15x LoRA-SFT.

    python benchmarks/bench_memory.py [--model tiny] [--pairs 8] [--steps 3] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

from _common import RESULTS, print_table, write_result

CASES = {"lora_sft": ("lora", "sft"), "lora_dpo": ("lora", "diffusion_dpo"),
         "full_sft": ("full", "sft"), "full_dpo": ("full", "diffusion_dpo")}


def _mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: CPU memory needs Linux")


def run_case(name: str, model: str, pairs: int, steps: int, threads: int) -> dict:
    import torch

    from diffpo.config import TrainConfig, from_dict
    from diffpo.dtypes import MIXED_PRECISION_DTYPES
    from diffpo.kernel.denoising import noise_pairs, pair_errors
    from diffpo.models.loading import unet_denoiser
    from diffpo.models.reference import AdaptersDisabledReference, FrozenCopyReference
    from diffpo.objectives import METHODS
    from diffpo.trainers.common import build_optimizer, load_policy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    finetune, method = CASES[name]
    config = from_dict(TrainConfig, {"method": method, "finetune": finetune, "model": {"pretrained": model},
                                     "mixed_precision": "bf16" if cuda else "no", "objective": {"beta": 2000.0}})
    dtype = MIXED_PRECISION_DTYPES[config.mixed_precision]
    # the libraries' code and import-time tables are not the case's memory: load them first
    import peft.tuners.lora  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from diffusers.training_utils import cast_training_params  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    if not cuda:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := VmRSS: the peak below starts here
    before = torch.cuda.memory_allocated() / 2**20 if cuda else _mb("VmRSS")
    stack, unet, params = load_policy(config, types.SimpleNamespace(device=device), dtype)
    reference = None
    if METHODS[method].needs_reference:
        reference = (AdaptersDisabledReference(unet) if finetune == "lora" else
                     FrozenCopyReference(stack.load_unet(), device, dtype))
    unet.train()
    optimizer = build_optimizer(params, config.optim)
    policy = unet_denoiser(unet)
    size = unet.config.sample_size
    text = stack.encode_prompts(["a red circle on a blue background"] * pairs).repeat_pairs()
    conditioning = stack.family.unet_conditioning(text)
    generator = torch.Generator().manual_seed(0)
    latents_w = torch.randn(pairs, unet.config.in_channels, size, size, generator=generator).to(device, dtype)
    latents_l = torch.randn(latents_w.shape, generator=generator).to(device, dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for _ in range(steps):
        noise, timesteps = stack.noise_process.draw(latents_w, generator)
        noised = noise_pairs(stack.noise_process, latents_w, latents_l, noise, timesteps)
        target = stack.noise_process.target(noised.latents, noised.noise, noised.timesteps)
        with autocast:
            errors = pair_errors(policy, reference, noised, conditioning, target)
        loss, _ = METHODS[method].loss(errors, config.objective, None)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _mb("VmHWM")) - before
    trainable = sum(p.numel() for p in params)
    return {"case": name, "finetune": finetune, "method": method, "reference": reference.kind if reference else "none",
            "peak_mb": peak, "trainable_params": trainable, "unet_params": sum(p.numel() for p in unet.parameters()),
            "device": device.type, "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="hub id or diffusers folder (default: the bundled tiny model)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.model, args.pairs, args.steps, args.threads)))
        return
    rows = []
    for name in CASES:
        child = subprocess.run([sys.executable, __file__, "--case", name, "--model", args.model, "--pairs", str(args.pairs),
                                "--steps", str(args.steps), "--threads", str(args.threads)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    by = {r["case"]: r for r in rows}
    for r in rows:
        r["x_lora_sft"] = r["peak_mb"] / by["lora_sft"]["peak_mb"]
    result = {"model": args.model, "pairs": args.pairs, "steps": args.steps, "cases": rows,
              "lora_dpo_over_lora_sft": by["lora_dpo"]["peak_mb"] / by["lora_sft"]["peak_mb"],
              "full_dpo_over_lora_dpo": by["full_dpo"]["peak_mb"] / by["lora_dpo"]["peak_mb"],
              "full_dpo_over_full_sft": by["full_dpo"]["peak_mb"] / by["full_sft"]["peak_mb"],
              "target": "lora_dpo <= 1.15x lora_sft"}
    print_table(rows, ["case", "reference", "trainable_params", "peak_mb", "x_lora_sft"])
    print(f"LoRA-DPO / LoRA-SFT {result['lora_dpo_over_lora_sft']:.3f} (target <= 1.15); full-DPO / LoRA-DPO "
          f"{result['full_dpo_over_lora_dpo']:.2f}; written to {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
