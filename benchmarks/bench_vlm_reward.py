"""Batched VLM reward scoring vs one image per call, on the hps-v3 head.

Both modes use one head (weights loaded once) on a tiny random-weight Qwen2-VL saved as
HPSv3.safetensors (diffpo.rewards.tiny_qwen2vl), with the released prompt (~2,400 tokens per
image under the tiny byte-level tokenizer) and 256·28·28-pixel images cut to ``--pixels``. "One
per call" calls the head once per image, as a scoring loop over files does; "batched" scores
all images in one call with ``--batch-size`` images per forward (right-padded, one processor call).
The ratio is what transfers to the real 7B model on a GPU, where one image leaves the device
mostly idle. Run ``python benchmarks/bench_vlm_reward.py [--out FILE]``; not a timed test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, print_table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pixels", type=int, default=16 * 28 * 28, help="pixels per image (default 16 visual tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "vlm_reward.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffpo.rewards import load
    from diffpo.rewards.tiny_qwen2vl import save_tiny_hps_v3

    images = torch.rand(args.images, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt number {i} " + "with more words " * (i % 4) for i in range(args.images)]  # unequal lengths: padding is paid
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_hps_v3(Path(tmp) / "hpsv3")
        options = dict(path=str(folder), arch=str(folder), processor_path=str(folder / "processor"),
                       pixels=args.pixels, device=args.device)
        head = load("hps-v3", batch_size=args.batch_size, **options)
        head(images[:2], prompts[:2])  # warm-up: first-call costs (chat template compile, allocator) paid by neither clock

        start = time.perf_counter()
        single = torch.cat([head(images[i : i + 1], prompts[i : i + 1]) for i in range(args.images)])
        one_per_call = time.perf_counter() - start

        start = time.perf_counter()
        batched_scores = head(images, prompts)
        batched = time.perf_counter() - start
    rows = [{"mode": "one image per call", "seconds": one_per_call, "images_per_s": args.images / one_per_call},
            {"mode": f"batched ({args.batch_size} per forward)", "seconds": batched, "images_per_s": args.images / batched}]
    print_table(rows, ["mode", "seconds", "images_per_s"])
    result = {"head": "hps-v3 (tiny random-weight Qwen2-VL in the HPSv3.safetensors format, released prompt)",
              "images": args.images, "batch_size": args.batch_size, "pixels": args.pixels, "device": args.device,
              "one_per_call_s": one_per_call, "batched_s": batched, "speedup": one_per_call / batched,
              "max_abs_score_difference": float((batched_scores - single).abs().max())}
    out = write_result(result, args.out)
    print(f"speedup {result['speedup']:.2f}x; max |score difference| {result['max_abs_score_difference']:.2e}; written to {out}")


if __name__ == "__main__":
    main()
