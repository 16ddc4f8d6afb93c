"""``diffpo quickstart``: align the bundled tiny model end to end, offline, in a few minutes.

1. sample candidate pairs from the tiny model for shape captions: the two images of a pair share
   the initial noise x_T and diverge through DDIM eta noise;
2. label each pair with a programmatic reward and write a Pick-a-Pic-format parquet;
3. train Diffusion-DPO LoRA (or another ``method=``) on it with the offline-pairs trainer;
4. generate base and aligned images with new seeds (the same x_T for both models) for captions held
   out of training, and for training captions, and report the reward before/after with 95%
   bootstrap CIs, the paired win rate, and a before/after grid (held-out captions).

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
from tqdm import tqdm

from diffpo.config import ConfigError, TrainConfig, save_config


@dataclass
class QuickstartConfig:
    """The embedded default job (``configs/quickstart.yaml``)."""

    output_dir: str = "runs/quickstart"
    method: str = "diffusion_dpo"
    seed: int = 0
    model: str = "tiny"  # tiny (images), flow, video (AnimateDiff), wan (Wan2.1 layout), or a diffusers folder / hub id
    num_frames: int = 4  # video models: frames per clip, sampled, trained and evaluated
    heldout_prompts: int = 30  # captions kept out of training (pairs, D3PO rounds, rendered winners): the headline evaluation
    reward: str = "colour-match"  # the reward that labels the pairs: a name in diffpo.rewards.REWARDS
    check_rewards: list[str] = field(default_factory=lambda: ["colour-match"])  # also reported, to catch reward hacking
    num_prompts: int = 60  # training captions (pairs, D3PO rounds, winners), drawn from those not held out
    eval_seen_prompts: int | None = None  # training captions also evaluated with new seeds (None: all of them)
    samples_per_prompt: int = 4  # candidates per prompt
    share_initial_noise: bool = True  # a prompt's candidates share x_T (pairs); false: each its own (winners-only methods)
    pairing: Literal["all", "best_worst"] = "all"  # every pair of candidates, or only best vs worst
    winners: Literal["samples", "renders"] = "samples"  # winners-only methods (SePPO, DRO): the pairs' winners, or clean renders of the captions
    min_margin: float = 0.0  # pairs whose rewards differ by no more than this are ties (dropped)
    sample_steps: int = 20
    sample_eta: float = 1.0  # DDIM eta of the candidates; flow models: the flow SDE's noise level (Flow-GRPO's a)
    sample_window: list[int] | None = None  # flow SDE candidates: only steps [start, end) stochastic, the rest Euler (null: all)
    guidance_scale: float = 5.0
    eval_seeds_per_prompt: int = 2  # new seeds per evaluated caption for before/after
    eval_steps: int = 25
    batch_size: int = 30
    grid_prompts: int = 8
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.share_initial_noise and self.sample_eta == 0 and self.method not in ONLINE_RL:  # those: their sampler's noise
            raise ConfigError("sample_eta=0 with share_initial_noise=true gives identical candidates: raise "
                              "sample_eta or set share_initial_noise=false")
        if self.heldout_prompts < 1:
            raise ConfigError(f"heldout_prompts={self.heldout_prompts} must be >= 1: the quickstart evaluates on captions "
                              "it never trained on")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt={self.samples_per_prompt} must be >= 2 to form pairs")
        from diffpo.rewards import REWARDS

        for name in [self.reward, *self.check_rewards]:
            if name not in REWARDS:
                raise ConfigError(f"reward {name!r} is unknown; available: {', '.join(sorted(REWARDS))}")


QUICKSTART_PRESETS = {"d3po": "quickstart_d3po.yaml", "seppo": "quickstart_seppo.yaml", "dro": "quickstart_dro.yaml",
                      "smpo": "quickstart_smpo.yaml", "grpo": "quickstart_grpo.yaml", "nft": "quickstart_nft.yaml"}
# a method's own preset on a model: these win over the model's and the method's
METHOD_MODEL_PRESETS = {("grpo", "flow"): "quickstart_grpo_flow.yaml", ("nft", "flow"): "quickstart_nft_flow.yaml",
                        ("grpo", "video"): "quickstart_grpo_video.yaml", ("seppo", "video"): "quickstart_seppo_video.yaml",
                        ("grpo", "wan"): "quickstart_grpo_wan.yaml", ("nft", "wan"): "quickstart_nft_wan.yaml"}
ONLINE_RL = ("grpo", "ddpo", "nft")  # methods that sample and score their own rounds (as D3PO), from rewards
MODEL_PRESETS = {"video": "quickstart_video.yaml", "flow": "quickstart_flow.yaml", "wan": "quickstart_wan.yaml"}  # model presets, whatever the method
QUICKSTART_MODELS = {"video": "tiny-video", "flow": "tiny-flow", "wan": "tiny-wan"}  # quickstart model names -> bundled models
WINNERS_ONLY = ("seppo", "dro")  # methods that train on preferred images alone (SePPO winners, DRO experts)


def default_config_path(method: str | None = None, model: str | None = None) -> Path:
    """The shipped quickstart YAML of ``model`` (video) or else of ``method`` (the online methods
    have their own tuned presets)."""
    from diffpo.resources import shipped_config

    return shipped_config(METHOD_MODEL_PRESETS.get((method, model)) or MODEL_PRESETS.get(model)
                          or QUICKSTART_PRESETS.get(method, "quickstart.yaml"))


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

    from diffpo.config import absolute_paths

    started = time.time()
    config = absolute_paths(config)  # its config.yaml reruns from any folder
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

    # held-out captions never reach training: not in the pairs, the D3PO rounds or the rendered winners
    train_captions, heldout_captions = split_captions(captions_of(), config.heldout_prompts, config.num_prompts,
                                                      config.seed, category_of)
    run_dir.joinpath("captions.json").write_text(json.dumps({"train": train_captions, "heldout": heldout_captions}, indent=1))

    # 1-2. offline data (not for D3PO, which samples its own rounds while it trains): candidates
    # sharing x_T per prompt, diverging through eta noise, paired and labelled by the reward
    data, sampled = {}, {}
    video_data = {} if frames is None else {"num_frames": frames}
    if config.method in WINNERS_ONLY and config.winners == "renders":
        parquet, sampled = _render_winners(config, train_captions, stack.native_resolution, frames)
        data = {"data": dataclasses.replace(config.train.data, source=str(parquet), **video_data)}
    elif config.method != "d3po" and config.method not in ONLINE_RL:
        parquet, sampled = _sample_pairs(config, pipe, stack, shape, reward, train_captions, frames)
        data = {"data": dataclasses.replace(config.train.data, source=str(parquet), **video_data)}
    elif video_data:  # GRPO / NFT sample their own clips of this many frames
        data = {"data": dataclasses.replace(config.train.data, **video_data)}

    # 3. train
    online = config.train.online
    is_flow = stack.prediction_type == "flow"  # flow samplers take online.sampler.noise_level, not DDIM's eta
    if config.method != "dro":  # DRO's lagged copy samples with its own solver and (no) guidance
        online = dataclasses.replace(online, guidance_scale=config.guidance_scale,
                                     **({} if is_flow and config.method in ONLINE_RL else {"eta": config.sample_eta}))
    if config.method in ONLINE_RL:  # rounds of groups for the training captions; check rewards are its gold rewards
        prompt_file = run_dir / "train_captions.txt"
        prompt_file.write_text("\n".join(train_captions) + "\n")
        online = dataclasses.replace(online, prompts=str(prompt_file.resolve()), rewards=[config.reward],
                                     gold_rewards=[name for name in config.check_rewards if name != config.reward],
                                     samples_per_prompt=config.samples_per_prompt, num_inference_steps=config.sample_steps,
                                     share_initial_noise=config.share_initial_noise)
    if config.method == "d3po":  # its rounds are the quickstart's candidates, for the training captions only
        prompt_file = run_dir / "train_captions.txt"
        prompt_file.write_text("\n".join(train_captions) + "\n")
        online = dataclasses.replace(online, prompts=str(prompt_file.resolve()), rewards=[config.reward],
                                     min_margin=config.min_margin, samples_per_prompt=config.samples_per_prompt,
                                     num_inference_steps=config.sample_steps)
    train_config = dataclasses.replace(
        config.train, method=config.method, seed=config.seed, output_dir=str(run_dir / "train"),
        model=dataclasses.replace(config.train.model, pretrained=model), online=online, **data)
    train_dir = run_training(train_config)

    # 4. before / after with new seeds, identical initial noise for both models: on the held-out
    # captions (the headline figures) and on training captions (labelled as such)
    n = config.eval_seeds_per_prompt
    seen_captions = train_captions[: config.eval_seen_prompts]
    sets = {"heldout": heldout_captions, "seen": seen_captions}
    prompts = {name: [c for c in captions for _ in range(n)] for name, captions in sets.items()}
    seeds = {"heldout": [10_000_000 + config.seed * 100_000 + i for i in range(len(prompts["heldout"]))],
             "seen": [20_000_000 + config.seed * 100_000 + i for i in range(len(prompts["seen"]))]}
    images = {}
    for label in ("base", "aligned"):
        if label == "aligned":
            _load_trained(pipe, stack, train_dir / "final", config.train.finetune)
        for name in sets:
            images[label, name] = generate(pipe, prompts[name], seeds[name], config.eval_steps, config.guidance_scale,
                                           batch_size=config.batch_size, progress=True,
                                           desc=f"{label} model, {name} captions", num_frames=frames)
    eval_captions, eval_prompts, eval_seeds = heldout_captions, prompts["heldout"], seeds["heldout"]
    before, after = images["base", "heldout"], images["aligned", "heldout"]
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
    check_heads = {name: load_reward(name) for name in config.check_rewards if name != config.reward}

    def comparison(r_base, r_aligned, base, aligned, captions) -> dict:
        """Reward before/after with 95% CIs, the paired win rate and the check rewards on one caption set."""
        return {"reward_before": summarize(r_base.numpy(), seed=config.seed),
                "reward_after": summarize(r_aligned.numpy(), seed=config.seed),
                "win_rate": paired_win_rate(r_aligned.numpy(), r_base.numpy(), seed=config.seed),
                "checks": {name: {"before": summarize(head(base, captions).numpy(), seed=config.seed),
                                  "after": summarize(head(aligned, captions).numpy(), seed=config.seed)}
                           for name, head in check_heads.items()}}

    result = {
        "reward": config.reward,
        "method": config.method,
        "evaluated_on": (f"{len(heldout_captions)} held-out captions (never in training) x {n} new seeds; "
                         "'seen_captions' holds the same figures for training captions with new seeds"),
        **comparison(r_before, r_after, before, after, eval_prompts),
        "seen_captions": {"captions": len(seen_captions), "images_per_model": len(prompts["seen"]),
                          **comparison(*(reward(images[m, "seen"], prompts["seen"]) for m in ("base", "aligned")),
                                       images["base", "seen"], images["aligned", "seen"], prompts["seen"])},
        "train_captions": len(train_captions),
        "heldout_captions": len(heldout_captions),
        **sampled,
        "eval_images_per_model": len(eval_prompts),  # held-out
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


def split_captions(captions: list[str], heldout: int, count: int, seed: int, category_of) -> tuple[list[str], list[str]]:
    """(training captions, held-out captions) of a caption world: ``heldout`` captions spread evenly
    over the categories (shapes, motion directions) and ``count`` others for training, both drawn
    with ``seed``. The two lists never share a caption."""
    from itertools import zip_longest

    import numpy as np

    if heldout + count > len(captions):
        raise ConfigError(f"heldout_prompts={heldout} + num_prompts={count} exceeds the {len(captions)} captions of this "
                          f"model's world: lower num_prompts to at most {len(captions) - heldout}")
    groups: dict[str, list[str]] = {}
    for i in np.random.default_rng(seed).permutation(len(captions)):
        groups.setdefault(category_of(captions[i]), []).append(captions[i])
    interleaved = [c for row in zip_longest(*groups.values()) for c in row if c is not None]
    return interleaved[heldout: heldout + count], interleaved[:heldout]


def _render_winners(config: QuickstartConfig, captions: list[str], resolution: int, frames: int | None = None
                    ) -> tuple[Path, dict]:
    """Preferred images without a model: ``samples_per_prompt`` clean renders of each training
    caption (flat colours, the caption's shape at a random place and size; clips of it moving for a
    video model) as an image+caption parquet, as SePPO reads Pick-a-Pic winners."""
    import numpy as np

    from diffpo.data.moving_shapes import draw_moving_shape, parse_motion_caption
    from diffpo.data.shapes import draw_shape, parse_caption
    from diffpo.data.writer import write_images_parquet

    rng = np.random.default_rng(config.seed)
    chosen = [c for c in captions for _ in range(config.samples_per_prompt)]
    renders = [draw_shape(parse_caption(c), resolution, rng) if frames is None else
               draw_moving_shape(parse_motion_caption(c), resolution, frames, rng) for c in chosen]
    path = write_images_parquet(Path(config.output_dir) / "winners.parquet", renders, chosen)
    return path, {"winners": len(renders)}


def _sample_flow_sde(config: QuickstartConfig, stack, prompts: list[str], x_T: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] of a flow model from ``x_T`` through the flow SDE of Flow-GRPO (noise level
    ``sample_eta``, classifier-free guidance as the evaluation; stochastic only in ``sample_window``
    when set): a flow pipeline's Euler sampler is deterministic, so candidates that share x_T differ
    only through this step noise (as a UNet's candidates do through DDIM eta)."""
    from diffpo.kernel.samplers import make_sampler
    from diffpo.models.families import TextEmbeddings

    sampler = make_sampler("flow_sde", stack.noise_process, stack.family.sampling_scheduler(stack.noise_scheduler),
                           config.sample_eta)
    denoise, empty, images = stack.denoiser(stack.unet), stack.encode_prompts([""]), []
    for start in tqdm(range(0, len(prompts), config.batch_size), desc="sample pairs"):
        batch = prompts[start:start + config.batch_size]
        n = len(batch)
        uncond = TextEmbeddings(empty.hidden.expand(n, -1, -1), None if empty.pooled is None else empty.pooled.expand(n, -1))
        generator = torch.Generator().manual_seed(config.seed * 100_000 + 50_000 + start)
        with torch.no_grad():
            trajectory = sampler.sample(denoise, x_T[start:start + n], stack.family.unet_conditioning(stack.encode_prompts(batch)),
                                        stack.family.unet_conditioning(uncond), config.guidance_scale, config.sample_steps,
                                        generator, window=config.sample_window)
            images.append(stack.decode_latents(trajectory.final))
    return torch.cat(images)


