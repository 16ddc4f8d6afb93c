"""Statistics over scored samples: per model and head (mean, median, std, bootstrap CIs), per
category, paired win rates over the baseline on shared seeds, and per-prompt gains and losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffpo.eval.stats import describe, win_rate


@dataclass
class StatsOptions:
    confidence: float = 0.95
    resamples: int = 2000
    unit: str = "prompt"  # "prompt": cluster bootstrap over prompts; "sample": over images
    tie_tolerance: float = 0.0
    seed: int = 0


def _by_model(rows: list[dict], models: list[str]) -> dict[str, dict[tuple, dict]]:
    table = {m: {} for m in models}
    for row in rows:
        table[row["model"]][(row["prompt_index"], row["image_index"])] = row
    return table


def _describe(rows: list[dict], metric: str, opts: StatsOptions) -> dict:
    values = [r.get(metric, np.nan) for r in rows]
    groups = [r["prompt_index"] for r in rows] if opts.unit == "prompt" else None
    return describe(values, groups, opts.confidence, opts.resamples, opts.seed)


def _win(candidate: dict[tuple, dict], baseline: dict[tuple, dict], metric: str, opts: StatsOptions,
         keep=lambda row: True) -> dict:
    keys = [k for k in baseline if k in candidate and keep(baseline[k])]  # shared seeds, baseline order
    a = [candidate[k].get(metric, np.nan) for k in keys]
    b = [baseline[k].get(metric, np.nan) for k in keys]
    groups = [k[0] for k in keys] if opts.unit == "prompt" else None
    return win_rate(a, b, groups, opts.tie_tolerance, opts.confidence, opts.resamples, opts.seed)


def compare(rows: list[dict], models: list[str], metrics: list[str], opts: StatsOptions) -> dict:
    """The numbers of a report. ``models[0]`` is the baseline; ``metrics`` are row fields (reward
    labels, optionally ``temporal_consistency``)."""
    table = _by_model(rows, models)
    baseline = models[0]
    categories = sorted({r["category"] for r in rows if r.get("category") is not None})
    result: dict = {"baseline": baseline, "models": models, "metrics": metrics, "categories": categories,
                    "summary": {}, "win_rates": {}, "by_category": {}, "category_win_rates": {}}
    for metric in metrics:
        result["summary"][metric] = {m: _describe(list(table[m].values()), metric, opts) for m in models}
        result["win_rates"][metric] = {m: _win(table[m], table[baseline], metric, opts) for m in models[1:]}
        if categories:
            result["by_category"][metric] = {
                c: {m: _describe([r for r in table[m].values() if r.get("category") == c], metric, opts) for m in models}
                for c in categories}
            result["category_win_rates"][metric] = {
                c: {m: _win(table[m], table[baseline], metric, opts, lambda r, c=c: r.get("category") == c)
                    for m in models[1:]}
                for c in categories}
    result["statistics"] = {
        "confidence": opts.confidence, "bootstrap_resamples": opts.resamples, "bootstrap_unit": opts.unit,
        "bootstrap_seed": opts.seed,
        "ci": f"{opts.confidence:.0%} percentile bootstrap over {'prompts (all images of a drawn prompt)' if opts.unit == 'prompt' else 'images'}",
        "tie_rule": f"|candidate - baseline| <= {opts.tie_tolerance:g} on the same seed is a tie and counts 1/2",
        "std": "sample standard deviation (ddof=1) over images"}
    return result


def prompt_deltas(rows: list[dict], baseline: str, model: str, metric: str) -> list[dict]:
    """Per prompt: the mean score of ``model`` minus the baseline's over shared seeds, sorted by
    the difference (largest loss first). NaN prompts are left out."""
    table = _by_model(rows, [baseline, model])
    per_prompt: dict[int, list[tuple]] = {}
    for key, base_row in table[baseline].items():
        if key in table[model]:
            per_prompt.setdefault(key[0], []).append((base_row, table[model][key]))
    out = []
    for index, pairs in per_prompt.items():
        base = np.array([b.get(metric, np.nan) for b, _ in pairs], dtype=np.float64)
        cand = np.array([c.get(metric, np.nan) for _, c in pairs], dtype=np.float64)
        ok = np.isfinite(base) & np.isfinite(cand)
        if ok.any():
            out.append({"prompt_index": index, "prompt": pairs[0][0]["prompt"], "category": pairs[0][0].get("category"),
                        "baseline": float(base[ok].mean()), "model": float(cand[ok].mean()),
                        "delta": float((cand[ok] - base[ok]).mean()),
                        "baseline_files": [b["file"] for b, _ in pairs], "model_files": [c["file"] for _, c in pairs]})
    return sorted(out, key=lambda d: d["delta"])
