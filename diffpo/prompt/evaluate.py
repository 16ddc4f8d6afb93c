"""Held-out evaluation of a rewriter: original vs optimized prompts, rendered on the same seeds.

For every held-out prompt x the rewriter gives one optimized prompt y (its first sample, or with
``n > 1`` the best of n by the combined reward, chosen on selection seeds disjoint from the
evaluation seeds so the pick does not inflate the reported scores). x and y are rendered on the
same evaluation seeds and scored by every head (a faithfulness head always with x). Reported per
head: means with 95% bootstrap CIs and the paired win rate of optimized over original (bootstrap
over prompts, all images of a drawn prompt together, as ``diffpo eval``), and the semantic
similarity cos(e(x), e(y)).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from diffpo.prompt.pairs import check_heads, json_safe, prompt_seeds, render, score_renders

SELECTION_OFFSET = 500_000  # best-of-n picks on seeds this far from the evaluation seeds
COMBINED = "combined"


def _select(rewrites: list[list[str]], prompts: list[str], pipeline, heads, seeds_per_prompt: int, steps: int,
            guidance: float, seed: int, batch_size: int, references: dict[str, str]) -> list[str]:
    """Best of each prompt's rewrites by the combined reward on selection seeds."""
    chosen = []
    for prompt, group in zip(prompts, rewrites):
        seeds = [s + SELECTION_OFFSET for s in prompt_seeds(prompt, seeds_per_prompt, seed)]
        texts = [t for t in group for _ in seeds]
        images = render(pipeline, texts, seeds * len(group), steps, guidance, batch_size)
        combined, _ = score_renders(images, texts, [references.get(prompt, prompt)] * len(texts), heads)
        means = combined.view(len(group), len(seeds)).mean(dim=1)
        means = torch.where(torch.isfinite(means), means, torch.full_like(means, -float("inf")))
        chosen.append(group[int(means.argmax())])
    return chosen


