"""Sem-DPO (alpha > 0) vs plain DPO (alpha = 0), side by side on the same pairs and steps.

Takes a ``diffpo prompt quickstart`` run: its SFT rewriter is the start (and the DPO reference) of
every arm, its round-0 ``pairs.jsonl`` the data, its round-0 training config the settings; the
only difference between arms is alpha. The quickstart's own round-0 model is the arm with its
alpha; the other alphas are trained here (with ``--pairing`` or ``--steps`` every arm is trained
here, on pairs rebuilt from round 0's candidates). Every arm (and the SFT start) is evaluated on the same
held-out requests and seeds: combined reward, win rate over the user's originals, meaning-match
faithfulness, meaning accuracy and semantic similarity, each with a 95% bootstrap CI over prompts.

    python scripts/prompt_semdpo_vs_dpo.py --run runs/prompt-quickstart --alphas 0 1 --heldout 120 \\
        --out runs/semdpo-vs-dpo --figure docs/prompt_semdpo_vs_dpo.png
    # every candidate pair of round 0, more steps, larger alphas (docs/prompt_semdpo_alpha_sweep.png):
    python scripts/prompt_semdpo_vs_dpo.py --run runs/prompt-quickstart --alphas 0 10 30 --pairing all --steps 20 \\
        --out runs/semdpo-alpha --figure docs/prompt_semdpo_alpha_sweep.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    from diffpo.config import load_config
    from diffpo.data.shape_requests import load_requests
    from diffpo.eval.stats import summarize, win_rate
    from diffpo.prompt.config import PromptTrainConfig
    from diffpo.prompt.evaluate import evaluate_rewriter
    from diffpo.prompt.lm import load_rewriter
    from diffpo.prompt.pairs import load_heads, load_pipeline, parse_reward
    from diffpo.prompt.quickstart import PromptQuickstartConfig
    from diffpo.prompt.semantic import load_embedder
    from diffpo.prompt.shapes_task import meaning_correct, references
    from diffpo.prompt.train import train_rewriter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a diffpo prompt quickstart run dir (with sft/ and rounds/round-0/)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--heldout", type=int, default=120, help="held-out requests to evaluate on")
    parser.add_argument("--out", required=True)
    parser.add_argument("--figure", default=None, help="PNG to write the figure to")
    parser.add_argument("--pairing", choices=["best_worst", "all"], default=None,
                        help="rebuild the pairs from round 0's candidates (default: the run's own pairs.jsonl)")
    parser.add_argument("--margin", type=float, default=0.0, help="with --pairing: ties closer than this are dropped")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of every arm (default: the run's)")
    args = parser.parse_args()

    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = load_config(PromptQuickstartConfig, run / "config.yaml")
    base_train = load_config(PromptTrainConfig, run / "rounds" / "round-0" / "train" / "config.yaml")
    reuse_round = args.pairing is None and args.steps is None  # the run's round-0 model is then one arm
    if args.pairing is not None:
        from diffpo.prompt.pairs import make_pairs

        pairs_path = out / f"pairs-{args.pairing}.jsonl"
        make_pairs(run / "rounds" / "round-0" / "candidates.jsonl", pairs_path, args.pairing, args.margin)
        base_train = dataclasses.replace(base_train, pairs=str(pairs_path))
    if args.steps is not None:
        base_train = dataclasses.replace(base_train, max_steps=args.steps)
    heldout = load_requests("heldout", args.heldout)
    prompts = [r.prompt for r in heldout]
    specs = [parse_reward(r) for r in quick.rewards]
    pipeline, heads, embedder = load_pipeline(quick.model), load_heads(specs), load_embedder(quick.embedder)
    template = base_train.rewriter.template()
    render = {"seeds_per_prompt": quick.seeds_per_prompt, "steps": quick.steps, "guidance": quick.guidance_scale,
              "seed": quick.seed, "temperature": quick.eval_temperature, "top_p": base_train.rewriter.top_p,
              "max_new_tokens": base_train.rewriter.max_new_tokens, "progress": False,
              "references": references(heldout)}

    arms = {"sft (start)": str(run / "sft" / "final")}
    timings = {}
    for alpha in args.alphas:
        name = f"alpha={alpha:g}" + (" (DPO)" if alpha == 0 else " (Sem-DPO)")
        if reuse_round and alpha == base_train.alpha:
            arms[name] = str(run / "rounds" / "round-0" / "train" / "final")
            continue
        tick = time.time()
        config = dataclasses.replace(base_train, alpha=alpha, output_dir=str(out / f"alpha-{alpha:g}"),
                                     resume_from="latest", progress_bar=False)
        arms[name] = str(train_rewriter(config) / "final")
        timings[f"train_{name}_s"] = time.time() - tick

    results, per_prompt = {}, {}
    for name, path in arms.items():
        tick = time.time()
        result = evaluate_rewriter(load_rewriter(path), template, prompts, pipeline, heads, embedder,
                                   out / f"eval-{name.split()[0]}", **render)
        timings[f"eval_{name}_s"] = time.time() - tick
        correct = [float(meaning_correct(row["optimized"], r)) for row, r in zip(result["per_prompt"], heldout)]
        metrics = result["metrics"]
        faithful = next(key for key in metrics if key.startswith("meaning-match"))
        results[name] = {
            "combined": metrics["combined"]["optimized"]["mean"], "combined_ci95": metrics["combined"]["optimized"]["ci95"],
            "win_rate_over_original": metrics["combined"]["win_rate"]["mean"],
            "win_rate_ci95": metrics["combined"]["win_rate"]["ci95"],
            "faithfulness": metrics[faithful]["optimized"]["mean"],
            "faithfulness_ci95": metrics[faithful]["optimized"]["ci95"],
            "meaning_accuracy": summarize(correct, seed=quick.seed)["mean"],
            "meaning_accuracy_ci95": summarize(correct, seed=quick.seed)["ci95"],
            "semantic_similarity": result["semantic_similarity"]["mean"],
            "semantic_similarity_ci95": result["semantic_similarity"]["ci95"],
            "original_combined": metrics["combined"]["original"]["mean"]}
        per_prompt[name] = result["per_prompt"]

    # paired comparisons of every Sem-DPO arm with the DPO arm, prompt by prompt
    comparisons = {}
    dpo = next((n for n in arms if n.endswith("(DPO)")), None)
    for name in arms:
        if dpo is None or not name.endswith("(Sem-DPO)"):
            continue
        a = [row["scores"]["combined"]["optimized"] for row in per_prompt[name]]
        b = [row["scores"]["combined"]["optimized"] for row in per_prompt[dpo]]
        cos_diff = [x["cos"] - y["cos"] for x, y in zip(per_prompt[name], per_prompt[dpo])]
        comparisons[f"{name} vs {dpo}"] = {"combined_win_rate": win_rate(a, b, seed=quick.seed),
                                           "cos_difference": summarize(cos_diff, seed=quick.seed)}
    pairs = sum(1 for _ in open(base_train.pairs))
    report = {"run": str(run), "pairs": pairs, "steps": base_train.max_steps, "beta": base_train.beta,
              "lr": base_train.optim.lr, "heldout": len(heldout), "seeds_per_prompt": quick.seeds_per_prompt,
              "arms": arms, "results": results, "comparisons": comparisons, **timings}
    (out / "semdpo_vs_dpo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"results": results, "comparisons": comparisons}, indent=2))
    if args.figure:
        figure(results, args.figure, f"{len(heldout)} held-out requests; {pairs} pairs, {base_train.max_steps} steps")


def figure(results: dict, path: str, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, [("combined", "combined reward"), ("meaning_accuracy", "meaning accuracy"),
                                       ("semantic_similarity", "cos(e(request), e(rewrite))")]):
        means = [results[n][key] for n in names]
        low = [results[n][key] - results[n][f"{key}_ci95"][0] for n in names]
        high = [results[n][f"{key}_ci95"][1] - results[n][key] for n in names]
        ax.bar(range(len(names)), means, yerr=[low, high], capsize=4,
               color=["#999999", "#d62728", "#1f77b4", "#2ca02c", "#9467bd"][:len(names)])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=8)
        ax.set_title(label, fontsize=10)
        if key == "combined":
            original = results[names[0]]["original_combined"]
            ax.axhline(original, color="k", linestyle="--", linewidth=1)
            ax.text(len(names) - 0.5, original, "user's prompts", fontsize=7, va="bottom", ha="right")
    fig.suptitle(f"Sem-DPO vs DPO on the same pairs and steps (95% bootstrap CIs; {subtitle})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
