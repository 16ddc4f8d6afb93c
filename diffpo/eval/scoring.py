"""Scoring with reward heads: evaluation samples from the PNGs on disk (so a resumed run and a fresh
one score identical pixels), and image folders and preference pairs (the library side of
``diffpo score``).

Folders: ``prompts`` is either a text file with one prompt per line, matched to the folder's images
sorted by file name (the counts must be equal), or a ``.jsonl`` (objects with ``file`` and
``prompt``) / ``.csv`` (columns ``file``, ``prompt``) manifest naming the images to score, relative
to the folder, in manifest order. The output is JSONL: one object per image with ``file``,
``prompt`` and one field per head.

Pairs: a Pick-a-Pic-format parquet (``jpg_0``, ``jpg_1``, ``caption``) is read in record batches and
written to a NEW parquet with every input column plus ``<name>_0``, ``<name>_1`` and
``label_<name>`` per head (1: image 0 scores higher, 0: lower, 0.5: equal, NaN when a score is NaN),
the way SmPO relabels Pick-a-Pic with PickScore. The input file is never written.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffpo.data.images import decode_image
from diffpo.eval.config import EvalConfig, RewardConfig
from diffpo.eval.generate import Sample, load_sample
from diffpo.eval.video import Embedder, per_frame_scores, temporal_consistency


TEMPORAL = "temporal_consistency"
PER_FRAME = "@frames"  # a row's per-frame scores of a head: "<head>@frames"


def per_frame_means(rows: list[dict], models: list[str], heads) -> dict:
    """``{head: {model: [mean score at frame 0, 1, ...]}}`` over the rows that have per-frame scores
    (NaN scores left out); heads without any are absent."""
    import numpy as np

    out = {}
    for name in heads:
        per_model = {}
        for model in models:
            lists = [r[name + PER_FRAME] for r in rows if r["model"] == model and name + PER_FRAME in r]
            if lists and len({len(v) for v in lists}) == 1:
                per_model[model] = [float(x) for x in np.nanmean(np.array(lists, dtype=float), axis=0)]
        if per_model:
            out[name] = per_model
    return out


def load_head(reward: RewardConfig, device: str = "cpu", dtype: str = "fp32"):
    """One configured head; learned heads get the run's device and dtype."""
    from diffpo.rewards import REWARDS, LearnedHead, load

    learned = issubclass(REWARDS[reward.name], LearnedHead)
    extra = {"device": device, "dtype": dtype} if learned else {}
    return load(reward.name, path=reward.path, arch=reward.arch, **extra, **reward.options)


def load_heads(config: EvalConfig) -> dict:
    """``{label: head}`` for every configured reward, in config order."""
    return {r.key: load_head(r, config.device, config.dtype) for r in config.rewards}


def score_samples(samples: list[Sample], root: Path, heads: dict, batch_size: int = 16,
                  embed: Embedder | None = None, progress: bool = True, desc: str = "score",
                  per_frame: bool = False) -> list[dict]:
    """One row per sample: its manifest fields plus a score per head (NaN where a head has none)
    and, for videos with ``embed``, ``temporal_consistency``. A video's score per head is its
    whole-clip score; with ``per_frame``, image heads also give each frame's score, as the list
    ``<head>@frames`` (whole-clip video heads, e.g. motion rewards, have none)."""
    rows = [dict(asdict(s)) for s in samples]
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = list(range(start, min(start + batch_size, len(samples))))
        pixels = [load_sample(Path(root) / samples[i].file) for i in chunk]
        by_shape: dict[tuple, list[int]] = {}  # heads take one tensor: stack equal shapes only
        for j, p in enumerate(pixels):
            by_shape.setdefault(tuple(p.shape), []).append(j)
        for members in by_shape.values():
            batch = torch.stack([pixels[j] for j in members])
            prompts = [samples[chunk[j]].prompt for j in members]
            for name, head in heads.items():
                if per_frame and batch.ndim == 5 and not head.scores_videos:
                    frames, whole = per_frame_scores(head, batch, prompts)
                    for j, values in zip(members, frames.tolist()):
                        rows[chunk[j]][name + PER_FRAME] = [float(v) for v in values]
                else:
                    whole = head(batch, prompts)
                for j, value in zip(members, whole.tolist()):
                    rows[chunk[j]][name] = float(value)
            if batch.ndim == 5 and embed is not None:
                for j, value in zip(members, temporal_consistency(batch, embed).tolist()):
                    rows[chunk[j]][TEMPORAL] = float(value)
    for row in rows:
        for name in heads:
            row.setdefault(name, math.nan)
    return rows


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_tensor(image) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def score_batch(images: list, prompts: list[str], heads: dict) -> dict[str, list[float]]:
    """Scores of PIL ``images`` by every head; images of equal size are stacked into one call."""
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.size, []).append(i)
    scores = {name: [math.nan] * len(images) for name in heads}
    for rows in by_size.values():
        pixels = torch.stack([to_tensor(images[i]) for i in rows])
        for name, head in heads.items():
            for i, value in zip(rows, head(pixels, [prompts[i] for i in rows]).tolist()):
                scores[name][i] = value
    return scores


