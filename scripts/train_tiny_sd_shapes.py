"""Pretrain the bundled tiny Stable Diffusion model on synthetic captioned shapes.

Reproducible on 2 CPU cores: ``python scripts/train_tiny_sd_shapes.py --out assets/tiny-sd-shapes``.
Stage 1 trains the AutoencoderKL (reconstruction + a small KL term); stage 2 encodes a fixed set
of shape images once and trains the UNet and the CLIP text encoder jointly with the epsilon
objective, 10% caption dropout (so classifier-free guidance works) and an EMA of the UNet. The
model card (seed, steps, wall time, sizes) and a sample grid are written into the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffpo.data.shapes import all_specs, sample_shapes
from diffpo.models.tiny import build_tiny_sd_components


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], (B, 3, H, W)."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, steps: int, batch_size: int, seed: int) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    vae.train()
    loss = torch.tensor(0.0)
    for step in tqdm(range(steps), desc="vae"):
        images = to_tensor([im for im, _ in sample_shapes(batch_size, seed=seed * 100_003 + step)])
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    vae.eval()
    return loss.item()


@torch.no_grad()
def encode_dataset(vae, tokenizer, text_encoder, count: int, seed: int):
    """Latent mean/std of ``count`` fixed shape images, their token ids and the VAE's PSNR."""
    pairs = sample_shapes(count, seed=seed)
    means, stds, psnrs = [], [], []
    for start in range(0, count, 256):
        images = to_tensor([im for im, _ in pairs[start : start + 256]])
        dist = vae.encode(images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        recon = vae.decode(dist.mean).sample.clamp(-1, 1)
        mse = ((recon - images) / 2).pow(2).mean(dim=(1, 2, 3))
        psnrs.append(-10 * torch.log10(mse))
    ids = tokenizer([c for _, c in pairs], padding="max_length", truncation=True, return_tensors="pt")
    return torch.cat(means), torch.cat(stds), ids.input_ids, float(torch.cat(psnrs).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/tiny-sd-shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dataset-size", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init-from", default=None,
                        help="continue from a pipeline folder this script wrote: keep its VAE (no VAE stage), "
                             "train its UNet and text encoder further")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    parts = build_tiny_sd_components(seed=args.seed)
    history = []
    if args.init_from:
        from diffusers import StableDiffusionPipeline

        previous = StableDiffusionPipeline.from_pretrained(args.init_from)
        for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
            parts[name] = getattr(previous, name)
        history = json.loads((Path(args.init_from) / "training.json").read_text()).get("history", [])
        history = history or [json.loads((Path(args.init_from) / "training.json").read_text())]
    vae, unet, text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
    tokenizer, scheduler = parts["tokenizer"], parts["scheduler"]

    vae_loss = float("nan") if args.init_from else train_vae(vae, args.vae_steps, 32, args.seed)
    vae.requires_grad_(False)
    means, stds, input_ids, psnr = encode_dataset(vae, tokenizer, text_encoder, args.dataset_size, args.seed + 1)
    scaling_factor = vae.config.scaling_factor if args.init_from else float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    empty_ids = tokenizer([""], padding="max_length", return_tensors="pt").input_ids
    vae_seconds = time.time() - started

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, args.unet_steps) / args.unet_steps)),
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    unet.train()
    text_encoder.train()
    progress = tqdm(range(args.unet_steps), desc="unet")
    for step in progress:
        index = torch.randint(0, args.dataset_size, (args.batch_size,), generator=generator)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        latents = latents * scaling_factor
        ids = input_ids[index].clone()
        drop = torch.rand(args.batch_size, generator=generator) < 0.1
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 20 == 0:
            progress.set_postfix(loss=f"{float(loss):.4f}")
    wall = time.time() - started

    from diffusers import StableDiffusionPipeline

    parts["unet"] = ema.eval()
    text_encoder.eval()
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    save_samples(pipe, out / "samples.png", args.seed)
    sizes = {p.name: p.stat().st_size for p in out.rglob("*.safetensors")}
    card = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "batch_size": args.batch_size,
        "dataset_size": args.dataset_size,
        "vae_final_loss": vae_loss,
        "vae_psnr_db": psnr,
        "unet_final_loss": float(loss),
        "scaling_factor": scaling_factor,
        "vae_seconds": vae_seconds,
        "wall_seconds": wall,
        "threads": args.threads,
        "parameters": {
            "unet": sum(p.numel() for p in ema.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        },
        "safetensors_bytes": sum(sizes.values()),
        "captions": len(all_specs()),
        "lr": args.lr,
        "init_from": args.init_from,
    }
    card["history"] = history + [{k: v for k, v in card.items() if k != "history"}]
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    write_model_card(out, card)
    print(json.dumps(card, indent=2))


