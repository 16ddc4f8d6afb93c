"""Measure how often the bundled tiny models draw the captioned colours (the ``colour-match`` reward).

``python scripts/measure_tiny_colour_match.py --flow diffpo/assets/tiny-flow-shapes --out colour_match.json``
samples every shapes caption with each seed from the flow model (Euler, classifier-free guidance)
and from the UNet model ``tiny-sd-shapes`` (DDIM), scores both with ``colour-match`` and prints the
means with 95% bootstrap CIs, the paired win rate (shared captions and seeds) and the sampling time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


@torch.no_grad()
def sample_flow(pipe, captions: list[str], seeds: list[int], steps: int, guidance: float, t5_length: int,
                batch_size: int = 45) -> torch.Tensor:
    """Images in [0, 1] from an SD3 pipeline; x_1 noise for each seed drawn as diffpo's generator draws it."""
    from diffpo.eval.generate import initial_latents

    size = pipe.transformer.config.sample_size
    latents = initial_latents(seeds, (pipe.transformer.config.in_channels, size, size))
    images = []
    for start in range(0, len(captions), batch_size):
        stop = start + batch_size
        out = pipe(captions[start:stop], latents=latents[start:stop], num_inference_steps=steps,
                   guidance_scale=guidance, max_sequence_length=t5_length, output_type="pt")
        images.append(out.images.float())
    return torch.cat(images).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flow", default="diffpo/assets/tiny-flow-shapes", help="StableDiffusion3Pipeline folder")
    parser.add_argument("--unet", default="tiny", help="the UNet model to compare with ('' to skip)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--t5-length", type=int, default=16, help="max_sequence_length for the flow model")
    parser.add_argument("--check-t5-length", type=int, default=None,
                        help="also sample the flow model at this T5 length (e.g. the pipeline's default 256) "
                             "and report its score and how far its pixels move")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusion3Pipeline

    from diffpo.data.shapes import shape_captions
    from diffpo.eval.stats import paired_win_rate, summarize
    from diffpo.rewards import load

    captions = [c for c in shape_captions() for _ in range(args.seeds)]
    seeds = [s for _ in shape_captions() for s in range(args.seeds)]
    reward = load("colour-match")
    results = {"captions": len(set(captions)), "seeds_per_caption": args.seeds, "steps": args.steps,
               "guidance": args.guidance, "threads": args.threads}
    scores = {}

    pipe = StableDiffusion3Pipeline.from_pretrained(args.flow)
    pipe.set_progress_bar_config(disable=True)
    started = time.time()
    images = sample_flow(pipe, captions, seeds, args.steps, args.guidance, args.t5_length)
    seconds = time.time() - started
    scores["flow"] = reward(images, captions)
    results["flow"] = {**summarize(scores["flow"].numpy()), "sampling_seconds": seconds,
                       "sampler": f"FlowMatchEuler {args.steps} steps, guidance {args.guidance}, "
                                  f"T5 length {args.t5_length}",
                       "above_0.7": float((scores["flow"] > 0.7).float().mean())}

    if args.check_t5_length:
        started = time.time()
        other = sample_flow(pipe, captions, seeds, args.steps, args.guidance, args.check_t5_length)
        other_scores = reward(other, captions)
        results[f"flow_t5_length_{args.check_t5_length}"] = {
            **summarize(other_scores.numpy()), "sampling_seconds": time.time() - started,
            "mean_abs_pixel_difference": float((other - images).abs().mean()),
        }

    if args.unet:
        from diffpo.eval.generate import generate
        from diffpo.models.loading import load_stack

        unet_pipe = load_stack(args.unet).pipeline()
        unet_pipe.set_progress_bar_config(disable=True)
        started = time.time()
        images = generate(unet_pipe, captions, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          batch_size=45)
        seconds = time.time() - started
        scores["unet"] = reward(images, captions)
        results["unet"] = {**summarize(scores["unet"].numpy()), "sampling_seconds": seconds,
                           "sampler": f"DDIM {args.steps} steps, guidance {args.guidance}",
                           "above_0.7": float((scores["unet"] > 0.7).float().mean())}
        results["flow_vs_unet_win_rate"] = paired_win_rate(scores["flow"].numpy(), scores["unet"].numpy())
    for name, values in scores.items():  # per shape: where the errors are
        results[name]["by_shape"] = {shape: float(values[[shape in c for c in captions]].mean())
                                     for shape in ("circle", "square", "triangle")}
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
