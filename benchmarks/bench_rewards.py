"""Batched reward scoring vs one image at a time with a checkpoint reload per call.

The second mode is what the ``hpsv2`` package does: it caches the model but ``hpsv2.score``
torch.loads the checkpoint into it on every call and scores one image per forward pass. The
batched time includes creating the head (loading the checkpoint once). Both run the HPS head on the same tiny random-weight open_clip model (the test suite's
config) saved as an HPS checkpoint, so the figures measure the loading/batching overhead, not the
ViT-H-14 forward pass. Not a timed test: run ``python benchmarks/bench_rewards.py [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tiny_checkpoint(folder: Path) -> tuple[str, str]:
    """A ``local-dir:`` architecture and an HPS-format checkpoint of random weights."""
    import open_clip

    (folder / "arch").mkdir()
    (folder / "arch" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    arch = f"local-dir:{folder / 'arch'}"
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, folder / "HPS_v2_compressed.pt")
    return arch, str(folder / "HPS_v2_compressed.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images to score (default 64)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rewards.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.disable(logging.WARNING)  # open_clip warns "no pretrained weights" before the checkpoint loads
    from diffpo.rewards import load

    images = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt number {i % 8}" for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        arch, checkpoint = tiny_checkpoint(Path(tmp))
        # process-wide one-time costs (imports, the tokenizer's BPE tables) are paid once by both
        # modes in real use: pay them before either clock starts, or the batched mode alone pays
        load("hps-v2", path=checkpoint, arch=arch, device=args.device)(images[:1], prompts[:1])
        start = time.perf_counter()
        head = load("hps-v2", path=checkpoint, arch=arch, device=args.device, batch_size=args.batch_size)
        batched_scores = head(images, prompts)
        batched = time.perf_counter() - start

        single = load("hps-v2", path=checkpoint, arch=arch, device=args.device, batch_size=1)
        start = time.perf_counter()
        single_scores = []
        for image, prompt in zip(images, prompts):  # as hpsv2.score: model cached, checkpoint reloaded per call
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
            single.encoder.model.load_state_dict(state)
            single_scores.append(single(image[None], [prompt]))
        reloading = time.perf_counter() - start
    result = {
        "head": "hps-v2 (tiny random-weight open_clip ViT, HPS checkpoint format)",
        "images": args.images, "image_size": args.size, "batch_size": args.batch_size, "device": args.device,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "batched_images_per_s": args.images / batched,
        "reload_per_image_images_per_s": args.images / reloading,
        "speedup": reloading / batched,
        "max_abs_score_difference": float((batched_scores - torch.cat(single_scores)).abs().max()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"batched (load once, batch {args.batch_size}): {result['batched_images_per_s']:.1f} images/s")
    print(f"one at a time, checkpoint reloaded per call:  {result['reload_per_image_images_per_s']:.1f} images/s")
    print(f"speedup {result['speedup']:.1f}x; max |score difference| {result['max_abs_score_difference']:.2e}; written to {args.out}")


if __name__ == "__main__":
    main()
