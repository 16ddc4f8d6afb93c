"""``diffpo quickstart``: align the bundled tiny model end to end, offline, in a few minutes.

1. sample candidate pairs from the tiny model for shape captions: the two images of a pair share
   the initial noise x_T and diverge through DDIM eta noise;
2. label each pair with a programmatic reward and write a Pick-a-Pic-format parquet;
3. train Diffusion-DPO LoRA (or another ``method=``) on it with the offline-pairs trainer;
4. generate base and aligned images on held-out seeds (the same x_T for both models) and report
   the reward before/after with 95% bootstrap CIs, the paired win rate, and a before/after grid.

``model=video`` does the same with the bundled text-to-video model (``assets/tiny-video-shapes``)
on moving-shape captions: clips instead of images, a video report (GIFs, per-frame scores,
temporal consistency) instead of an image one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal

import torch

from diffpo.config import ConfigError, TrainConfig, save_config


@dataclass
class QuickstartConfig:
    """The embedded default job (``configs/quickstart.yaml``)."""

    output_dir: str = "runs/quickstart"
    method: str = "diffusion_dpo"
    seed: int = 0
    model: str = "tiny"  # tiny (images), video (the bundled video model), or a diffusers folder / hub id
    num_frames: int = 4  # video models: frames per clip, sampled, trained and evaluated
    eval_prompts: int | None = None  # held-out captions for before/after (None: every caption of the world)
    reward: str = "colour-match"  # the reward that labels the pairs: a name in diffpo.rewards.REWARDS
    check_rewards: list[str] = field(default_factory=lambda: ["colour-match"])  # also reported, to catch reward hacking
    num_prompts: int = 90  # shape captions used for the pairs (90 = all of them)
    samples_per_prompt: int = 4  # candidates per prompt
    share_initial_noise: bool = True  # a prompt's candidates share x_T (pairs); false: each its own (winners-only methods)
    pairing: Literal["all", "best_worst"] = "all"  # every pair of candidates, or only best vs worst
    winners: Literal["samples", "renders"] = "samples"  # winners-only methods (SePPO, DRO): the pairs' winners, or clean renders of the captions
    min_margin: float = 0.0  # pairs whose rewards differ by no more than this are ties (dropped)
    sample_steps: int = 20
    sample_eta: float = 1.0
    guidance_scale: float = 5.0
    eval_seeds_per_prompt: int = 2  # held-out seeds per caption for before/after
    eval_steps: int = 25
    batch_size: int = 30
    grid_prompts: int = 8
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.share_initial_noise and self.sample_eta == 0:
            raise ConfigError("sample_eta=0 with share_initial_noise=true gives identical candidates: raise "
                              "sample_eta or set share_initial_noise=false")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt={self.samples_per_prompt} must be >= 2 to form pairs")
        from diffpo.rewards import REWARDS

        for name in [self.reward, *self.check_rewards]:
            if name not in REWARDS:
                raise ConfigError(f"reward {name!r} is unknown; available: {', '.join(sorted(REWARDS))}")


QUICKSTART_PRESETS = {"d3po": "quickstart_d3po.yaml", "seppo": "quickstart_seppo.yaml", "dro": "quickstart_dro.yaml",
                      "smpo": "quickstart_smpo.yaml"}
MODEL_PRESETS = {"video": "quickstart_video.yaml", "flow": "quickstart_flow.yaml"}  # model presets, whatever the method
QUICKSTART_MODELS = {"video": "tiny-video", "flow": "tiny-flow"}  # quickstart model names -> bundled models
WINNERS_ONLY = ("seppo", "dro")  # methods that train on preferred images alone (SePPO winners, DRO experts)


def default_config_path(method: str | None = None, model: str | None = None) -> Path:
    """The shipped quickstart YAML of ``model`` (video) or else of ``method`` (the online methods
    have their own tuned presets)."""
    from diffpo.resources import shipped_config

    return shipped_config(MODEL_PRESETS.get(model) or QUICKSTART_PRESETS.get(method, "quickstart.yaml"))


def _world(video: bool):
    """(captions(count, seed), category of a caption) of the shapes or the moving-shapes world."""
    if video:
        from diffpo.data.moving_shapes import motion_captions, parse_motion_caption

        return motion_captions, lambda caption: parse_motion_caption(caption).direction
    from diffpo.data.shapes import parse_caption, shape_captions

    return shape_captions, lambda caption: parse_caption(caption).shape


def run_quickstart(config: QuickstartConfig) -> dict:
    from diffpo.eval.generate import generate, to_pil
    from diffpo.eval.grid import image_grid
    from diffpo.eval.stats import paired_win_rate, summarize
    from diffpo.eval.video import temporal_consistency
    from diffpo.models.loading import load_stack
    from diffpo.rewards import load as load_reward
    from diffpo.trainers import run_training

    started = time.time()
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.seed)
    reward = load_reward(config.reward)
    model = QUICKSTART_MODELS.get(config.model, config.model)
    stack = load_stack(model)
    pipe = stack.pipeline()
    pipe.set_progress_bar_config(disable=True)
    frames = config.num_frames if stack.is_video else None  # None: an image model
    captions_of, category_of = _world(stack.is_video)
    shape = stack.family.pipeline_latent_shape(pipe, None, frames)  # x_T: (C, [F,] h, w), UNet or flow transformer

    # 1-2. offline data (not for D3PO, which samples its own rounds while it trains): candidates
    # sharing x_T per prompt, diverging through eta noise, paired and labelled by the reward
    data, sampled = {}, {}
    video_data = {} if frames is None else {"num_frames": frames}
    if config.method in WINNERS_ONLY and config.winners == "renders":
        parquet, sampled = _render_winners(config, stack.native_resolution, frames)
        data = {"data": dataclasses.replace(config.train.data, source=str(parquet), **video_data)}
    elif config.method != "d3po":
        parquet, sampled = _sample_pairs(config, pipe, shape, reward, captions_of, frames)
        data = {"data": dataclasses.replace(config.train.data, source=str(parquet), **video_data)}

    # 3. train
    online = config.train.online
    if config.method != "dro":  # DRO's lagged copy samples with its own solver and (no) guidance
        online = dataclasses.replace(online, eta=config.sample_eta, guidance_scale=config.guidance_scale)
    if config.method == "d3po":  # its rounds are the quickstart's candidates
        online = dataclasses.replace(online, prompts="shapes", rewards=[config.reward], min_margin=config.min_margin,
                                     samples_per_prompt=config.samples_per_prompt, num_inference_steps=config.sample_steps)
    train_config = dataclasses.replace(
        config.train, method=config.method, seed=config.seed, output_dir=str(run_dir / "train"),
        model=dataclasses.replace(config.train.model, pretrained=model), online=online, **data)
    train_dir = run_training(train_config)

    # 4. before / after on held-out seeds, identical initial noise for both models
    eval_captions = captions_of() if config.eval_prompts is None else captions_of(config.eval_prompts, seed=config.seed + 1)
    n = config.eval_seeds_per_prompt
    eval_prompts = [c for c in eval_captions for _ in range(n)]
    eval_seeds = [10_000_000 + config.seed * 100_000 + i for i in range(len(eval_prompts))]
    before = generate(pipe, eval_prompts, eval_seeds, config.eval_steps, config.guidance_scale,
                      batch_size=config.batch_size, progress=True, desc="base model", num_frames=frames)
    _load_trained(pipe, stack, train_dir / "final", config.train.finetune)
    after = generate(pipe, eval_prompts, eval_seeds, config.eval_steps, config.guidance_scale,
                     batch_size=config.batch_size, progress=True, desc="aligned model", num_frames=frames)
    r_before, r_after = reward(before, eval_prompts), reward(after, eval_prompts)

    stride = max(1, len(eval_captions) // max(config.grid_prompts, 1))  # spread over shapes and colours
    rows = [i * n for i in range(0, len(eval_captions), stride)][: config.grid_prompts]
    shown_before, shown_after = before[rows], after[rows]
    if frames is not None:  # film strips in the grid (frames left to right), the clips in a GIF
        from diffpo.eval.video import save_gif

        save_gif(torch.cat([torch.cat(list(shown_before), dim=-1), torch.cat(list(shown_after), dim=-1)], dim=-2),
                 run_dir / "before_after.gif", fps=4)
        shown_before, shown_after = _film_strips(shown_before), _film_strips(shown_after)
    grid = image_grid(to_pil(shown_before) + to_pil(shown_after), rows=2, scale=4)
    grid.save(run_dir / "before_after.png")
    result = {
        "reward": config.reward,
        "method": config.method,
        "reward_before": summarize(r_before.numpy(), seed=config.seed),
        "reward_after": summarize(r_after.numpy(), seed=config.seed),
        "win_rate": paired_win_rate(r_after.numpy(), r_before.numpy(), seed=config.seed),
        "checks": {name: {"before": summarize(head(before, eval_prompts).numpy(), seed=config.seed),
                          "after": summarize(head(after, eval_prompts).numpy(), seed=config.seed)}
                   for name, head in ((n, load_reward(n)) for n in config.check_rewards if n != config.reward)},
        **sampled,
        "eval_images_per_model": len(eval_prompts),
        "train_steps": train_config.max_steps,
        "seconds": time.time() - started,
        "run_dir": str(run_dir),
        "grid": "before_after.png (top row: base, bottom row: aligned; same seeds)",
    }
    if frames is not None:  # videos: the reward of each frame position, and the consistency of consecutive frames
        result["grid"] = ("before_after.png (top row: base, bottom row: aligned; each clip's frames left to right; same "
                          "seeds) and before_after.gif")
        if not reward.scores_videos:  # a whole-clip reward (motion-match) has no per-frame score
            result["per_frame_reward"] = {model: [float(reward(videos[:, f].contiguous(), eval_prompts).nanmean())
                                                  for f in range(frames)] for model, videos in (("base", before), ("aligned", after))}
        result["temporal_consistency"] = {model: summarize(temporal_consistency(videos, pixel_embedding).numpy(), seed=config.seed)
                                          for model, videos in (("base", before), ("aligned", after))}
    result["report"] = str(_write_report(config, run_dir, before, after, eval_prompts, eval_seeds, r_before, r_after,
                                         result["seconds"], category_of))
    (run_dir / "quickstart.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _film_strips(videos: torch.Tensor) -> torch.Tensor:
    """(N, F, 3, H, W) -> (N, 3, H, F * W): each clip's frames side by side."""
    return torch.stack([torch.cat(list(video), dim=-1) for video in videos])


