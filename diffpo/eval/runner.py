"""``diffpo eval``: generate on fixed seeds, score, compare with the baseline, write the report.

Everything that can fail on bad input (prompt file, model paths, reward heads) is checked before
the first image is generated; generation resumes from the PNGs already in the output dir.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from diffpo.config import save_config, to_dict
from diffpo.eval.comparison import StatsOptions, compare
from diffpo.eval.config import EvalConfig, EvalModelConfig, SamplingConfig, sampling_for, slug
from diffpo.eval.generate import GenerationBackend, claim_sample_folder, generate_samples, plan_samples, write_manifest
from diffpo.eval.prompts import load_prompts
from diffpo.eval.report import ReportOptions, write_report
from diffpo.eval.scoring import TEMPORAL, load_heads, per_frame_means, score_samples
from diffpo.memory import check_generation_memory

# (model entry, its sampling settings, device, dtype) -> a backend; default: diffusers text-to-image
BackendBuilder = Callable[[EvalModelConfig, SamplingConfig, str, str], GenerationBackend]


def diffusers_backend(entry: EvalModelConfig, sampling: SamplingConfig, device: str, dtype: str) -> GenerationBackend:
    from diffpo.dtypes import DTYPES
    from diffpo.eval.backends import DiffusersBackend

    return DiffusersBackend(entry, sampling, device, DTYPES[dtype])


def report_options(config: EvalConfig, title: str) -> ReportOptions:
    r = config.report
    return ReportOptions(title=title, primary=config.primary_reward, grid_prompts=r.grid_prompts, top_k=r.top_k,
                         histogram_bins=r.histogram_bins, gif_fps=r.gif_fps, thumbnail_size=r.thumbnail_size)


def stats_options(config: EvalConfig) -> StatsOptions:
    r = config.report
    return StatsOptions(r.confidence, r.bootstrap_resamples, r.bootstrap_unit, r.tie_tolerance, config.seed)


def run_eval(config: EvalConfig, build_backend: BackendBuilder | None = None) -> dict:
    """Run the evaluation ``config`` describes; returns the comparison plus ``output_dir``,
    ``report`` (index.html) and per-model ``generated``/``skipped`` counts."""
    started = time.time()
    build_backend = build_backend or diffusers_backend
    out = Path(config.output_dir)

    # fail fast: prompts, model paths, memory and reward heads before any generation, and before an
    # earlier report's config.yaml in output_dir is replaced
    prompts = load_prompts(config.prompts)
    if build_backend is diffusers_backend:
        from diffpo.eval.backends import resolve_model

        for entry in config.models:
            resolve_model(entry)
    check_generation_memory(config)
    heads = load_heads(config)
    consistency, embed = _consistency_embedder(config, heads)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        from diffpo.trainers.preflight import output_dir_error

        raise output_dir_error(out, error) from None
    save_config(config, out / "config.yaml")

    samples, generation, counts = [], {}, {}
    for entry in config.models:
        sampling = sampling_for(config, entry)
        claim_sample_folder(out / "samples" / slug(entry.name), entry.name, sample_settings(config, entry, sampling))
        planned = plan_samples(entry.name, f"samples/{slug(entry.name)}", prompts, sampling.images_per_prompt, config.seed)
        done, stats = generate_samples(lambda e=entry, s=sampling: build_backend(e, s, config.device, config.dtype),
                                       planned, out, sampling.batch_size, config.progress_bar, desc=entry.name)
        samples += done
        counts[entry.name] = {"generated": stats["generated"], "skipped": stats["skipped"]}
        generation[entry.name] = {"sampling": to_dict(sampling), **stats}
    write_manifest(samples, out / "manifest.jsonl")

    rows = score_samples(samples, out, heads, config.sampling.batch_size, embed, config.progress_bar,
                         per_frame=config.report.per_frame_rewards)
    metrics = list(heads) + ([TEMPORAL] if any(TEMPORAL in r for r in rows) else [])
    results = compare(rows, [m.name for m in config.models], metrics, stats_options(config))
    frames = per_frame_means(rows, [m.name for m in config.models], heads)
    if frames:  # videos: the mean reward of each frame position (whole-clip scores are the metrics above)
        results["per_frame"] = frames
    meta = build_meta(config, prompts, generation, consistency)
    report = write_report(out, rows, results, report_options(config, f"diffpo eval: {', '.join(results['models'])}"), meta)
    return {**results, "output_dir": str(out), "report": str(report), "counts": counts, "seconds": time.time() - started}


def sample_settings(config: EvalConfig, entry: EvalModelConfig, sampling: SamplingConfig) -> dict:
    """What a model's samples depend on: its weights, the sampling settings, the seed, the dtype
    and the prompt file (a sample's file name holds only its prompt row and image index). The
    batch size and the number of prompts or images do not change a sample."""
    model = {k: v for k, v in to_dict(entry).items() if k not in ("name", "sampling")}
    drawn = {k: v for k, v in to_dict(sampling).items() if k not in ("batch_size", "images_per_prompt")}
    prompts = {k: v for k, v in to_dict(config.prompts).items() if k in ("source", "format", "prompt_column", "split")}
    return {"model": model, "sampling": drawn, "seed": config.seed, "dtype": config.dtype, "prompts": prompts}


def _consistency_embedder(config: EvalConfig, heads: dict):
    """(label, frame embedding) for temporal consistency, by ``report.consistency_embedding``: the
    named head, else the first one with an open_clip image encoder (``auto``: else (None, None), and
    videos get no consistency figure; ``clip``: else a CLIP image encoder of its own), centred pixels
    (``pixels``), or nothing (``none``)."""
    from diffpo.eval.video import clip_embedder, head_embedder, pixel_embedding

    report = config.report
    if report.consistency_embedding == "none":
        return None, None
    if report.consistency_embedding == "pixels":
        return "pixels (centred)", pixel_embedding
    if report.consistency_reward is not None:
        return report.consistency_reward, head_embedder(heads[report.consistency_reward])
    for label, head in heads.items():
        if hasattr(getattr(head, "encoder", None), "encode_images"):
            return label, head_embedder(head)
    if report.consistency_embedding == "clip":
        arch = report.consistency_clip_arch or "ViT-H-14"
        return f"CLIP {arch}", clip_embedder(report.consistency_clip_arch, report.consistency_clip_path, config.device,
                                             config.dtype)
    return None, None


def build_meta(config: EvalConfig, prompts, generation: dict, consistency: str | None) -> dict:
    from diffpo.eval.provenance import provenance

    categories = sorted({p.category for p in prompts if p.category is not None})
    per_prompt = config.sampling.images_per_prompt
    description = (f"{len(prompts)} prompts from {config.prompts.source}"
                   + (f" ({len(categories)} categories)" if categories else "")
                   + f", {per_prompt} image(s) per prompt, seed {config.seed}; baseline {config.models[0].name}.")
    return {"description": description, "config": to_dict(config), "provenance": provenance(config.device),
            "generation": generation, "prompts": {"source": config.prompts.source, "count": len(prompts),
                                                  "categories": categories},
            "consistency_reward": consistency}


def report_samples(out_dir: str | Path, outputs: dict[str, "torch.Tensor"], prompts: list[str], seeds: list[int],
                   scores: dict[str, dict[str, "torch.Tensor"]], prompt_indices: list[int] | None = None,
                   image_indices: list[int] | None = None, categories: list[str | None] | None = None,
                   stats: StatsOptions | None = None, options: ReportOptions | None = None, meta: dict | None = None) -> Path:
    """A report for samples already generated and scored in memory (as the quickstart has them):
    ``outputs`` maps model names (the first is the baseline) to (N, 3, H, W) images or
    (N, F, 3, H, W) videos on the same ``seeds``; ``scores[metric][model]`` holds (N,) scores.
    The samples are written as PNGs under ``out_dir/samples/``; returns index.html."""
    from diffpo.eval.generate import Sample, save_sample

    out = Path(out_dir)
    prompt_indices = prompt_indices if prompt_indices is not None else list(range(len(prompts)))
    image_indices = image_indices if image_indices is not None else [0] * len(prompts)
    categories = categories if categories is not None else [None] * len(prompts)
    rows, samples = [], []
    for model, pixels in outputs.items():
        if len(pixels) != len(prompts):
            raise ValueError(f"{model}: {len(pixels)} samples for {len(prompts)} prompts")
        for i, sample_pixels in enumerate(pixels):
            sample = Sample(model, prompt_indices[i], image_indices[i], seeds[i], prompts[i], categories[i],
                            f"samples/{slug(model)}/p{prompt_indices[i]:05d}_i{image_indices[i]:03d}.png",
                            int(sample_pixels.shape[0]) if sample_pixels.ndim == 4 else None)
            save_sample(sample_pixels, out / sample.file)
            samples.append(sample)
            rows.append({**sample.__dict__, **{metric: float(values[model][i]) for metric, values in scores.items()}})
    write_manifest(samples, out / "manifest.jsonl")
    models = list(outputs)
    results = compare(rows, models, list(scores), stats or StatsOptions())
    options = options or ReportOptions(title=f"diffpo: {', '.join(models)}")
    meta = {"description": f"{len(set(prompt_indices))} prompts, {len(prompts)} samples per model on shared seeds; "
                           f"baseline {models[0]}.", **(meta or {})}
    if "provenance" not in meta:
        from diffpo.eval.provenance import provenance

        meta["provenance"] = provenance("cpu")
    return write_report(out, rows, results, options, meta)
