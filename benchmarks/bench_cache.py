"""Cache: training pairs/s reading VAE latents + text embeddings from the cache vs encoding
every step, with the same seeds (so the same draws and, up to VAE rounding, the same losses).

Both runs are the real loop (``run_training``) on the same data; the first logged step is left
out of the throughput (warm-up). The one-off cache build is timed separately. Target: >= 1.5x
on the bundled model (its VAE is tiny: the gain grows with SD-sized VAEs, which cost 1.6x a UNet
forward per image at 512 px).

    python benchmarks/bench_cache.py [--model tiny] [--pairs 8] [--steps 20] [--threads 1] [--out FILE]
    python benchmarks/bench_cache.py --model tiny-sd3 --t5-width 512 --t5-layers 8 --out benchmarks/results/cache_sd3_t5.json

``--model tiny-sd3``: a random tiny SD3 stack whose T5 encoder (``--t5-width`` x ``--t5-layers``,
256 tokens per caption) runs every step without the cache and never with it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import RESULTS, losses, model_source, print_table, shapes_pairs, steady_pairs_per_s, train_config, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="hub id or diffusers folder (default: the bundled tiny model), "
                        "or tiny-sd3 / tiny-flux (random tiny flow transformers with a T5 encoder)")
    parser.add_argument("--t5-width", type=int, default=64, help="tiny-sd3 / tiny-flux: the T5 encoder's d_model")
    parser.add_argument("--t5-layers", type=int, default=2, help="tiny-sd3: the T5 encoder's layers")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (one logged per step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "cache.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffpo.data.cache import build_cache
    from diffpo.data.pairs import build_pairs
    from diffpo.models.loading import load_stack
    from diffpo.trainers import run_training

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = model_source(args.model, tmp / "model", args.t5_width, args.t5_layers)
        stack = load_stack(source)
        data = shapes_pairs(tmp, args.pairs * args.steps, stack.native_resolution)
        common = [f"train_batch_size={args.pairs}", f"max_steps={args.steps}", "log_every=1", f"cache.dir={tmp / 'cache'}"]
        start = time.perf_counter()
        config = train_config(source, data, tmp / "cached", *common, "cache.enabled=true")
        build_cache(stack, build_pairs(config.data, stack.native_resolution, config.seed), config.cache.dir,
                    config.cache.dtype, config.cache.shard_size, progress=False, text_dtype=config.cache.text_dtype)
        build_s = time.perf_counter() - start
        run_training(train_config(source, data, tmp / "encoding", *common))
        run_training(config)
        rates = {name: steady_pairs_per_s(tmp / name, args.pairs) for name in ("encoding", "cached")}
        loss = {name: losses(tmp / name) for name in ("encoding", "cached")}
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(loss["encoding"], loss["cached"]))
    text_encoder_params = sum(p.numel() for encoder in stack.text_encoders for p in encoder.parameters())
    result = {"model": args.model, "text_encoder_params": text_encoder_params, "pairs": args.pairs, "steps": args.steps, "pairs_per_s": rates,
              "speedup": rates["cached"] / rates["encoding"], "cache_build_s": build_s,
              "cache_build_pairs_per_s": args.pairs * args.steps / build_s,
              "first_loss_abs_difference": abs(loss["encoding"][0] - loss["cached"][0]),
              "max_loss_rel_difference": worst, "target": ">= 1.5x"}
    print_table([{"run": "encode every step", "pairs/s": rates["encoding"], "x": 1.0},
                 {"run": "from the cache", "pairs/s": rates["cached"], "x": result["speedup"]}], ["run", "pairs/s", "x"])
    print(f"cache built in {build_s:.1f} s; losses equal within {worst:.1e} (relative; first step "
          f"{result['first_loss_abs_difference']:.1e}); written to {write_result(result, args.out)}")


if __name__ == "__main__":
    main()