def evaluate_rewriter(rewriter, template, prompts: list[str], pipeline, heads: dict[str, tuple], embedder,
                      out_dir: str | Path, seeds_per_prompt: int = 2, steps: int = 25, guidance: float = 5.0,
                      n: int = 1, seed: int = 0, temperature: float = 0.8, top_p: float = 0.95,
                      max_new_tokens: int = 64, batch_size: int = 8, lm_batch_size: int = 16,
                      examples: int = 8, progress: bool = True, references: dict[str, str] | None = None,
                      optimized: list[str] | None = None) -> dict:
    """Evaluate ``rewriter`` = (model, tokenizer) on held-out ``prompts``; writes
    ``out_dir/prompt_eval.json`` and the ``diffpo eval`` report in ``out_dir/report/`` (models
    "original" and "optimized", plus ``examples.html``: prompts side by side with their scores).
    ``heads`` maps a key to ``(head, weight, against)`` as in ``diffpo.prompt.pairs``. Returns the
    numbers written to prompt_eval.json. ``references`` maps a prompt to the text faithfulness heads
    score against (default: the prompt itself); ``optimized`` skips the rewriter and evaluates
    these texts (one per prompt) instead."""
    from diffpo.eval.comparison import StatsOptions
    from diffpo.eval.generate import generate
    from diffpo.eval.report import ReportOptions
    from diffpo.eval.runner import report_samples
    from diffpo.eval.stats import describe, summarize, win_rate
    from diffpo.prompt.lm import generate_rewrites

    check_heads(heads)
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError("no held-out prompts to evaluate: pass at least one")
    if n < 1 or seeds_per_prompt < 1:
        raise ValueError(f"n={n} and seeds_per_prompt={seeds_per_prompt} must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)

    references = references or {}
    if optimized is None:
        model, tokenizer = rewriter
        rewrites = generate_rewrites(model, tokenizer, prompts, n=n, template=template, temperature=temperature,
                                     top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, batch_size=lm_batch_size)
        optimized = [g[0] for g in rewrites] if n == 1 else \
            _select(rewrites, prompts, pipeline, heads, seeds_per_prompt, steps, guidance, seed, batch_size, references)
    elif len(optimized) != len(prompts):
        raise ValueError(f"{len(optimized)} optimized prompts for {len(prompts)} prompts: pass one per prompt")

    # Image i of both models: prompt i // S, seed j = i % S; the same x_T for original and optimized.
    s = seeds_per_prompt
    seeds = [x for p in prompts for x in prompt_seeds(p, s, seed)]
    originals = [p for p in prompts for _ in range(s)]
    targets = [references.get(p, p) for p in originals]  # what faithfulness heads score against
    rewritten = [y for y in optimized for _ in range(s)]
    images = {"original": generate(pipeline, originals, seeds, steps, guidance, batch_size=batch_size,
                                   progress=progress, desc="render original"),
              "optimized": generate(pipeline, rewritten, seeds, steps, guidance, batch_size=batch_size,
                                    progress=progress, desc="render optimized")}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for model_name, texts in (("original", originals), ("optimized", rewritten)):
        combined, components = score_renders(images[model_name], texts, targets, heads)
        for key, values in {**components, COMBINED: combined}.items():
            scores.setdefault(key, {})[model_name] = values.float()
    cos = torch.as_tensor(embedder.encode(prompts + optimized), dtype=torch.float32)
    cos = (cos[: len(prompts)] * cos[len(prompts):]).sum(dim=-1)

    groups = [i // s for i in range(len(seeds))]
    metrics = {}
    for key, by_model in scores.items():
        entry = {"weight": heads[key][1] if key in heads else None,
                 "against": heads[key][2] if key in heads else None}
        for model_name, values in by_model.items():
            entry[model_name] = describe(values.numpy(), groups, seed=seed)
        entry["win_rate"] = win_rate(by_model["optimized"].numpy(), by_model["original"].numpy(), groups, seed=seed)
        metrics[key] = entry
    per_prompt = []
    for i, (x, y) in enumerate(zip(prompts, optimized)):
        rows = slice(i * s, (i + 1) * s)
        per_prompt.append({"prompt_index": i, "original": x, "optimized": y, "cos": float(cos[i]),
                           "seeds": seeds[rows],
                           "scores": {key: {m: float(v[rows].mean()) for m, v in by_model.items()}
                                      for key, by_model in scores.items()}})

    meta = {"description": f"Prompt rewriter evaluation: {len(prompts)} held-out prompts x {s} seeds, original vs "
                           f"optimized prompt on the same seeds ({'first rewrite' if n == 1 else f'best of {n} rewrites'}"
                           f"), {steps} steps, guidance {guidance}; '{COMBINED}' = sum of weight x head score.",
            "generation": {"original": {"prompts": "held-out"}, "optimized": {"rewrites": n, "temperature": temperature,
                                                                              "top_p": top_p}}}
    report = report_samples(out / "report", images, originals, seeds, scores, prompt_indices=groups,
                            image_indices=[i % s for i in range(len(seeds))], stats=StatsOptions(seed=seed),
                            options=ReportOptions(title="diffpo prompt optimizer: original vs optimized",
                                                  primary=COMBINED), meta=meta)
    examples_file = write_examples(out / "report", per_prompt[:examples], list(scores))
    _link_examples(report)

    result = {"prompts": len(prompts), "seeds_per_prompt": s, "steps": steps, "guidance": guidance, "n": n,
              "seed": seed, "bootstrap": "95% percentile bootstrap over prompts (all images of a drawn prompt)",
              "metrics": metrics, "semantic_similarity": summarize(cos.numpy(), seed=seed),
              "report": str(report), "examples": str(examples_file), "per_prompt": per_prompt}
    (out / "prompt_eval.json").write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
    return result


def write_examples(report_dir: Path, rows: list[dict], metrics: list[str]) -> Path:
    """``examples.html``: original and optimized prompt side by side, their first-seed images (the
    report's samples) and mean scores."""
    from diffpo.eval.config import slug

    esc = lambda text: html.escape(str(text))  # noqa: E731
    head = "".join(f"<th>{esc(m)}<br>orig → opt</th>" for m in metrics)
    body = []
    for row in rows:
        image = lambda model: f"samples/{slug(model)}/p{row['prompt_index']:05d}_i000.png"  # noqa: E731
        cells = "".join(f"<td>{row['scores'][m]['original']:.4g} → {row['scores'][m]['optimized']:.4g}</td>"
                        for m in metrics)
        body.append(f"<tr><td>{esc(row['original'])}<br><img src='{image('original')}' width='96'></td>"
                    f"<td>{esc(row['optimized'])}<br><img src='{image('optimized')}' width='96'></td>"
                    f"<td>{row['cos']:.3f}</td>{cells}</tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>diffpo prompt optimizer: examples</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:6px;vertical-align:top;max-width:28em}</style><h1>Original vs optimized prompts</h1>"
            "<p><a href='index.html'>back to the report</a> · mean over the evaluation seeds; images: seed 0.</p>"
            f"<table><tr><th>original</th><th>optimized</th><th>cos</th>{head}</tr>{''.join(body)}</table>")
    path = Path(report_dir) / "examples.html"
    path.write_text(page, encoding="utf-8")
    return path


def _link_examples(index: Path) -> None:
    # report_samples has no slot for extra sections: add a link to examples.html in its nav bar.
    page = index.read_text(encoding="utf-8")
    index.write_text(page.replace("</nav>", " · <a href='examples.html'>examples</a></nav>", 1), encoding="utf-8")
