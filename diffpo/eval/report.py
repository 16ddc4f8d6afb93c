"""The evaluation report: ``index.html`` (opens from disk: inline CSS, no scripts, relative links),
``summary.md`` (markdown tables for a paper), ``scores.json`` (every number), ``scores.jsonl`` (one
line per sample) and matplotlib figures in ``figures/``. Sample files are given relative to the
report dir."""

from __future__ import annotations

import html
import json
import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffpo.eval.comparison import prompt_deltas
from diffpo.eval.config import slug
from diffpo.eval.scoring import TEMPORAL

COLOURS = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#b7791f", "#718096", "#e53e3e", "#3182ce"]


@dataclass
class ReportOptions:
    title: str = "diffpo evaluation"
    primary: str | None = None  # metric ranking gains/losses (default: the first)
    grid_prompts: int = 8
    top_k: int = 5
    histogram_bins: int = 30
    gif_fps: int = 8
    thumbnail_size: int = 128


def template_path() -> Path:
    from diffpo.resources import assets_dir

    return assets_dir() / "report" / "template.html"


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def decimals_for(values) -> int:
    """Decimals that show about four significant digits of the largest |value| (27.53, 0.6123)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=1.0)
    return int(min(4, max(1, 3 - math.floor(math.log10(top)) if top > 0 else 3)))


def fmt(value: float, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_ci(stat: dict, digits: int, key: str = "mean", ci: str = "ci95") -> str:
    low, high = stat[ci]
    return f"{fmt(stat[key], digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def fmt_win(win: dict) -> str:
    low, high = win["ci95"]
    return f"{fmt(win['mean'], 3)} [{fmt(low, 3)}, {fmt(high, 3)}] ({win['wins']}/{win['ties']}/{win['losses']})"


def _metric_digits(results: dict) -> dict[str, int]:
    return {m: decimals_for([s["mean"] for s in results["summary"][m].values()]) for m in results["metrics"]}


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot state, no display)
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def bar_chart(results: dict, metrics: list[str], path: Path, confidence: float) -> Path:
    """Mean per model with its CI as error bars, one panel per metric."""
    figure = _figure(max(3.2 * len(metrics), 4.0), 3.4)
    models = results["models"]
    for i, metric in enumerate(metrics):
        ax = figure.add_subplot(1, len(metrics), i + 1)
        stats = [results["summary"][metric][m] for m in models]
        means = np.array([s["mean"] for s in stats])
        low = np.array([s["ci95"][0] for s in stats])
        high = np.array([s["ci95"][1] for s in stats])
        # points with CI bars, not bars from zero: the axis zooms to the differences between models
        for j in range(len(models)):
            ax.errorbar([j], [means[j]], yerr=[[means[j] - low[j]], [high[j] - means[j]]], fmt="o", markersize=7,
                        capsize=5, color=COLOURS[j % len(COLOURS)], elinewidth=2)
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"mean and {confidence:.0%} bootstrap CI", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


def per_frame_chart(per_frame: dict, models: list[str], path: Path) -> Path:
    """Videos: each image head's mean score at every frame position, one line per model."""
    figure = _figure(max(3.2 * len(per_frame), 4.0), 3.2)
    for i, (head, by_model) in enumerate(per_frame.items()):
        ax = figure.add_subplot(1, len(per_frame), i + 1)
        for j, model in enumerate(models):
            if model in by_model:
                values = by_model[model]
                ax.plot(range(len(values)), values, marker="o", markersize=3, color=COLOURS[j % len(COLOURS)], label=model)
        ax.set_xlabel("frame", fontsize=8)
        ax.set_title(head, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("mean reward per frame position", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


def histogram(rows: list[dict], models: list[str], metric: str, path: Path, bins: int) -> Path:
    """Score distribution of every model for one metric, on shared bins."""
    figure = _figure(5.0, 3.2)
    ax = figure.add_subplot(1, 1, 1)
    per_model = {m: np.array([r[metric] for r in rows if r["model"] == m and math.isfinite(r.get(metric, math.nan))])
                 for m in models}
    every = np.concatenate([v for v in per_model.values() if len(v)] or [np.zeros(1)])
    edges = np.histogram_bin_edges(every, bins=bins)
    for j, (model, values) in enumerate(per_model.items()):
        if len(values):
            ax.hist(values, bins=edges, histtype="stepfilled", alpha=0.35, color=COLOURS[j % len(COLOURS)], label=model)
            ax.hist(values, bins=edges, histtype="step", color=COLOURS[j % len(COLOURS)])
    ax.set_xlabel(metric)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# Media
# --------------------------------------------------------------------------------------------


def _video_media(rows: list[dict], root: Path, fps: int) -> dict[str, dict]:
    """GIF (and MP4 when possible) of every video sample, next to the film strips in media/."""
    from diffpo.eval.generate import load_sample
    from diffpo.eval.video import save_gif, save_mp4

    media = {}
    for row in rows:
        if not row.get("frames"):
            continue
        stem = Path(row["file"]).with_suffix("")
        gif, mp4 = Path("media") / f"{stem}.gif", Path("media") / f"{stem}.mp4"
        if not (root / gif).is_file() or (root / gif).stat().st_mtime < (root / row["file"]).stat().st_mtime:
            frames = load_sample(root / row["file"])
            save_gif(frames, root / gif, fps)
            made = save_mp4(frames, root / mp4, fps)
            mp4 = mp4 if made else None
        elif not (root / mp4).is_file():
            mp4 = None
        media[row["file"]] = {"gif": gif.as_posix(), "mp4": mp4.as_posix() if mp4 else None}
    return media


def grid_prompt_indices(rows: list[dict], baseline: str, count: int) -> list[int]:
    """Up to ``count`` prompts, taken round-robin over categories so that each one shows."""
    by_category: dict = {}
    for row in rows:
        if row["model"] == baseline and row["image_index"] == 0:
            by_category.setdefault(row.get("category"), []).append(row["prompt_index"])
    per_category = -(-count // max(len(by_category), 1))
    queues = []  # evenly spaced within each category, not its first rows (often near-duplicates)
    for _, indices in sorted(by_category.items(), key=lambda kv: str(kv[0])):
        indices = sorted(indices)
        spread = np.linspace(0, len(indices) - 1, min(per_category, len(indices))).round().astype(int)
        queues.append([indices[i] for i in dict.fromkeys(spread.tolist())])
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def grid_png(rows: list[dict], models: list[str], prompts: list[int], root: Path, path: Path) -> Path | None:
    """Models as rows, the grid prompts as columns (image 0; a video's first frame)."""
    import torch

    from diffpo.eval.generate import to_pil
    from diffpo.eval.generate import load_sample
    from diffpo.eval.grid import image_grid

    lookup = {(r["model"], r["prompt_index"]): r for r in rows if r["image_index"] == 0}
    tiles = []
    for model in models:
        for index in prompts:
            pixels = load_sample(root / lookup[(model, index)]["file"])
            tiles.append(pixels[0] if pixels.ndim == 4 else pixels)
    if not tiles:
        return None
    pil = to_pil(torch.stack(tiles))
    image_grid(pil, rows=len(models), scale=max(1, 96 // pil[0].size[0])).save(path)
    return path


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _thumb(row: dict, media: dict, size: int) -> str:
    title = _esc(f"{row['model']} | seed {row['seed']} | {row['prompt']}")
    entry = media.get(row["file"])
    src = entry["gif"] if entry else row["file"]
    img = f'<img class="thumb" src="{_esc(src)}" width="{size}" height="{size}" alt="{title}" title="{title}">'
    if entry and entry["mp4"]:
        return f'<a href="{_esc(entry["mp4"])}">{img}</a>'
    return f'<a href="{_esc(row["file"])}">{img}</a>'


def _summary_tables(results: dict, digits: dict[str, int]) -> str:
    models, metrics, baseline = results["models"], results["metrics"], results["baseline"]
    head = "".join(f"<th>{_esc(m)}<br><span class='ci'>mean [CI]</span></th><th>median</th><th>std</th>" for m in metrics)
    body = []
    for model in models:
        cells = []
        for metric in metrics:
            stat = results["summary"][metric][model]
            best = max(results["summary"][metric].values(), key=lambda s: s["mean"] if math.isfinite(s["mean"]) else -math.inf)
            cls = " class='best'" if stat is best and len(models) > 1 else ""
            cells.append(f"<td{cls}>{fmt(stat['mean'], digits[metric])} <span class='ci'>[{fmt(stat['ci95'][0], digits[metric])}, "
                         f"{fmt(stat['ci95'][1], digits[metric])}]</span></td><td>{fmt(stat['median'], digits[metric])}</td>"
                         f"<td>{fmt(stat['std'], digits[metric])}</td>")
        row_cls = " class='baseline'" if model == baseline else ""
        n = results["summary"][metrics[0]][model]["n"]
        body.append(f"<tr{row_cls}><td class='name'>{_esc(model)}{' (baseline)' if model == baseline else ''}</td>"
                    f"<td>{n}</td>{''.join(cells)}</tr>")
    scores = (f"<table id='summary-table'><thead><tr><th class='name'>model</th><th>n</th>{head}</tr></thead>"
              f"<tbody>{''.join(body)}</tbody></table>")
    if len(models) < 2:
        return scores
    whead = "".join(f"<th>{_esc(m)}</th>" for m in metrics)
    wbody = []
    for model in models[1:]:
        cells = []
        for metric in metrics:
            win = results["win_rates"][metric][model]
            cls = " class='best'" if win["ci95"][0] > 0.5 else " class='worse'" if win["ci95"][1] < 0.5 else ""
            cells.append(f"<td{cls}>{fmt_win(win)}</td>")
        wbody.append(f"<tr><td class='name'>{_esc(model)}</td>{''.join(cells)}</tr>")
    wins = (f"<h3>Win rate over {_esc(baseline)} (same seeds)</h3><table id='win-rate-table'><thead><tr>"
            f"<th class='name'>model</th>{whead}</tr></thead><tbody>{''.join(wbody)}</tbody></table>"
            f"<p class='note'>win rate [CI] (wins/ties/losses). {_esc(results['statistics']['tie_rule'])}.</p>")
    return scores + wins


def _category_tables(results: dict, digits: dict[str, int]) -> str:
    if not results["categories"]:
        return ""
    models, baseline = results["models"], results["baseline"]
    parts = ["<h2 id='categories'>Per category</h2>"]
    for metric in results["metrics"]:
        header = "".join(f"<th>{_esc(m)}</th>" for m in models)
        header += "".join(f"<th>win rate {_esc(m)}</th>" for m in models[1:])
        body = []
        for category in results["categories"]:
            stats = results["by_category"][metric][category]
            cells = "".join(f"<td>{fmt_ci(stats[m], digits[metric])}</td>" for m in models)
            cells += "".join(f"<td>{fmt_win(results['category_win_rates'][metric][category][m])}</td>" for m in models[1:])
            body.append(f"<tr><td class='name'>{_esc(category)}</td><td>{stats[baseline]['n']}</td>{cells}</tr>")
        parts.append(f"<h3>{_esc(metric)}</h3><table class='category-table'><thead><tr><th class='name'>category</th>"
                     f"<th>n</th>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    return "".join(parts)


def _grid_html(rows: list[dict], models: list[str], prompts: list[int], media: dict, size: int) -> str:
    lookup: dict = {}
    for row in rows:
        lookup.setdefault((row["model"], row["prompt_index"]), []).append(row)
    header = "".join(f"<th>{_esc(m)}</th>" for m in models)
    body = []
    for index in prompts:
        first = lookup[(models[0], index)][0]
        cells = "".join("<td>" + "".join(_thumb(r, media, size) for r in sorted(lookup[(m, index)], key=lambda r: r["image_index"]))
                        + "</td>" for m in models)
        category = f"<br><span class='ci'>{_esc(first['category'])}</span>" if first.get("category") else ""
        body.append(f"<tr><td class='prompt'>{_esc(first['prompt'])}{category}</td>{cells}</tr>")
    return (f"<table id='grid-table'><thead><tr><th class='name'>prompt</th>{header}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _deltas_html(deltas: dict, results: dict, rows: list[dict], media: dict, options: ReportOptions, metric: str,
                 digits: int) -> str:
    by_file = {r["file"]: r for r in rows}
    parts = []
    for model, ranked in deltas.items():
        for title, chosen in (("largest gains", ranked["gains"]), ("largest losses", ranked["losses"])):
            body = []
            for d in chosen:
                cls = "delta-pos" if d["delta"] > 0 else "delta-neg" if d["delta"] < 0 else ""
                base = "".join(_thumb(by_file[f], media, options.thumbnail_size) for f in d["baseline_files"])
                cand = "".join(_thumb(by_file[f], media, options.thumbnail_size) for f in d["model_files"])
                body.append(f"<tr><td class='prompt'>{_esc(d['prompt'])}</td><td class='{cls}'>{d['delta']:+.{digits}f}</td>"
                            f"<td>{fmt(d['baseline'], digits)}<br>{base}</td><td>{fmt(d['model'], digits)}<br>{cand}</td></tr>")
            parts.append(f"<h3>{_esc(model)}: {title} in {_esc(metric)} vs {_esc(results['baseline'])}</h3>"
                         f"<table class='delta-table'><thead><tr><th class='name'>prompt</th><th>Δ mean</th>"
                         f"<th>{_esc(results['baseline'])}</th><th>{_esc(model)}</th></tr></thead><tbody>{''.join(body)}</tbody></table>")
    return "".join(parts)


def _meta_html(meta: dict) -> str:
    import yaml

    prov = meta.get("provenance", {})
    versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
    generation = "".join(f"<tr><td class='name'>{_esc(m)}</td><td class='prompt'>{_esc(json.dumps(info))}</td></tr>"
                         for m, info in meta.get("generation", {}).items())
    config = yaml.safe_dump(meta.get("config", {}), sort_keys=False)
    return (f"<h2 id='reproduce'>Reproducibility</h2><table><tbody>"
            f"<tr><td class='name'>created</td><td class='prompt'>{_esc(prov.get('created', ''))}</td></tr>"
            f"<tr><td class='name'>git commit</td><td class='prompt'>{_esc(prov.get('git_commit', 'unknown'))}</td></tr>"
            f"<tr><td class='name'>device</td><td class='prompt'>{_esc(prov.get('device', ''))}</td></tr>"
            f"<tr><td class='name'>versions</td><td class='prompt'>{_esc(versions)}</td></tr>"
            f"<tr><td class='name'>command</td><td class='prompt'>{_esc(prov.get('command', ''))}</td></tr>"
            f"</tbody></table><h3>Generation</h3><table><tbody>{generation}</tbody></table>"
            f"<h3>Config</h3><pre>{_esc(config)}</pre>")


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def summary_markdown(results: dict, meta: dict, digits: dict[str, int]) -> str:
    models, metrics, baseline = results["models"], results["metrics"], results["baseline"]
    stats = results["statistics"]
    lines = [f"# {meta.get('title', 'diffpo evaluation')}", "",
             f"{meta.get('description', '')}", "",
             f"Mean [{stats['confidence']:.0%} CI] per model; CI: {stats['ci']} ({stats['bootstrap_resamples']} resamples).", "",
             "| Model | n | " + " | ".join(f"{m} ↑" for m in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for model in models:
        cells = [fmt_ci(results["summary"][m][model], digits[m]) for m in metrics]
        name = f"{model} (baseline)" if model == baseline else model
        lines.append(f"| {name} | {results['summary'][metrics[0]][model]['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Median [CI] and standard deviation:", "",
              "| Model | " + " | ".join(f"{m} median | {m} std" for m in metrics) + " |",
              "|---|" + "---:|---:|" * len(metrics)]
    for model in models:
        cells = [f"{fmt_ci(results['summary'][m][model], digits[m], 'median', 'median_ci95')} | "
                 f"{fmt(results['summary'][m][model]['std'], digits[m])}" for m in metrics]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if len(models) > 1:
        lines += ["", f"Win rate over {baseline} on the same seeds [{stats['confidence']:.0%} CI] (wins/ties/losses); "
                      f"tie rule: {stats['tie_rule']}.", "",
                  "| Model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for model in models[1:]:
            lines.append(f"| {model} | " + " | ".join(fmt_win(results["win_rates"][m][model]) for m in metrics) + " |")
    for metric in metrics if results["categories"] else []:
        lines += ["", f"## {metric} per category", "",
                  "| Category | n | " + " | ".join(models) + "".join(f" | win rate {m}" for m in models[1:]) + " |",
                  "|---|---:|" + "---:|" * (len(models) + len(models) - 1)]
        for category in results["categories"]:
            row = results["by_category"][metric][category]
            cells = [fmt_ci(row[m], digits[metric]) for m in models]
            cells += [fmt_win(results["category_win_rates"][metric][category][m]) for m in models[1:]]
            lines.append(f"| {category} | {row[baseline]['n']} | " + " | ".join(cells) + " |")
    prov = meta.get("provenance", {})
    lines += ["", f"diffpo {prov.get('versions', {}).get('diffpo', '?')}, git {prov.get('git_commit', 'unknown')}, "
                  f"{prov.get('device', '')}; config in config.yaml.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def write_report(out_dir: str | Path, rows: list[dict], results: dict, options: ReportOptions, meta: dict) -> Path:
    """Write the report files into ``out_dir`` (which holds the sample files ``rows`` name)."""
    root = Path(out_dir)
    figures = root / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    models, baseline = results["models"], results["baseline"]
    rewards = [m for m in results["metrics"] if m != TEMPORAL]
    primary = options.primary or rewards[0]
    digits = _metric_digits(results)
    confidence = results["statistics"]["confidence"]

    bar_chart(results, rewards, figures / "means.png", confidence)
    hist_files = [histogram(rows, models, m, figures / f"hist_{slug(m)}.png", options.histogram_bins) for m in rewards]
    temporal_file = bar_chart(results, [TEMPORAL], figures / "temporal_consistency.png", confidence) \
        if TEMPORAL in results["metrics"] else None
    media = _video_media(rows, root, options.gif_fps)
    grid_prompts = grid_prompt_indices(rows, baseline, options.grid_prompts)
    grid_file = grid_png(rows, models, grid_prompts, root, figures / "grid.png")
    deltas = {}
    for model in models[1:]:
        ranked = prompt_deltas(rows, baseline, model, primary)
        gains = [d for d in reversed(ranked) if d["delta"] > 0][: options.top_k]
        losses = [d for d in ranked if d["delta"] < 0][: options.top_k]
        deltas[model] = {"gains": gains, "losses": losses}

    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731 - every link in the report is relative
    figures_html = f"<img src='{rel(figures / 'means.png')}' alt='means with confidence intervals'>"
    figures_html += "".join(f"<img src='{rel(p)}' alt='histogram'>" for p in hist_files)
    body = [f"<h1>{_esc(options.title)}</h1>",
            f"<p class='meta'>{_esc(meta.get('description', ''))}</p>",
            "<nav><a href='#summary'>summary</a><a href='#figures'>figures</a>"
            + ("<a href='#categories'>categories</a>" if results["categories"] else "")
            + "<a href='#grid'>grid</a>" + ("<a href='#deltas'>gains and losses</a>" if deltas else "")
            + "<a href='#reproduce'>reproduce</a> · <a href='summary.md'>summary.md</a> · <a href='scores.json'>scores.json</a>"
            + " · <a href='scores.jsonl'>scores.jsonl</a></nav>",
            "<h2 id='summary'>Summary</h2>", _summary_tables(results, digits),
            f"<p class='note'>CI: {_esc(results['statistics']['ci'])}, {results['statistics']['bootstrap_resamples']} "
            f"resamples. std: {_esc(results['statistics']['std'])}. NaN scores (a head without an opinion) are left out of n.</p>",
            f"<h2 id='figures'>Figures</h2><div class='figures'>{figures_html}</div>"]
    if temporal_file is not None:
        body.append(f"<h2 id='temporal'>Temporal consistency</h2><p class='note'>Mean cosine between embeddings of "
                    f"consecutive frames ({_esc(meta.get('consistency_reward', ''))} image encoder); 1 = identical frames."
                    f"</p><div class='figures'><img src='{rel(temporal_file)}' alt='temporal consistency'></div>")
    if results.get("per_frame"):
        frame_file = per_frame_chart(results["per_frame"], models, figures / "per_frame.png")
        body.append("<h2 id='per-frame'>Reward per frame</h2><p class='note'>Each image head's mean score at every "
                    "frame position (the tables above hold whole-clip scores: the mean over frames, or a video head's "
                    f"clip score).</p><div class='figures'><img src='{rel(frame_file)}' alt='reward per frame'></div>")
    body.append(_category_tables(results, digits))
    body.append(f"<h2 id='grid'>Same prompts, same seeds, every model</h2>{_grid_html(rows, models, grid_prompts, media, options.thumbnail_size)}")
    if grid_file is not None:
        body.append(f"<p class='note'>As one image for a paper: <a href='{rel(grid_file)}'>{rel(grid_file)}</a> "
                    f"(rows: {_esc(', '.join(models))}; image 0 of each prompt).</p>")
    if deltas:
        body.append("<h2 id='deltas'>Largest gains and losses</h2>"
                    f"<p class='note'>Per prompt: mean {_esc(primary)} over its images minus the baseline's on the same seeds.</p>"
                    + _deltas_html(deltas, results, rows, media, options, primary, digits.get(primary, 3)))
    body.append(_meta_html(meta))
    page = string.Template(template_path().read_text(encoding="utf-8")).substitute(
        title=_esc(options.title), body="\n".join(body))
    (root / "index.html").write_text(page, encoding="utf-8")

    (root / "summary.md").write_text(summary_markdown(results, {**meta, "title": options.title}, digits), encoding="utf-8")
    lean = lambda ds: [{k: v for k, v in d.items() if not k.endswith("_files")} for d in ds]  # noqa: E731
    scores = {**results, "primary_reward": primary,
              "gains_losses": {m: {"gains": lean(d["gains"]), "losses": lean(d["losses"])} for m, d in deltas.items()},
              "meta": meta}
    (root / "scores.json").write_text(json.dumps(_finite(scores), indent=2) + "\n", encoding="utf-8")
    with open(root / "scores.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(_finite(row)) + "\n")
    return root / "index.html"


def _finite(value):
    """NaN/inf -> null: strict JSON readers (browsers, jq) reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
