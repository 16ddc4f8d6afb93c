"""Pretrain the bundled tiny flow-matching model (SD3 architecture) on synthetic captioned shapes.

Reproducible on one CPU thread: ``python scripts/train_tiny_flow_shapes.py --out diffpo/assets/tiny-flow-shapes``.
Stage 1 trains a 16-channel AutoencoderKL (reconstruction + a small KL term) and encodes a fixed set
of shape images once; its shift and scaling factors come from those latents' statistics. Stage 2
trains the SD3Transformer2DModel and the three text encoders jointly with the rectified-flow
objective: x_t = (1 - s) x_0 + s e, target e - x_0, s logit-normal with the scheduler's shift,
10% caption dropout (classifier-free guidance) and an EMA of the transformer, which is exported.

Both stages checkpoint into ``--work-dir``; rerunning the same command resumes where it stopped
(a finished VAE stage is not repeated). ``--export-only`` writes the pipeline folder from the last
checkpoint, e.g. after stopping a run early.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffpo.data.shapes import ShapeSpec, all_specs, sample_shapes
from diffpo.models.tiny import build_tiny_sd3_components, tiny_sd3_transformer_config

CLIP_WIDTH, T5_WIDTH, CLIP_MAX_LENGTH = 32, 64, 16


def transformer_config(width: int, layers: int, heads: int) -> dict:
    """The bundled model's SD3Transformer2DModel: 2x2 patches of 16x16x16 latents (64 tokens),
    q/k RMS norm as in SD3.5, ``layers`` joint blocks of ``width`` channels."""
    return {
        **tiny_sd3_transformer_config(CLIP_WIDTH, T5_WIDTH),
        "patch_size": 2,
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": width // heads,
        "caption_projection_dim": width,
        "pos_embed_max_size": 8,
        "qk_norm": "rms_norm",
    }


def build(args) -> dict:
    return build_tiny_sd3_components(
        seed=args.seed, clip_width=CLIP_WIDTH, t5_width=T5_WIDTH, clip_max_length=CLIP_MAX_LENGTH,
        transformer_config=transformer_config(args.width, args.layers, args.heads), shift=args.shift,
    )


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], (B, 3, H, W)."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, steps: int, batch_size: int, seed: int) -> list[dict]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    vae.train()
    log = []
    for step in (progress := tqdm(range(steps), desc="vae")):
        images = to_tensor([im for im, _ in sample_shapes(batch_size, seed=seed * 100_003 + step)])
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            log.append({"step": step, "loss": float(loss)})
            progress.set_postfix(loss=f"{float(loss):.4f}")
    vae.eval()
    return log


@torch.no_grad()
def encode_dataset(vae, count: int, seed: int) -> dict:
    """Latent mean/std of ``count`` fixed shape images, their caption indices and the VAE's PSNR."""
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
    captions = [spec.caption for spec in all_specs()]
    index = torch.tensor([captions.index(c) for _, c in pairs])
    return {"means": torch.cat(means), "stds": torch.cat(stds), "caption_index": index,
            "psnr": torch.cat(psnrs).mean()}


def vae_stage(parts: dict, args, work: Path) -> dict:
    """Train (or reload) the VAE, set its shift/scaling factors, and return the encoded dataset."""
    from diffusers import AutoencoderKL

    if (work / "dataset.pt").is_file():
        parts["vae"] = AutoencoderKL.from_pretrained(work / "vae").eval()
        state = json.loads((work / "vae_stage.json").read_text())
        return {**torch.load(work / "dataset.pt", weights_only=True), **state}
    started = time.time()
    log = train_vae(parts["vae"], args.vae_steps, 32, args.seed)
    data = encode_dataset(parts["vae"], args.dataset_size, args.seed + 1)
    # SD3 maps latents to the transformer as (z - shift) * scale: centre and whiten them
    shift = float(data["means"].mean())
    scale = float(1.0 / (data["means"] - shift).std())
    parts["vae"].register_to_config(shift_factor=shift, scaling_factor=scale)
    parts["vae"].save_pretrained(work / "vae", safe_serialization=True)
    torch.save({k: v for k, v in data.items() if k != "psnr"}, work / "dataset.pt")
    state = {"vae_log": log, "vae_psnr_db": float(data["psnr"]), "vae_seconds": time.time() - started}
    (work / "vae_stage.json").write_text(json.dumps(state))
    return {**data, **state}


