"""GPU: a Diffusion-DPO step of an SD1.5-shaped UNet (random weights, 64x64 latents, batch 8 pairs,
bf16 autocast, SDPA): step time, pairs/s, peak memory, host syncs per step, and model FLOP
utilisation (MFU) against the bf16 matmul rate measured on the same card. Each option is
measured on its own against the plain step: torch.compile, channels_last, xformers attention,
gradient checkpointing. Target: >= 40% MFU.

The step is diffpo's own: per-pair random streams, shared-noise pairs (kernel.denoising), the
policy forward on the concatenated 2B batch with grad, the reference forward under no_grad in
the same precision, the DPO loss, clipping and AdamW. Latents and text embeddings are random
tensors on the device, as the cache would deliver them. Full fine-tuning (the paper's recipe:
fp32 trainable weights, a frozen bf16 reference copy) or ``--finetune lora`` (frozen bf16 base,
fp32 LoRA, reference = adapters disabled).

    python benchmarks/bench_gpu.py                  # on a CUDA machine, ~3-6 minutes
    python benchmarks/bench_gpu.py --dry-run        # a tiny UNet on the CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from pathlib import Path

import torch

from _common import RESULTS, print_table, write_result

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VARIANTS = ["plain", "compile", "channels_last", "xformers", "gradient_checkpointing"]


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Measured dense matmul FLOP/s of this device at ``dtype`` (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_step(variant: str, args, device: torch.device, dtype: torch.dtype):
    """A fresh policy, reference, optimizer and batch; returns the step function."""
    from diffusers import UNet2DConditionModel

    from diffusers import DDPMScheduler

    from diffpo.kernel.denoising import NoisedPairs, PairStreams, noise_pairs, pair_errors, pair_noise, prediction_target
    from diffpo.kernel.noise_process import DDPMProcess
    from diffpo.models.loading import unet_denoiser
    from diffpo.models.reference import AdaptersDisabledReference, FrozenCopyReference
    from diffpo.objectives.dpo import diffusion_dpo_loss

    config = TINY_UNET if args.dry_run else SD15_UNET
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds, not minutes, for 860 M parameters
        unet = UNet2DConditionModel(**config)
    if args.finetune == "lora":  # as diffpo.trainers.common.load_policy: frozen base in bf16, LoRA in fp32
        from diffusers.training_utils import cast_training_params

        from diffpo.models.lora import attach_lora

        unet.to(dtype).requires_grad_(False)
        params = attach_lora(unet, 64, 64, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
        cast_training_params(unet, dtype=torch.float32)
        reference = AdaptersDisabledReference(unet)
    else:
        params = list(unet.parameters())
        frozen = UNet2DConditionModel.from_config(unet.config).to(device)
        frozen.load_state_dict(unet.state_dict())
        reference = FrozenCopyReference(frozen, device, dtype)
    unet.train()
    if variant == "gradient_checkpointing":
        unet.enable_gradient_checkpointing()
    if variant == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        reference.unet.enable_xformers_memory_efficient_attention()
    memory_format = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    if variant == "channels_last":
        unet.to(memory_format=torch.channels_last)
        reference.unet.to(memory_format=torch.channels_last)
    if variant == "compile":
        unet.compile()
        if reference.unet is not unet:
            reference.unet.compile()
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    policy = unet_denoiser(unet)
    b, size = args.pairs, config["sample_size"]
    generator = torch.Generator().manual_seed(0)
    latents_w = torch.randn(b, 4, size, size, generator=generator).to(device, dtype)
    latents_l = torch.randn(b, 4, size, size, generator=generator).to(device, dtype)
    hidden = torch.randn(2 * b, 77, config["cross_attention_dim"], generator=generator).to(device, dtype)
    conditioning = {"encoder_hidden_states": hidden}
    counter = {"micro": 0}

    def step():
        streams = PairStreams(0, counter["micro"], range(b))  # a new draw per step, as epochs would give
        counter["micro"] += 1
        noise, timesteps = pair_noise(latents_w, 1000, streams)
        noised = noise_pairs(DDPMProcess(scheduler, "epsilon"), latents_w, latents_l, noise, timesteps)
        noised = NoisedPairs(noised.noisy.contiguous(memory_format=memory_format), noised.noise, noised.timesteps,
                             noised.latents)
        target = prediction_target("epsilon", scheduler, noised.latents, noised.noise, noised.timesteps)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            errors = pair_errors(policy, reference, noised, conditioning, target)
        loss, _ = diffusion_dpo_loss(errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, beta=5000.0)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, unet, reference


def step_flops(step) -> float:
    """FLOPs of one step (policy forward + backward, reference forward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def host_syncs(step, device: torch.device) -> int | None:
    """Host-device synchronisations one step makes (CUDA's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(variant: str, args, device, dtype, rate: float, flops: float | None) -> dict:
    row = {"variant": variant}
    if variant == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            return {**row, "status": "unavailable (pip install xformers)"}
        if device.type != "cuda":
            return {**row, "status": "unavailable (needs CUDA)"}
    if variant == "compile" and args.dry_run and not args.compile_in_dry_run:
        return {**row, "status": "skipped in --dry-run (--compile-in-dry-run measures it)"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step, unet, reference = build_step(variant, args, device, dtype)
    for _ in range(args.warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if flops is None:
        flops = step_flops(step)
    syncs = host_syncs(step, device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):  # no sync inside: CPU and GPU overlap as in training
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    row.update(status="ok", step_s=seconds, pairs_per_s=args.pairs / seconds, tflop_per_step=flops / 1e12,
               achieved_tflops=flops / seconds / 1e12, mfu=flops / seconds / rate, host_syncs_per_step=syncs,
               setup_and_warmup_s=warmup_s,
               peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    del step, unet, reference
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny UNet on the CPU, fp32, 2 steps: checks the script")
    parser.add_argument("--compile-in-dry-run", action="store_true", help="also torch.compile in --dry-run (minutes on a CPU)")
    parser.add_argument("--finetune", default="full", choices=["full", "lora"])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--out", default=None, help=f"JSON file (default {RESULTS}/gpu.json, dry run: gpu_dry_run.json)")
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rate = matmul_rate(device, dtype, 1024 if args.dry_run else 8192, 4 if args.dry_run else 50)
    print(f"measured {'fp32' if args.dry_run else 'bf16'} matmul rate: {rate / 1e12:.1f} TFLOP/s")
    rows, flops = [], None
    for variant in args.variants:
        row = measure(variant, args, device, dtype, rate, flops)
        if row.get("status") == "ok" and variant == "plain":
            flops = row["tflop_per_step"] * 1e12  # the options do not change the model's FLOPs
        rows.append(row)
        print(json.dumps(row))
    result = {"model": "SD1.5-shaped UNet2DConditionModel, random weights" if not args.dry_run else "tiny UNet (dry run)",
              "latent": f"{(TINY_UNET if args.dry_run else SD15_UNET)['sample_size']}x", "pairs": args.pairs,
              "finetune": args.finetune, "dtype": str(dtype), "attention": "SDPA unless xformers",
              "matmul_tflops_measured": rate / 1e12, "steps_timed": args.steps, "variants": rows, "target": "mfu >= 0.40"}
    print_table([r for r in rows if r.get("status") == "ok"],
                ["variant", "step_s", "pairs_per_s", "achieved_tflops", "mfu", "peak_memory_gb", "host_syncs_per_step"])
    out = args.out or RESULTS / ("gpu_dry_run.json" if args.dry_run else "gpu.json")
    print(f"written to {write_result(result, out)}")


if __name__ == "__main__":
    main()