def read_prompts(images_dir: str | Path, prompts_file: str | Path) -> list[tuple[str, str]]:
    """(file name, prompt) pairs for a folder, as the module docstring defines."""
    images_dir, prompts_file = Path(images_dir), Path(prompts_file)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: not a folder")
    if not prompts_file.is_file():
        raise FileNotFoundError(f"--prompts {prompts_file}: file not found")
    if prompts_file.suffix in (".jsonl", ".csv"):
        with open(prompts_file, encoding="utf-8", newline="") as handle:
            if prompts_file.suffix == ".csv":
                records = list(csv.DictReader(handle))
            else:
                records = [json.loads(line) for line in handle if line.strip()]
        entries = []
        for n, record in enumerate(records, start=1):
            if "file" not in record or "prompt" not in record:
                raise ValueError(f"{prompts_file} entry {n}: needs 'file' and 'prompt', has {sorted(record)}")
            if not (images_dir / record["file"]).is_file():
                raise FileNotFoundError(f"{prompts_file} entry {n}: image {images_dir / record['file']} not found")
            entries.append((str(record["file"]), str(record["prompt"])))
        return entries
    prompts = prompts_file.read_text(encoding="utf-8").splitlines()
    if prompts and prompts[-1] == "":
        prompts = prompts[:-1]
    files = sorted(p.name for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) != len(prompts):
        raise ValueError(
            f"{len(files)} images in {images_dir} but {len(prompts)} prompts in {prompts_file}: a text file needs "
            "one prompt per image (matched in file-name order), or use a .jsonl/.csv manifest with file,prompt"
        )
    return list(zip(files, prompts))


def score_folder(images_dir: str | Path, prompts_file: str | Path, heads: dict, out: str | Path,
                 batch_size: int = 16, progress: bool = True) -> Path:
    """Score every image of a folder with every head; writes and returns the JSONL ``out``."""
    from tqdm.auto import tqdm

    entries = read_prompts(images_dir, prompts_file)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for start in tqdm(range(0, len(entries), batch_size), desc="score", unit="batch", disable=not progress):
            chunk = entries[start : start + batch_size]
            images = [decode_image(str(Path(images_dir) / f), where=f) for f, _ in chunk]
            scores = score_batch(images, [p for _, p in chunk], heads)
            for i, (file, prompt) in enumerate(chunk):
                handle.write(json.dumps({"file": file, "prompt": prompt, **{n: scores[n][i] for n in heads}}) + "\n")
    return out


def preference_label(score_0: float, score_1: float) -> float:
    """1 if image 0 scores higher, 0 if lower, 0.5 if equal; NaN if either score is NaN."""
    if math.isnan(score_0) or math.isnan(score_1):
        return math.nan
    return 1.0 if score_0 > score_1 else 0.0 if score_0 < score_1 else 0.5


def score_pairs(source: str | Path, heads: dict, out: str | Path | None = None, batch_size: int = 16,
                image_0_column: str = "jpg_0", image_1_column: str = "jpg_1", caption_column: str = "caption",
                progress: bool = True) -> Path:
    """Add ``<name>_0``, ``<name>_1`` and ``label_<name>`` columns to a Pick-a-Pic-format parquet,
    written to ``out`` (default ``<stem>_scored.parquet`` beside it); columns of those names in the
    input are replaced in the output."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"--pairs {source}: parquet file not found")
    out = Path(out) if out is not None else source.with_name(f"{source.stem}_scored.parquet")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the input file: scores go to a new parquet, pass another --out")
    parquet = pq.ParquetFile(source)
    missing = [c for c in (image_0_column, image_1_column, caption_column) if c not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"{source} is missing column(s) {missing}; it has {parquet.schema_arrow.names}")
    added = [column for name in heads for column in (f"{name}_0", f"{name}_1", f"label_{name}")]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        with tqdm(total=parquet.metadata.num_rows, desc="score pairs", unit="pair", disable=not progress) as bar:
            for batch in parquet.iter_batches(batch_size=batch_size):
                table = pa.Table.from_batches([batch])
                captions = [str(c or "") for c in table.column(caption_column).to_pylist()]
                rows = range(table.num_rows)
                images = [decode_image(v, source.parent, where=f"{image_0_column} of a pair")
                          for v in table.column(image_0_column).to_pylist()]
                images += [decode_image(v, source.parent, where=f"{image_1_column} of a pair")
                           for v in table.column(image_1_column).to_pylist()]
                scores = score_batch(images, captions + captions, heads)
                table = table.drop_columns([c for c in added if c in table.column_names])
                for name in heads:
                    first, second = scores[name][: len(rows)], scores[name][len(rows) :]
                    table = table.append_column(f"{name}_0", pa.array(first, pa.float64()))
                    table = table.append_column(f"{name}_1", pa.array(second, pa.float64()))
                    table = table.append_column(f"label_{name}", pa.array(
                        [preference_label(a, b) for a, b in zip(first, second)], pa.float64()))
                if writer is None:
                    writer = pq.ParquetWriter(out, table.schema)
                writer.write_table(table)
                bar.update(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"{source} has no rows to score")
    return out