def _render_winners(config: QuickstartConfig, resolution: int, frames: int | None = None) -> tuple[Path, dict]:
    """Preferred images without a model: ``samples_per_prompt`` clean renders per shape caption
    (flat colours, the caption's shape; clips of it moving for a video model) as an image+caption
    parquet, as SePPO reads Pick-a-Pic winners."""
    from diffpo.data.moving_shapes import sample_moving_shapes
    from diffpo.data.shapes import sample_shapes
    from diffpo.data.writer import write_images_parquet

    count = config.num_prompts * config.samples_per_prompt
    renders = (sample_shapes(count, size=resolution, seed=config.seed) if frames is None else
               sample_moving_shapes(count, size=resolution, frames=frames, seed=config.seed))
    path = write_images_parquet(Path(config.output_dir) / "winners.parquet", [im for im, _ in renders], [c for _, c in renders])
    return path, {"winners": len(renders)}


def _sample_pairs(config: QuickstartConfig, pipe, shape: tuple, reward, captions_of, frames: int | None = None
                  ) -> tuple[Path, dict]:
    """Candidates for every caption (sharing x_T unless ``share_initial_noise`` is off), paired
    (all pairs or best vs worst) and labelled by ``reward``, written as a Pick-a-Pic-format parquet
    (image_0 the higher-scored; videos as lists of PNG frames)."""
    from diffpo.data.writer import write_pairs_parquet
    from diffpo.eval.generate import generate, initial_latents, to_pil

    captions = captions_of(config.num_prompts, seed=config.seed)
    k = config.samples_per_prompt
    prompts = [c for c in captions for _ in range(k)]
    if config.share_initial_noise:  # the candidates of a caption diverge only through the eta noise
        x_T = initial_latents([config.seed * 100_000 + i for i in range(len(captions))], shape).repeat_interleave(k, 0)
    else:
        x_T = initial_latents([config.seed * 100_000 + 70_000 + i for i in range(len(prompts))], shape)
    eta_seeds = [config.seed * 100_000 + 50_000 + i for i in range(len(prompts))]
    images = generate(pipe, prompts, eta_seeds, config.sample_steps, config.guidance_scale, eta=config.sample_eta,
                      batch_size=config.batch_size, latents=x_T, progress=True, desc="sample pairs", num_frames=frames)
    scores = reward(images, prompts).view(len(captions), k)
    pil = to_pil(images)
    pairs = []
    for i, caption in enumerate(captions):
        order = scores[i].argsort(descending=True).tolist()
        chosen = [(order[0], order[-1])] if config.pairing == "best_worst" else list(combinations(order, 2))
        for a, b in chosen:
            label = 1.0 if scores[i, a] - scores[i, b] > config.min_margin else 0.5
            pairs.append({"image_0": pil[i * k + a], "image_1": pil[i * k + b], "label_0": label, "caption": caption,
                          "reward_0": float(scores[i, a]), "reward_1": float(scores[i, b])})
    parquet = write_pairs_parquet(Path(config.output_dir) / "pairs.parquet", pairs)
    return parquet, {"pairs": len(pairs), "pairs_used": sum(p["label_0"] != 0.5 for p in pairs),
                     "pair_reward_margin": float((scores.max(1).values - scores.min(1).values).mean())}