def sample_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal(0, 1) sigmas with SD3's static shift: s' = shift s / (1 + (shift - 1) s)."""
    sigmas = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def text_encoders(pipe) -> list:
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def save_checkpoint(path: Path, pipe, ema, optimizer, step: int, generator, log: list) -> None:
    state = {
        "transformer": pipe.transformer.state_dict(),
        "ema": ema.state_dict(),
        "text_encoders": [e.state_dict() for e in text_encoders(pipe)],
        "optimizer": optimizer.state_dict(),
        "step": step,
        "generator": generator.get_state(),
        "log": log,
    }
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: Path, pipe, ema, optimizer, generator) -> tuple[int, list]:
    state = torch.load(path, weights_only=True)
    pipe.transformer.load_state_dict(state["transformer"])
    ema.load_state_dict(state["ema"])
    for encoder, weights in zip(text_encoders(pipe), state["text_encoders"]):
        encoder.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"], state["log"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="diffpo/assets/tiny-flow-shapes", help="pipeline folder to write")
    parser.add_argument("--work-dir", default="runs/tiny-flow-shapes", help="checkpoints; rerun to resume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=2400, help="transformer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dataset-size", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--shift", type=float, default=1.0,
                        help="the scheduler's static shift: SD3 uses 3.0 at 1024 px (4,096 tokens) and scales it "
                             "with resolution; at 64 tokens 1.0 keeps enough training at low noise for flat colours")
    parser.add_argument("--t5-lengths", type=int, nargs="+", default=[16, 16, 16, 16, 16, 16, 64, 256],
                        help="T5 sequence lengths, one drawn per step: mostly short for speed, some at the "
                             "pipeline's default 256 so that padding length does not change the images")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-only", action="store_true", help="write --out from the last checkpoint")
    parser.add_argument("--vae-only", action="store_true", help="stop after stage 1 (the VAE and the latents)")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite --out's README.md from its training.json (and colour_match.json, written by "
                             "scripts/measure_tiny_colour_match.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.card_only:
        write_model_card(Path(args.out), json.loads((Path(args.out) / "training.json").read_text()))
        return
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    from diffusers import StableDiffusion3Pipeline

    parts = build(args)
    data = vae_stage(parts, args, work)
    if args.vae_only:
        print(json.dumps({"vae_psnr_db": data["vae_psnr_db"], "vae_seconds": data["vae_seconds"]}))
        return
    vae = parts["vae"].requires_grad_(False)
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    captions = [spec.caption for spec in all_specs()]

    params = list(transformer.parameters()) + [p for e in text_encoders(pipe) for p in e.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warmup = 100

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    checkpoint = work / "checkpoint.pt"
    start, log = 0, []
    if checkpoint.is_file():
        start, log = load_checkpoint(checkpoint, pipe, ema, optimizer, generator)
        for group in optimizer.param_groups:  # LambdaLR resumes from the step count, not the file
            group["lr"] = args.lr * lr_factor(start)
        schedule.last_epoch = start
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    resumed_seconds = log[-1]["seconds"] if log else 0.0
    stage_started = time.time()

    transformer.train()
    for encoder in text_encoders(pipe):
        encoder.train()
    window = []
    progress = tqdm(range(start, args.steps), desc="transformer", initial=start, total=args.steps,
                    disable=args.export_only)
    for step in progress if not args.export_only else []:
        index = torch.randint(0, args.dataset_size, (args.batch_size,), generator=generator)
        z = data["means"][index] + data["stds"][index] * torch.randn(data["means"][index].shape, generator=generator)
        x0 = (z - shift) * scale
        drop = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        prompts = ["" if d else captions[i] for d, i in zip(drop, data["caption_index"][index])]
        length = args.t5_lengths[int(torch.randint(0, len(args.t5_lengths), (1,), generator=generator))]
        # the pipeline's own prompt encoding, so that training sees exactly what sampling feeds in
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                                         do_classifier_free_guidance=False,
                                                         max_sequence_length=length)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(args.batch_size, args.shift, generator)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        velocity = transformer(hidden_states=x_t, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                               timestep=sigma * 1000).sample
        loss = F.mse_loss(velocity.float(), (noise - x0).float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: lower --lr or resume from the checkpoint")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        window.append(float(loss))
        if (step + 1) % 10 == 0:
            seconds = resumed_seconds + time.time() - stage_started
            log.append({"step": step + 1, "loss": float(np.mean(window)), "lr": schedule.get_last_lr()[0],
                        "seconds": round(seconds, 1)})
            progress.set_postfix(loss=f"{np.mean(window):.4f}")
            window = []
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save_checkpoint(checkpoint, pipe, ema, optimizer, step + 1, generator, log)

    export(pipe, ema, args, data, log, Path(args.out), time.time() - started)


def export(pipe, ema, args, data: dict, log: list, out: Path, session_seconds: float) -> None:
    """Write the pipeline (EMA transformer), samples.png, training.json and the model card."""
    pipe.transformer = ema.eval()
    for encoder in text_encoders(pipe):
        encoder.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    save_samples(pipe, out / "samples.png", args.seed)
    components = {name: getattr(pipe, name) for name in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                         "text_encoder_3")}
    card = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "steps": log[-1]["step"] if log else 0,
        "planned_steps": args.steps,
        "batch_size": args.batch_size,
        "dataset_size": args.dataset_size,
        "lr": args.lr,
        "shift": args.shift,
        "t5_lengths": args.t5_lengths,
        "caption_dropout": args.caption_dropout,
        "ema_decay": args.ema_decay,
        "width": args.width,
        "layers": args.layers,
        "heads": args.heads,
        "vae_final_loss": data["vae_log"][-1]["loss"],
        "vae_psnr_db": data["vae_psnr_db"],
        "vae_seconds": data["vae_seconds"],
        "transformer_seconds": log[-1]["seconds"] if log else 0.0,
        "final_loss": log[-1]["loss"] if log else float("nan"),
        "shift_factor": pipe.vae.config.shift_factor,
        "scaling_factor": pipe.vae.config.scaling_factor,
        "threads": args.threads,
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in components.items()},
        "safetensors_bytes": sum(p.stat().st_size for p in out.rglob("*.safetensors")),
        "captions": len(all_specs()),
        "vae_log": data["vae_log"],
        "loss_log": log,
    }
    (out / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    write_model_card(out, card)
    print(json.dumps({k: v for k, v in card.items() if not k.endswith("_log")}, indent=2))


def measured_section(out: Path) -> str:
    """The card's results, from ``colour_match.json`` when it has been measured."""
    path = out / "colour_match.json"
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    flow, n = m["flow"], m["captions"] * m["seeds_per_caption"]

    def row(name: str, r: dict) -> str:
        ci = r["ci95"]
        shapes = " / ".join(f"{v:.2f}" for v in r["by_shape"].values())
        return (f"| {name} | {r['sampler']} | {r['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {r['above_0.7']:.0%} "
                f"| {shapes} | {r['sampling_seconds']:.0f} s |")

    lines = [
        "",
        f"## Measured after training (`python scripts/measure_tiny_colour_match.py --flow {out} --seeds "
        f"{m['seeds_per_caption']} --check-t5-length 256`)",
        f"`colour-match` over all {m['captions']} captions with seeds 0-{m['seeds_per_caption'] - 1} each ({n} "
        "images; both models draw their initial noise from the same seeds), mean with a 95% bootstrap CI; "
        f"sampling time for all {n} images on {m['threads']} CPU thread of a shared machine:",
        "",
        "| model | sampler | colour-match | share > 0.7 | circle / square / triangle | sampling |",
        "|---|---|---|---|---|---|",
        row("tiny-flow-shapes (this)", flow),
    ]
    if "unet" in m:
        lines.append(row("tiny-sd-shapes (UNet)", m["unet"]))
        w = m["flow_vs_unet_win_rate"]
        lines += ["", f"Paired win rate of this model over the UNet model on the same captions and seeds: "
                      f"{w['mean']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] ({w['wins']} wins, {w['ties']} ties, "
                      f"{w['losses']} losses)."]
    for key, r in m.items():
        if key.startswith("flow_t5_length_"):
            lines += ["", f"With the pipeline's default T5 length ({key.rsplit('_', 1)[1]} tokens) instead of 16 the "
                          f"same images score {r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (mean absolute "
                          f"pixel difference {r['mean_abs_pixel_difference']:.3f}) and take {r['sampling_seconds']:.0f} s."]
    lines += ["", "`colour-match` checks colours, not shapes: as `samples.png` shows, the colours are flat and right while "
                  "the shapes are still rounded blobs more than circles, squares and triangles, and the images that "
                  "score 0 have no pixel of the shape's colour (in `samples.png`: plain backgrounds). Longer training is the obvious next step for shapes."]
    return "\n".join(lines) + "\n"