def write_model_card(out: Path, card: dict) -> None:
    """The folder's README: what the model is, how it was trained, how to rebuild it."""
    params = card["parameters"]
    text = f"""# tiny-sd-shapes

A real `StableDiffusionPipeline` (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDIMScheduler; safetensors) small enough to train and align on a CPU. It draws
one filled shape (circle, square, triangle) of one colour (red, green, blue, yellow, white,
black) on a plain background of another colour, 32x32 pixels, from captions like
"a red circle on a blue background" ({card["captions"]} captions). diffpo's quickstart and tests use it.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("assets/tiny-sd-shapes")
image = pipe("a yellow triangle on a black background", num_inference_steps=25, guidance_scale=5.0).images[0]
```

`samples.png`: rows circle / square / triangle; 25 DDIM steps, guidance 5, seed {card["seed"]}.

## Architecture
| component | parameters | notes |
|---|---|---|
| UNet | {params["unet"]:,} | blocks (32, 64, 96), cross-attention at 8x8 and 4x4, 4x16x16 latents |
| VAE | {params["vae"]:,} | blocks (32, 64): factor 2, 4 latent channels, scaling factor {card["scaling_factor"]:.4f} |
| text encoder | {params["text_encoder"]:,} | CLIP, 2 layers, width 64; tokenizer = CLIP BPE (from open_clip) truncated to the first 6,000 merges |

Weights: {card["safetensors_bytes"] / 1e6:.1f} MB of safetensors in all.

## Training (reproducible: `python scripts/train_tiny_sd_shapes.py --out assets/tiny-sd-shapes --vae-steps {card["vae_steps"]} --unet-steps {card["unet_steps"]}`)
- data: synthetic shapes drawn with PIL by `diffpo.data.shapes` (random size 35-65% of the side and position), seed {card["seed"]}
- stage 1, VAE: {card["vae_steps"]} steps, batch 32, AdamW 1e-3 cosine, MSE + 1e-6 KL; final loss {card["vae_final_loss"]:.5f}, PSNR {card["vae_psnr_db"]:.1f} dB on {card["dataset_size"]} images
- stage 2, UNet + text encoder jointly: {card["unet_steps"]} steps, batch {card["batch_size"]}, AdamW 1e-3 (100 warmup, cosine), epsilon objective, 10% caption dropout, EMA 0.999 (exported), latents of {card["dataset_size"]} fixed images encoded once; final loss {card["unet_final_loss"]:.4f}
- wall time {card["wall_seconds"] / 60:.1f} min on {card["threads"]} CPU threads (VAE stage {card["vae_seconds"] / 60:.1f} min), sharing the machine with other work
"""
    (out / "README.md").write_text(text)


@torch.no_grad()
def save_samples(pipe, path: Path, seed: int) -> None:
    """One row per shape: 25-step DDIM samples with guidance 5, to eyeball the model."""
    from diffpo.data.shapes import ShapeSpec

    specs = [
        ShapeSpec(shape, colour, background)
        for shape in ("circle", "square", "triangle")
        for colour, background in (("red", "blue"), ("green", "yellow"), ("blue", "white"), ("yellow", "black"))
    ]
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        [s.caption for s in specs],
        num_inference_steps=25,
        guidance_scale=5.0,
        generator=generator,
        output_type="pil",
    ).images
    from diffpo.eval.grid import image_grid

    image_grid(images, rows=3, scale=3).save(path)


if __name__ == "__main__":
    main()