def _sample_pairs(config: QuickstartConfig, pipe, stack, shape: tuple, reward, captions: list[str],
                  frames: int | None = None) -> tuple[Path, dict]:
    """Candidates for every training caption (sharing x_T unless ``share_initial_noise`` is off), paired
    (all pairs or best vs worst) and labelled by ``reward``, written as a Pick-a-Pic-format parquet
    (image_0 the higher-scored; videos as lists of PNG frames)."""
    from diffpo.data.writer import write_pairs_parquet
    from diffpo.eval.generate import generate, initial_latents, to_pil

    k = config.samples_per_prompt
    prompts = [c for c in captions for _ in range(k)]
    if config.share_initial_noise:  # the candidates of a caption diverge only through the eta noise
        x_T = initial_latents([config.seed * 100_000 + i for i in range(len(captions))], shape).repeat_interleave(k, 0)
    else:
        x_T = initial_latents([config.seed * 100_000 + 70_000 + i for i in range(len(prompts))], shape)
    eta_seeds = [config.seed * 100_000 + 50_000 + i for i in range(len(prompts))]
    flow_sde = stack.prediction_type == "flow" and config.sample_eta > 0
    if config.sample_window is not None and not flow_sde:
        raise ConfigError(f"sample_window={config.sample_window} applies to flow-SDE candidates (a flow model with "
                          "sample_eta > 0); set sample_window=null")
    if flow_sde:
        images = _sample_flow_sde(config, stack, prompts, x_T)
    else:
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
    """The offline embedding of the quickstart's temporal consistency (no CLIP weights here):
    ``diffpo.eval.video.pixel_embedding``, centred pixels; cosine 1 = identical frames."""
    from diffpo.eval.video import pixel_embedding as centred_pixels

    return centred_pixels(frames)


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
                           f"held-out captions (never trained on) x {n} seeds ({what}), {config.eval_steps} DDIM steps, guidance "
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