def write_model_card(out: Path, card: dict) -> None:
    """The folder's README: what the model is, how it was trained, how to rebuild it."""
    params = card["parameters"]
    measured = measured_section(out)
    text = f"""# tiny-flow-shapes

A real `StableDiffusion3Pipeline` (SD3Transformer2DModel, 16-channel AutoencoderKL, two
CLIPTextModelWithProjection, T5EncoderModel, their tokenizers, FlowMatchEulerDiscreteScheduler;
safetensors) small enough to train and align on a CPU. It draws one filled shape (circle, square,
triangle) of one colour (red, green, blue, yellow, white, black) on a plain background of another
colour, 32x32 pixels, from captions like "a red circle on a blue background" ({card["captions"]} captions).
It is the flow-matching counterpart of `tiny-sd-shapes`: same data, same rewards.

```python
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("diffpo/assets/tiny-flow-shapes")
image = pipe("a yellow triangle on a black background", num_inference_steps=25, guidance_scale=5.0,
             max_sequence_length=16).images[0]
```

`max_sequence_length=16` (T5 tokens) samples several times faster than the pipeline's default 256;
training mixed lengths from 16 to 256 so that both work (measured below). `samples.png`: rows circle / square / triangle;
25 Euler steps, guidance 5, seed {card["seed"]}.

## Architecture
| component | parameters | notes |
|---|---|---|
| transformer | {params["transformer"]:,} | SD3Transformer2DModel: {card["layers"]} joint blocks, width {card["width"]} ({card["heads"]} heads), 2x2 patches of 16x16x16 latents (64 image tokens), q/k RMS norm (SD3.5) |
| VAE | {params["vae"]:,} | blocks (32, 64): factor 2, 16 latent channels, no quant convs; shift {card["shift_factor"]:.4f}, scale {card["scaling_factor"]:.4f} (from the latents) |
| text encoder (CLIP 1) | {params["text_encoder"]:,} | CLIPTextModelWithProjection, 2 layers, width {CLIP_WIDTH}, {CLIP_MAX_LENGTH} tokens |
| text encoder 2 (CLIP 2) | {params["text_encoder_2"]:,} | same shape, own weights; both CLIPs' penultimate states are concatenated (64) and their pooled outputs feed AdaLN |
| text encoder 3 (T5) | {params["text_encoder_3"]:,} | T5EncoderModel, 2 layers, d_model {T5_WIDTH}; tokenizer = Unigram T5TokenizerFast over CLIP's first 8,000 BPE merges (`diffpo.models.tokenizer.build_t5_tokenizer`) |

CLIP tokenizers: CLIP BPE (from open_clip) truncated to the first 2,000 merges. Scheduler:
FlowMatchEulerDiscreteScheduler, static shift {card["shift"]}. Weights: {card["safetensors_bytes"] / 1e6:.1f} MB of safetensors in all.

## Training (reproducible: `python scripts/train_tiny_flow_shapes.py --out diffpo/assets/tiny-flow-shapes --vae-steps {card["vae_steps"]} --steps {card["planned_steps"]}`)
- data: synthetic shapes drawn with PIL by `diffpo.data.shapes` (random size 35-65% of the side and position), seed {card["seed"]}
- stage 1, VAE: {card["vae_steps"]} steps, batch 32, AdamW 1e-3 cosine, MSE + 1e-6 KL; final loss {card["vae_final_loss"]:.5f}, PSNR {card["vae_psnr_db"]:.1f} dB on {card["dataset_size"]} images; {card["vae_seconds"] / 60:.1f} min
- stage 2, transformer + the three text encoders jointly: {card["steps"]} of {card["planned_steps"]} planned steps, batch {card["batch_size"]}, AdamW {card["lr"]:g} (100 warmup, cosine), rectified flow (x_t = (1 - s) x_0 + s e, target e - x_0, unweighted MSE), s logit-normal(0, 1) with shift {card["shift"]}, {card["caption_dropout"]:.0%} caption dropout, T5 lengths drawn from {card["t5_lengths"]}, EMA {card["ema_decay"]} (exported), latents of {card["dataset_size"]} fixed images encoded once; final loss {card["final_loss"]:.4f} (`training.json` has the loss log)
- wall time {(card["vae_seconds"] + card["transformer_seconds"]) / 60:.1f} min on {card["threads"]} CPU thread, sharing 2 cores with other work
{measured}"""
    (out / "README.md").write_text(text)


@torch.no_grad()
def save_samples(pipe, path: Path, seed: int) -> None:
    """One row per shape: 25-step Euler samples with guidance 5, to eyeball the model."""
    from diffpo.eval.grid import image_grid

    specs = [
        ShapeSpec(shape, colour, background)
        for shape in ("circle", "square", "triangle")
        for colour, background in (("red", "blue"), ("green", "yellow"), ("blue", "white"), ("yellow", "black"),
                                   ("white", "green"), ("black", "red"))
    ]
    images = pipe([s.caption for s in specs], num_inference_steps=25, guidance_scale=5.0, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(seed), output_type="pil").images
    image_grid(images, rows=3, scale=3).save(path)


if __name__ == "__main__":
    main()
