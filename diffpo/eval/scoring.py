"""Scoring evaluation samples with reward heads, from the PNGs on disk (so a resumed run and a
fresh one score identical pixels)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from diffpo.eval.config import EvalConfig, RewardConfig
from diffpo.eval.generation import Sample, load_sample
from diffpo.eval.video import Embedder, temporal_consistency

TEMPORAL = "temporal_consistency"


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
                  embed: Embedder | None = None, progress: bool = True, desc: str = "score") -> list[dict]:
    """One row per sample: its manifest fields plus a score per head (NaN where a head has none)
    and, for videos with ``embed``, ``temporal_consistency``."""
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
                for j, value in zip(members, head(batch, prompts).tolist()):
                    rows[chunk[j]][name] = float(value)
            if batch.ndim == 5 and embed is not None:
                for j, value in zip(members, temporal_consistency(batch, embed).tolist()):
                    rows[chunk[j]][TEMPORAL] = float(value)
    for row in rows:
        for name in heads:
            row.setdefault(name, math.nan)
    return rows
