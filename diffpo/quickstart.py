"""``diffpo quickstart``: align the bundled tiny model end to end, offline, in a few minutes.

1. sample candidate pairs from the tiny model for shape captions: the two images of a pair share
   the initial noise x_T and diverge through DDIM eta noise;
2. label each pair with a programmatic reward and write a Pick-a-Pic-format parquet;
3. train Diffusion-DPO LoRA (or another ``method=``) on it with the offline-pairs trainer;
4. generate base and aligned images on held-out seeds (the same x_T for both models) and report
   the reward before/after with 95% bootstrap CIs, the paired win rate, and a before/after grid.
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
    model: str = "tiny"
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
WINNERS_ONLY = ("seppo", "dro")  # methods that train on preferred images alone (SePPO winners, DRO experts)


def default_config_path(method: str | None = None) -> Path:
    """The shipped quickstart YAML of ``method`` (the online methods have their own tuned presets)."""
    from diffpo.models.loading import assets_dir

    return assets_dir().parent / "configs" / QUICKSTART_PRESETS.get(method, "quickstart.yaml")


def run_quickstart(config: QuickstartConfig) -> dict:
    from diffpo.data.shapes import shape_captions
    from diffpo.eval.generate import generate, to_pil
    from diffpo.eval.grid import image_grid
    from diffpo.eval.stats import paired_win_rate, summarize
    from diffpo.models.loading import load_stack
    from diffpo.rewards import load as load_reward
    from diffpo.trainers import run_training

    started = time.time()
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.seed)
    reward = load_reward(config.reward)
    stack = load_stack(config.model)
    pipe = stack.pipeline()
    pipe.set_progress_bar_config(disable=True)
    shape = (stack.unet.config.in_channels, stack.unet.config.sample_size, stack.unet.config.sample_size)

    # 1-2. offline data (not for D3PO, which samples its own rounds while it trains): candidates
    # sharing x_T per prompt, diverging through eta noise, paired and labelled by the reward
    data, sampled = {}, {}
    if config.method in WINNERS_ONLY and config.winners == "renders":
        parquet, sampled = _render_winners(config, stack.native_resolution)
        data = {"data": dataclasses.replace(config.train.data, source=str(parquet))}
    elif config.method != "d3po":
        parquet, sampled = _sample_pairs(config, pipe, shape, reward)
        data = {"data": dataclasses.replace(config.train.data, source=str(parquet))}

    # 3. train
    online = config.train.online
    if config.method != "dro":  # DRO's lagged copy samples with its own solver and (no) guidance
        online = dataclasses.replace(online, eta=config.sample_eta, guidance_scale=config.guidance_scale)
    if config.method == "d3po":  # its rounds are the quickstart's candidates
        online = dataclasses.replace(online, prompts="shapes", rewards=[config.reward], min_margin=config.min_margin,
                                     samples_per_prompt=config.samples_per_prompt, num_inference_steps=config.sample_steps)
    train_config = dataclasses.replace(
        config.train, method=config.method, seed=config.seed, output_dir=str(run_dir / "train"),
        model=dataclasses.replace(config.train.model, pretrained=config.model), online=online, **data)
    train_dir = run_training(train_config)

    # 4. before / after on held-out seeds, identical initial noise for both models
    eval_captions = shape_captions()
    n = config.eval_seeds_per_prompt
    eval_prompts = [c for c in eval_captions for _ in range(n)]
    eval_seeds = [10_000_000 + config.seed * 100_000 + i for i in range(len(eval_prompts))]
    before = generate(pipe, eval_prompts, eval_seeds, config.eval_steps, config.guidance_scale,
                      batch_size=config.batch_size, progress=True, desc="base model")
    _load_trained(pipe, stack, train_dir / "final", config.train.finetune)
    after = generate(pipe, eval_prompts, eval_seeds, config.eval_steps, config.guidance_scale,
                     batch_size=config.batch_size, progress=True, desc="aligned model")
    r_before, r_after = reward(before, eval_prompts), reward(after, eval_prompts)

    stride = max(1, len(eval_captions) // max(config.grid_prompts, 1))  # spread over shapes and colours
    rows = [i * n for i in range(0, len(eval_captions), stride)][: config.grid_prompts]
    grid = image_grid(to_pil(before[rows]) + to_pil(after[rows]), rows=2, scale=4)
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
    result["report"] = str(_write_report(config, run_dir, before, after, eval_prompts, eval_seeds, r_before, r_after,
                                         result["seconds"]))
    (run_dir / "quickstart.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _render_winners(config: QuickstartConfig, resolution: int) -> tuple[Path, dict]:
    """Preferred images without a model: ``samples_per_prompt`` clean renders per shape caption
    (flat colours, the caption's shape) as an image+caption parquet, as SePPO reads Pick-a-Pic winners."""
    from diffpo.data.shapes import sample_shapes
    from diffpo.data.writer import write_images_parquet

    renders = sample_shapes(config.num_prompts * config.samples_per_prompt, size=resolution, seed=config.seed)
    path = write_images_parquet(Path(config.output_dir) / "winners.parquet", [im for im, _ in renders], [c for _, c in renders])
    return path, {"winners": len(renders)}


def _sample_pairs(config: QuickstartConfig, pipe, shape: tuple, reward) -> tuple[Path, dict]:
    """Candidates for every shape caption (sharing x_T unless ``share_initial_noise`` is off), paired
    (all pairs or best vs worst) and labelled by ``reward``, written as a Pick-a-Pic-format parquet
    (image_0 the higher-scored)."""
    from diffpo.data.shapes import shape_captions
    from diffpo.data.writer import write_pairs_parquet
    from diffpo.eval.generate import generate, initial_latents, to_pil

    captions = shape_captions(config.num_prompts, seed=config.seed)
    k = config.samples_per_prompt
    prompts = [c for c in captions for _ in range(k)]
    if config.share_initial_noise:  # the candidates of a caption diverge only through the eta noise
        x_T = initial_latents([config.seed * 100_000 + i for i in range(len(captions))], shape).repeat_interleave(k, 0)
    else:
        x_T = initial_latents([config.seed * 100_000 + 70_000 + i for i in range(len(prompts))], shape)
    eta_seeds = [config.seed * 100_000 + 50_000 + i for i in range(len(prompts))]
    images = generate(pipe, prompts, eta_seeds, config.sample_steps, config.guidance_scale, eta=config.sample_eta,
                      batch_size=config.batch_size, latents=x_T, progress=True, desc="sample pairs")
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


def _write_report(config: QuickstartConfig, run_dir: Path, before, after, prompts, seeds, r_before, r_after,
                  seconds: float) -> Path:
    """The ``diffpo eval`` report of base vs aligned in ``run_dir/report/``, from the scores above
    (bootstrap over images with the quickstart's seed, so its numbers equal quickstart.json's)."""
    from diffpo.config import to_dict
    from diffpo.data.shapes import parse_caption
    from diffpo.eval.comparison import StatsOptions
    from diffpo.eval.provenance import provenance
    from diffpo.eval.report import ReportOptions
    from diffpo.eval.runner import report_samples
    from diffpo.rewards import load as load_reward

    n = config.eval_seeds_per_prompt
    scores = {config.reward: {"base": r_before, "aligned": r_after}}
    for name in config.check_rewards:
        if name != config.reward:
            head = load_reward(name)
            scores[name] = {"base": head(before, prompts), "aligned": head(after, prompts)}
    meta = {"description": f"diffpo quickstart ({config.method}, reward {config.reward}): {len(prompts) // n} shape "
                           f"captions x {n} held-out seeds, {config.eval_steps} DDIM steps, guidance "
                           f"{config.guidance_scale}; scored before 8-bit rounding, as quickstart.json; "
                           f"run took {seconds:.0f} s.",
            "config": to_dict(config), "provenance": provenance("cpu"),
            "generation": {"base": {"model": config.model}, "aligned": {"lora": str(run_dir / "train" / "final")}}}
    return report_samples(
        run_dir / "report", {"base": before, "aligned": after}, prompts, seeds, scores,
        prompt_indices=[i // n for i in range(len(prompts))], image_indices=[i % n for i in range(len(prompts))],
        categories=[parse_caption(p).shape for p in prompts],
        stats=StatsOptions(unit="sample", seed=config.seed),
        options=ReportOptions(title="diffpo quickstart: base vs aligned", primary=config.reward), meta=meta)


def _load_trained(pipe, stack, final: Path, finetune: str) -> None:
    if finetune == "lora":
        pipe.load_lora_weights(str(final))
    else:
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(final / "unet").to(stack.unet.device)
