"""Helpers the benchmark scripts share: the machine a figure was measured on, a printed table,
JSON results, a tiny pairs dataset and a training config. Not a package: scripts import it as
``_common`` from their own folder."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """What the numbers were measured on (CPU model, cores, threads, GPU, versions)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def write_result(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    return out


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Rows as an aligned text table; floats with 4 significant digits."""
    cells = [[f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def shapes_pairs(folder: Path, count: int, size: int, seed: int = 0) -> str:
    """A Pick-a-Pic-format parquet of ``count`` pairs of drawn shapes at ``size`` px."""
    from diffpo.data.shapes import sample_shapes
    from diffpo.data.writer import write_pairs_parquet

    images = sample_shapes(2 * count, size=size, seed=seed)
    rows = [{"image_0": images[2 * i][0], "image_1": images[2 * i + 1][0], "label_0": float(i % 2),
             "caption": images[2 * i][1]} for i in range(count)]
    return str(write_pairs_parquet(folder / "pairs.parquet", rows))


def train_config(model: str, data: str, output_dir: Path, *overrides: str):
    """A Diffusion-DPO LoRA config of the benchmarks (quiet, no checkpoints until the end)."""
    from diffpo.config import TrainConfig, load_config

    return load_config(TrainConfig, None, [f"model.pretrained={model}", f"data.source={data}", f"output_dir={output_dir}",
                                           "objective.beta=2000", "optim.lr=1e-4", "progress_bar=false", *overrides])


def steady_pairs_per_s(run_dir: Path, pairs_per_step: int, warmup_records: int = 1) -> float:
    """Pairs/s over the logged windows after the first ``warmup_records`` (allocator, oneDNN/cuDNN
    kernel choice): total pairs over total time, from each window's ``pairs_per_s``."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if len(records) <= warmup_records:
        raise RuntimeError(f"{run_dir}: {len(records)} logged windows, none after the {warmup_records} of warm-up")
    steps = [b["step"] - a["step"] for a, b in zip(records[warmup_records - 1:], records[warmup_records:])]
    seconds = sum(n * pairs_per_step / r["pairs_per_s"] for n, r in zip(steps, records[warmup_records:]))
    return sum(steps) * pairs_per_step / seconds


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


FLOW_MODELS = ("tiny-sd3", "tiny-flux")  # random tiny flow transformers built in code (diffpo.models.tiny)


def model_source(model: str, folder: Path, t5_width: int = 64, t5_layers: int = 2) -> str:
    """``model`` as a ``load_stack`` source: ``tiny-sd3`` / ``tiny-flux`` are built (random weights,
    a T5 encoder of ``t5_width`` x ``t5_layers``) and saved into ``folder``; anything else passes."""
    if model not in FLOW_MODELS:
        return model
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from diffpo.models.tiny import build_tiny_flux_components, build_tiny_sd3_components

    if model == "tiny-sd3":
        StableDiffusion3Pipeline(**build_tiny_sd3_components(t5_width=t5_width, t5_layers=t5_layers)).save_pretrained(folder)
    else:
        FluxPipeline(**build_tiny_flux_components(t5_width=t5_width)).save_pretrained(folder)
    return str(folder)
