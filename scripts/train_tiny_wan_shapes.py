"""Pretrain the bundled tiny Wan2.1-layout text-to-video model on clips of moving shapes.

Reproducible on 2 CPU cores: ``python scripts/train_tiny_wan_shapes.py --out diffpo/assets/tiny-wan-shapes``.
Stage 1 trains a causal 3-D ``AutoencoderKLWan`` (4x spatial, 2x temporal, 8 latent channels) on the
clips (L1 + MSE reconstruction, a small KL term) and sets its per-channel ``latents_mean`` /
``latents_std`` from the encoded clips, as the Wan2.1 VAE ships them. Stage 2 trains a
``WanTransformer3DModel`` and a ``UMT5EncoderModel`` from scratch with the rectified-flow objective
(x_t = (1 - s) x_0 + s e, target e - x_0, s uniform then shifted as the scheduler's ``flow_shift``),
10% caption dropout and an EMA of both, which is exported as a ``WanPipeline``.

Why a transformer: the AnimateDiff model (``train_tiny_video_shapes.py``) never learned the
caption's direction. Its motion modules attend across frames at one pixel and see no text, so a
direction must be carried from the per-frame text through the frame index, a product that neither
factor helps alone (see that script's RECIPE_NOTES). Wan's self-attention spans every frame and
position with 3-D rotary positions, so "moving left" is a relative offset between tokens of
consecutive frames, and every token reads the text directly.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffpo.data.moving_shapes import all_motion_specs, sample_moving_shapes
from diffpo.kernel.noise_process import static_shift
from diffpo.models.tiny import tiny_umt5_config, tiny_wan_transformer_config
from train_tiny_video_shapes import _measured_rows, save_samples, step_with_ema, to_tensor

SIZE = 32


def vae_config(base_dim: int, z_dim: int) -> dict:
    """The bundled causal VAE: two 2x spatial downsamplings (the second also 2x in time), so
    clips of 2k+1 frames at 32 px become (z_dim, k+1, 8, 8) latents."""
    return dict(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                scale_factor_spatial=4, scale_factor_temporal=2, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)


def transformer_config(z_dim: int, text_width: int, width: int, heads: int, layers: int) -> dict:
    """A Wan2.1-layout transformer on (1, 1, 1) patches: every latent pixel of every latent frame is a token."""
    return {**tiny_wan_transformer_config(text_width), "patch_size": (1, 1, 1), "in_channels": z_dim,
            "out_channels": z_dim, "num_attention_heads": heads, "attention_head_dim": width // heads,
            "ffn_dim": 4 * width, "num_layers": layers}


def clips_tensor(clips) -> torch.Tensor:
    """[(frames, caption)] -> pixels in [-1, 1], (N, 3, F, H, W) (the VAE's layout)."""
    frames = to_tensor([im for clip, _ in clips for im in clip])
    return frames.view(len(clips), -1, *frames.shape[1:]).transpose(1, 2).contiguous()


def train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in (progress := tqdm(range(steps), desc="wan vae")):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        # L1 keeps flat colours and edges sharp (the rewards read exact colours); KL keeps the latent tame
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-5 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 20 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(pixels), 64):
        dist = vae.encode(pixels[start : start + 64]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def shifted_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform s, then the scheduler's shift s' = shift s / (1 + (shift - 1) s): more steps at high noise."""
    return static_shift(torch.rand(batch, generator=generator), shift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="diffpo/assets/tiny-wan-shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=5, help="2k+1 frames per clip")
    parser.add_argument("--dataset-size", type=int, default=3000)
    parser.add_argument("--travel-of-room", type=float, nargs=2, default=[0.75, 1.0])
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-base-dim", type=int, default=16)
    parser.add_argument("--z-dim", type=int, default=8)
    parser.add_argument("--vae-from", default=None, help="reuse the VAE of this WanPipeline folder (skips stage 1)")
    parser.add_argument("--steps", type=int, default=3000, help="transformer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text-width", type=int, default=64)
    parser.add_argument("--max-sequence-length", type=int, default=512,
                        help="text rows the transformer sees in training (WanPipeline's default: 512)")
    parser.add_argument("--flow-shift", type=float, default=3.0)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="stop the transformer loop after this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--eval-captions", type=int, default=48)
    parser.add_argument("--eval-seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffpo.models.tokenizer import build_t5_tokenizer

    torch.manual_seed(args.seed)
    clips = sample_moving_shapes(args.dataset_size, size=SIZE, frames=args.frames, seed=args.seed + 1,
                                 travel_of_room=tuple(args.travel_of_room))
    pixels = clips_tensor(clips)
    captions = [c for _, c in clips]
    vae_card = {}
    if args.vae_from:  # stage 1 of an earlier run with the same data: its card's VAE figures carry over
        vae, vae_losses = AutoencoderKLWan.from_pretrained(args.vae_from, subfolder="vae").eval().requires_grad_(False), []
        earlier = Path(args.vae_from) / "training.json"
        if earlier.exists():
            vae_card = {k: v for k, v in json.loads(earlier.read_text()).items() if k.startswith("vae_")}
    else:
        vae = AutoencoderKLWan(**vae_config(args.vae_base_dim, args.z_dim))
        vae_losses = train_vae(vae, pixels, args.vae_steps, args.vae_batch_size, 1e-3, args.seed)
    vae_seconds = time.time() - started
    means, stds = encode(vae, pixels)
    if not args.vae_from:  # Wan2.1's normalisation: per-channel statistics of the encoded clips
        vae.register_to_config(latents_mean=means.mean(dim=(0, 2, 3, 4)).tolist(),
                               latents_std=means.std(dim=(0, 2, 3, 4)).tolist())
    shape = (1, -1, 1, 1, 1)
    latent_mean = torch.tensor(vae.config.latents_mean).view(shape)
    latent_std = torch.tensor(vae.config.latents_std).view(shape)
    recon_error = float((vae.decode(means[:64]).sample - pixels[:64]).abs().mean())

    tokenizer = build_t5_tokenizer(num_merges=2000, model_max_length=512)
    text_length = 16  # every caption fits; the states are zero-padded to --max-sequence-length below
    ids = tokenizer(captions, padding="max_length", max_length=text_length, truncation=True, return_tensors="pt")
    empty = tokenizer([""], padding="max_length", max_length=text_length, return_tensors="pt")
    text_encoder = UMT5EncoderModel(UMT5Config(**tiny_umt5_config(tokenizer, d_model=args.text_width, num_layers=2)))
    transformer = WanTransformer3DModel(**transformer_config(args.z_dim, args.text_width, args.width, args.heads, args.layers))
    trained = list(transformer.parameters()) + list(text_encoder.parameters())
    ema_transformer, ema_text = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_transformer.parameters()) + list(ema_text.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=1e-2)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.jsonl"
    log_path.unlink(missing_ok=True)
    deadline = time.time() + args.max_minutes * 60
    losses, step = [], 0
    transformer.train()
    text_encoder.train()
    for step in (progress := tqdm(range(args.steps), desc="wan transformer")):
        index = torch.randint(0, len(means), (args.batch_size,), generator=generator)
        x0 = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator) - latent_mean) / latent_std
        input_ids, mask = ids.input_ids[index].clone(), ids.attention_mask[index].clone()
        dropped = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        input_ids[dropped], mask[dropped] = empty.input_ids, empty.attention_mask
        # WanPipeline zeroes the states past each prompt's length; training sees the same
        states = text_encoder(input_ids, attention_mask=mask).last_hidden_state * mask[..., None]
        # the cross-attention sees every padded row (zeros), so train with as many as WanPipeline passes
        # (512 by default); the encoder itself needs only the caption's tokens (padding is masked out)
        states = F.pad(states, (0, 0, 0, args.max_sequence_length - text_length))
        noise = torch.randn(x0.shape, generator=generator)
        sigma = shifted_sigmas(args.batch_size, args.flow_shift, generator)
        s = sigma.view(-1, 1, 1, 1, 1)
        prediction = transformer(((1 - s) * x0 + s * noise), sigma * 1000, states).sample
        loss = F.mse_loss(prediction, noise - x0)
        step_with_ema(loss, trained, optimizer, schedule, ema_params, args.ema, step)
        losses.append(float(loss))
        if step % 20 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            with log_path.open("a") as handle:
                handle.write(json.dumps({"step": step, "loss": float(np.mean(losses[-20:])),
                                         "seconds": time.time() - started}) + "\n")
        if time.time() > deadline:
            break
    wall = time.time() - started

    # Euler steps, not the hub's UniPC: at 10 steps UniPC lost the colours of this small model (colour-match
    # 0.49 vs 0.74 with Euler; 25 steps: 0.79 vs 0.77); WanPipeline takes either
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.flow_shift)
    # the latent side, from which diffpo reads the native size (WanTransformer3DModel has no such field)
    ema_transformer.register_to_config(sample_size=SIZE // 4)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=ema_text.eval(), transformer=ema_transformer.eval(),
                       vae=vae, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    samples = save_samples(pipe, out, args.seed, args.frames, args.eval_captions, args.eval_seeds, args.eval_steps,
                           call_kwargs={"height": SIZE, "width": SIZE,
                                                        "max_sequence_length": args.max_sequence_length})
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*.safetensors")}
    card = {
        "command": " ".join(sys.argv[1:]), "seed": args.seed, "frames": args.frames,
        "dataset_size": args.dataset_size, "travel_of_room": args.travel_of_room,
        "vae_steps": len(vae_losses), "vae_final_loss": float(np.mean(vae_losses[-50:])) if vae_losses else None,
        "vae_seconds": vae_seconds, **vae_card, "vae_l1_pixels": recon_error, "vae_from": args.vae_from,
        "steps_planned": args.steps, "steps": step + 1, "batch_size": args.batch_size, "lr": args.lr,
        "flow_shift": args.flow_shift, "max_sequence_length": args.max_sequence_length, "ema": args.ema, "caption_dropout": args.caption_dropout,
        "first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-50:])),
        "wall_seconds": wall, "threads": args.threads, "max_minutes": args.max_minutes,
        "parameters": {"transformer": sum(p.numel() for p in transformer.parameters()),
                       "vae": sum(p.numel() for p in vae.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
        "safetensors_bytes": sum(sizes.values()), "captions": len(all_motion_specs()), "samples": samples,
    }
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    write_model_card(out, card)
    print(json.dumps(card, indent=2))


def write_model_card(out: Path, card: dict) -> None:
    """The folder's README: what the model is, how it was trained and measured, how to rebuild it."""
    params, samples = card["parameters"], card["samples"]
    lo, hi = card["travel_of_room"]
    text = f"""# tiny-wan-shapes

A real `WanPipeline` in the Wan2.1 text-to-video layout (`WanTransformer3DModel`, causal 3-D
`AutoencoderKLWan`, `UMT5EncoderModel`, a T5 tokenizer, `FlowMatchEulerDiscreteScheduler` with shift {card['flow_shift']:g};
safetensors) small enough to train and align on a CPU. It animates one filled shape (circle,
square, triangle) of one colour moving left, right, up or down on a plain background of another
colour, {card["frames"]} frames of 32x32 pixels, from captions like "a red circle moving left on a blue
background" ({card["captions"]} captions). `diffpo quickstart model=wan` and the Wan tests use it.

```python
from diffusers import WanPipeline
pipe = WanPipeline.from_pretrained("diffpo/assets/tiny-wan-shapes")
frames = pipe("a yellow square moving right on a black background", height=32, width=32,
              num_frames={card["frames"]}, num_inference_steps=25, guidance_scale=5.0).frames[0]
```

The transformer's config records `sample_size` (the latent side, 8), from which diffpo reads the
native 32 px; diffusers warns that it does not expect that key and keeps it. `samples.gif` /
`samples.png`: 8 captions, 25 Euler steps, guidance 5, seed {card["seed"]}.

## Architecture
| component | parameters | notes |
|---|---|---|
| transformer | {params["transformer"]:,} | Wan2.1 blocks (self-attention with 3-D RoPE over every token of the clip, cross-attention to the text, timestep modulation), (1, 1, 1) patches |
| VAE | {params["vae"]:,} | causal 3-D, 4x spatial, 2x temporal: {card["frames"]} frames -> {(card["frames"] - 1) // 2 + 1} latent frames of 8x8, 8 channels; per-channel `latents_mean` / `latents_std` from the training clips |
| text encoder | {params["text_encoder"]:,} | UMT5 (2 layers), trained from scratch with the transformer |

Weights: {card["safetensors_bytes"] / 1e6:.1f} MB of safetensors in all.

## Training (reproducible: `python scripts/train_tiny_wan_shapes.py {card["command"]}`)
- data: {card["dataset_size"]} synthetic clips drawn with PIL by `diffpo.data.moving_shapes` (extent 30-45% of the side,
  travelling {100 * lo:.0f}-{100 * hi:.0f}% of the room the image leaves the shape along its motion), seed {card["seed"]}
- VAE: {card["vae_steps"]} steps of L1 + MSE reconstruction and a small KL term ({card["vae_seconds"] / 60:.1f} min); mean absolute
  reconstruction error {card["vae_l1_pixels"]:.3f} on the [-1, 1] scale
- transformer and text encoder: {card["steps"]} steps (of {card["steps_planned"]} planned; wall-clock cap {card["max_minutes"]:g} min),
  batch {card["batch_size"]}, AdamW lr {card["lr"]} (100 warmup, cosine), rectified flow with sigma uniform then shifted by
  {card["flow_shift"]:g} (the scheduler's `flow_shift`), the text states zero-padded to {card["max_sequence_length"]} rows as WanPipeline
  passes them, {100 * card["caption_dropout"]:.0f}% caption dropout, EMA {card["ema"]} (exported);
  loss {card["first_loss"]:.3f} (first 20 steps) -> {card["final_loss"]:.3f} (last 50); `training_log.jsonl`
- wall time {card["wall_seconds"] / 60:.1f} min on {card["threads"]} CPU threads, after the VAE stage

## Measured after training (written by the script)
{samples["clips"]} clips ({samples["captions"]} captions x {samples["seeds"]} seeds, guidance 5; 95% bootstrap CIs over captions).
`motion-match`: travel along the caption's direction in image sides; "right way": the fraction of
clips whose `motion-match` exceeds 0.05 (chance about 25% for 4 directions). `colour-match`:
caption colours present and a shape, on the frames. The step counts are flow Euler steps.

| steps | right way | motion-match | colour-match |
|---|---|---|---|
{_measured_rows(samples)}

{_verdict(min(samples[k]["right_direction_fraction"] for k in samples if k.startswith("ddim_")))}
"""
    (out / "README.md").write_text(text)


def _verdict(right_fraction: float) -> str:
    """One honest line on whether the shapes move the caption's way (chance: 1 in 4)."""
    if right_fraction < 0.4:
        return "The shapes do not yet move the caption's way clearly above chance (25% for 4 directions)."
    return ("The shapes move the caption's way well above chance (25% for 4 directions). The captions are those of "
            "training; the seeds are new.")


if __name__ == "__main__":
    main()