def pixel_embedding(frames: torch.Tensor) -> torch.Tensor:
    """Frames (N, 3, H, W) in [0, 1] -> their centred pixels (N, 3HW): the offline embedding of the
    quickstart's temporal consistency (no CLIP weights here); cosine 1 = identical frames."""
    flat = frames.flatten(1).float()
    return flat - flat.mean(dim=1, keepdim=True)


def _write_report(config: QuickstartConfig, run_dir: Path, before, after, prompts, seeds, r_before, r_after,
                  seconds: float, category_of) -> Path:
    """The ``diffpo eval`` report of base vs aligned in ``run_dir/report/``, from the scores above
    (bootstrap over images with the quickstart's seed, so its numbers equal quickstart.json's);
    videos also get the temporal consistency of their frames in pixel space."""
    from diffpo.config import to_dict
    from diffpo.eval.comparison import StatsOptions
    from diffpo.eval.provenance import provenance
    from diffpo.eval.report import ReportOptions
    from diffpo.eval.runner import report_samples
    from diffpo.eval.scoring import TEMPORAL
    from diffpo.eval.video import temporal_consistency
    from diffpo.rewards import load as load_reward

    n = config.eval_seeds_per_prompt
    scores = {config.reward: {"base": r_before, "aligned": r_after}}
    for name in config.check_rewards:
        if name != config.reward:
            head = load_reward(name)
            scores[name] = {"base": head(before, prompts), "aligned": head(after, prompts)}
    video = before.ndim == 5
    if video:
        scores[TEMPORAL] = {"base": temporal_consistency(before, pixel_embedding),
                            "aligned": temporal_consistency(after, pixel_embedding)}
    what = f"clips of {before.shape[1]} frames" if video else "images"
    meta = {"description": f"diffpo quickstart ({config.method}, reward {config.reward}): {len(prompts) // n} "
                           f"captions x {n} held-out seeds ({what}), {config.eval_steps} DDIM steps, guidance "
                           f"{config.guidance_scale}; scored before 8-bit rounding, as quickstart.json; "
                           f"run took {seconds:.0f} s.",
            "config": to_dict(config), "provenance": provenance("cpu"),
            "generation": {"base": {"model": config.model}, "aligned": {"lora": str(run_dir / "train" / "final")}},
            **({"consistency_reward": "pixels (centred; no CLIP weights offline)"} if video else {})}
    return report_samples(
        run_dir / "report", {"base": before, "aligned": after}, prompts, seeds, scores,
        prompt_indices=[i // n for i in range(len(prompts))], image_indices=[i % n for i in range(len(prompts))],
        categories=[category_of(p) for p in prompts],
        stats=StatsOptions(unit="sample", seed=config.seed),
        options=ReportOptions(title="diffpo quickstart: base vs aligned", primary=config.reward), meta=meta)


def _load_trained(pipe, stack, final: Path, finetune: str) -> None:
    if finetune == "lora":
        pipe.load_lora_weights(str(final))
    else:
        attr = stack.family.denoiser_attr  # final/unet, or final/transformer (SD3, FLUX)
        setattr(pipe, attr, stack.family.unet_class.from_pretrained(final / attr).to(stack.unet.device))
