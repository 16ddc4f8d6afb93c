"""One GRPO round's time split on a bundled model: sampling (denoiser + VAE decode), reward scoring
and training, read from the loop's own per-round timings (``time/sampling_s``, ``time/reward_s``,
``time/training_step_s`` in metrics.jsonl).

    python benchmarks/bench_grpo_round.py [--model tiny|tiny-flow] [--method grpo|nft] [--threads 1] [--out FILE.json]

The round is the quickstart's: 8 prompts x a group of 8 samples, 10 steps with CFG 5, half the steps
of every trajectory trained in micro-batches of 8 (one optimizer step each), JPEG compressibility.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _common import RESULTS, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--method", default="grpo", choices=["grpo", "nft"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffpo.config import TrainConfig, from_dict
    from diffpo.trainers import run_training

    with tempfile.TemporaryDirectory() as tmp:
        flow = args.model != "tiny"
        sampler = {"name": "flow_sde" if args.method == "grpo" else "ode"} if flow else {}
        config = from_dict(TrainConfig, {
            "method": args.method, "output_dir": str(Path(tmp) / "run"), "max_steps": 8, "train_batch_size": 8,
            "log_every": 1, "progress_bar": False, "model": {"pretrained": args.model}, "objective": {"kl_coef": 0.0},
            "online": {"prompts_per_round": 8, "samples_per_prompt": 8, "num_inference_steps": 10, "guidance_scale": 5.0,
                       "timestep_fraction": 0.5 if args.method == "grpo" else 0.3, "rewards": ["jpeg-compressibility"],
                       "save_images": False, "sampler": sampler, **({} if flow else {"eta": 1.0 if args.method == "grpo" else 0.0})}})
        run_dir = run_training(config)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    split = {"sampling_s": rows[0]["time/sampling_s"], "reward_s": rows[0]["time/reward_s"],
             "training_s": sum(r["time/training_step_s"] for r in rows)}
    total = sum(split.values())
    print(f"{args.method} round on {args.model} (64 samples, 10 steps, CFG 5): " +
          ", ".join(f"{k[:-2]} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in split.items()))
    write_result({"model": args.model, "method": args.method, **split},
                 args.out or RESULTS / f"grpo_round_{args.method}_{args.model}.json")


if __name__ == "__main__":
    main()
