"""Preference pairs of prompt rewrites (Sem-DPO data, Mohamed et al., 2025).

For every source prompt x the rewriter samples K rewrites y_1..y_K; each rewrite and x itself are
rendered on the same seeds (the same x_T), every image is scored by the reward heads, and the
combined reward of a rewrite is

    R(y) = mean over seeds of  sum_h w_h * r_h(image(y, seed), text_h),

with text_h = y for a head scored against the rewrite (image quality / preference) and text_h = x
for a faithfulness head (does the image still show what the user asked for?). ``cos`` = cos(e(x),
e(y)) from the sentence embedder is stored for the Sem-DPO weight exp(-alpha (1 - cos)).

``build_candidates`` writes ``candidates.jsonl`` (one line per source prompt, appended, flushed and
fsynced per prompt, so an interrupted run resumes where it stopped); ``make_pairs`` turns it into
``pairs.jsonl`` (chosen = the higher combined reward).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal

import torch

PAIRINGS = ("best_worst", "all")
AGAINST = ("rewrite", "original")


@dataclass
class RewardSpec:
    """One reward head in the combined reward: ``weight`` * score, scored with the rewrite's text
    (``against="rewrite"``) or with the original prompt (``"original"``: faithfulness)."""

    name: str
    weight: float = 1.0
    against: Literal["rewrite", "original"] = "rewrite"
    label: str | None = None  # key in ``components`` (default: name); lets one head appear twice
    path: str | None = None
    arch: str | None = None

    def __post_init__(self):
        if self.against not in AGAINST:
            raise ValueError(f"reward {self.name!r}: against={self.against!r} must be 'rewrite' or 'original'")

    @property
    def key(self) -> str:
        return self.label or self.name


def default_rewards() -> list[RewardSpec]:
    """Promptist-style: image aesthetics of the rewrite's render plus CLIP faithfulness to the original."""
    return [RewardSpec("aesthetic", 1.0, "rewrite"), RewardSpec("clip", 1.0, "original")]


@dataclass
class PairBuildOptions:
    """How candidates are sampled, rendered, scored and paired."""

    n_candidates: int = 4  # K rewrites per source prompt
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    seeds_per_prompt: int = 2  # renders per rewrite; the original and every rewrite share them
    steps: int = 25
    guidance_scale: float = 5.0
    rewards: list[RewardSpec] = field(default_factory=default_rewards)
    pairing: Literal["best_worst", "all"] = "best_worst"
    margin: float = 0.0  # pairs whose combined rewards differ by <= margin are ties and dropped
    render_batch_size: int = 8  # images per denoising batch
    seed: int = 0

    def __post_init__(self):
        for name in ("n_candidates", "seeds_per_prompt", "steps", "max_new_tokens", "render_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_candidates < 2:
            raise ValueError(f"n_candidates={self.n_candidates} must be >= 2: a pair needs two rewrites")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing={self.pairing!r} must be 'best_worst' or 'all'")
        if self.margin < 0:
            raise ValueError(f"margin={self.margin} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        self.rewards = [RewardSpec(**r) if isinstance(r, dict) else r for r in self.rewards]
        if not self.rewards:
            raise ValueError("rewards is empty: name at least one reward head")
        keys = [r.key for r in self.rewards]
        if len(set(keys)) != len(keys):
            raise ValueError(f"rewards {keys} repeat a head: give the repeats a label")


def load_heads(rewards: list[RewardSpec], device: str = "cpu") -> dict[str, tuple]:
    """``{key: (head, weight, against)}`` for ``build_candidates`` / ``evaluate_rewriter``."""
    from diffpo.rewards import load

    return {r.key: (load(r.name, path=r.path, arch=r.arch, device=device), float(r.weight), r.against)
            for r in rewards}


def prompt_seeds(prompt: str, count: int, seed: int = 0) -> list[int]:
    """``count`` seeds fixed by the prompt text (not its position), so a resumed or reordered run
    renders every prompt on the same x_T as an uninterrupted one."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()[:8], "little")
    base = digest % (2**31 - 1_000_000)
    return [base + j for j in range(count)]


def check_heads(heads: dict[str, tuple]) -> None:
    for key, entry in heads.items():
        if not (isinstance(entry, tuple) and len(entry) == 3 and entry[2] in AGAINST):
            raise ValueError(f"heads[{key!r}] must be (head, weight, 'rewrite' | 'original'), got {entry!r}")


def score_renders(images: torch.Tensor, texts: list[str], originals: list[str], heads: dict[str, tuple]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per image: the combined reward sum_h w_h r_h and each head's score (N,). ``texts`` are the
    prompts the images were rendered from, ``originals`` the source prompts they rewrite."""
    components, combined = {}, torch.zeros(len(texts), dtype=torch.float64)
    for key, (head, weight, against) in heads.items():
        scores = head(images, list(originals if against == "original" else texts)).double()
        components[key] = scores
        combined = combined + weight * scores
    return combined, components


def render(pipeline, texts: list[str], seeds: list[int], steps: int, guidance_scale: float,
           batch_size: int) -> torch.Tensor:
    """Images of ``texts`` on ``seeds``. Rewrites longer than the text encoder's window are cut
    by the pipeline as usual; its per-batch truncation warning is silenced here (rewrites are
    long by design, and it would print every cut text)."""
    import logging

    from diffpo.eval.generate import generate

    pipeline_logger = logging.getLogger("diffusers.pipelines")
    level = pipeline_logger.level
    pipeline_logger.setLevel(logging.ERROR)
    try:
        return generate(pipeline, texts, seeds, steps, guidance_scale, batch_size=batch_size)
    finally:
        pipeline_logger.setLevel(level)


def _mean(values: torch.Tensor) -> float:
    return float(values.mean())  # NaN (a head without an opinion) stays NaN: such candidates are not paired


def read_candidates(path: str | Path, repair: bool = False) -> list[dict]:
    """The records of a candidates file. A last line cut short by a crash (no newline, not JSON)
    is dropped and, with ``repair``, cut from the file so that appending continues cleanly."""
    path = Path(path)
    if not path.exists():
        return []
    records, offset = [], 0
    lines = path.read_bytes().splitlines(keepends=True)
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                if n == len(lines) and not line.endswith(b"\n"):
                    if repair:
                        with open(path, "r+b") as handle:
                            handle.truncate(offset)
                    break
                raise ValueError(f"{path} line {n}: not valid JSON; delete the line (or the file) and rerun") from None
        offset += len(line)
    return records


def build_candidates(rewriter, template, prompts: list[str], pipeline, heads: dict[str, tuple], embedder,
                     out_path: str | Path, options: PairBuildOptions | None = None, progress: bool = True,
                     references: dict[str, str] | None = None) -> Path:
    """Sample, render and score K rewrites of every prompt into ``out_path`` (candidates.jsonl).

    ``rewriter`` is ``(model, tokenizer)``; ``heads`` maps a key to ``(head, weight, against)``
    (see ``load_heads``); ``embedder.encode(texts)`` gives L2-normalised embeddings. Prompts
    already in ``out_path`` are skipped, so a rerun after an interruption only does the rest.
    Each line: prompt, candidates, rewards (combined, mean over seeds), components (per head,
    mean over seeds), cos, original_reward, original_components, seeds.
    ``references`` maps a prompt to the text its faithfulness (``against="original"``) heads score
    against, e.g. the caption of the meaning a user's request stands for; default: the prompt.
    """
    from tqdm import tqdm

    from diffpo.prompt.lm import generate_rewrites

    options = options or PairBuildOptions()
    check_heads(heads)
    model, tokenizer = rewriter
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    for n, record in enumerate(read_candidates(out_path, repair=True), start=1):
        shape = (len(record.get("candidates", [])), len(record.get("seeds", [])), set(record.get("components", {})))
        if shape != (options.n_candidates, options.seeds_per_prompt, set(heads)):
            raise ValueError(f"{out_path} line {n} was built with other options (candidates, seeds or reward heads "
                             "differ): pass a new out_path or delete the file")
        done.add(record["prompt"])
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)  # one bar per prompt below, not one per denoising call
    k, s = options.n_candidates, options.seeds_per_prompt
    with open(out_path, "a", encoding="utf-8") as handle, \
            tqdm(total=len(todo), desc="candidates", disable=not progress) as bar:
        for prompt in todo:
            seeds = prompt_seeds(prompt, s, options.seed)
            # One call per prompt, seeded by the prompt: its rewrites do not depend on which other
            # prompts were batched with it, so resuming gives what an uninterrupted run gives.
            rewrites = generate_rewrites(model, tokenizer, [prompt], n=k, template=template,
                                         temperature=options.temperature, top_p=options.top_p,
                                         max_new_tokens=options.max_new_tokens, seed=seeds[0])[0]
            texts = [t for t in rewrites for _ in range(s)] + [prompt] * s  # the original renders last
            images = render(pipeline, texts, seeds * (k + 1), options.steps, options.guidance_scale,
                            options.render_batch_size)
            reference = (references or {}).get(prompt, prompt)
            combined, components = score_renders(images, texts, [reference] * len(texts), heads)
            combined = combined.view(k + 1, s)
            components = {key: v.view(k + 1, s) for key, v in components.items()}
            embeddings = embedder.encode([prompt, *rewrites])
            embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
            cos = (embeddings[1:] @ embeddings[0]).tolist()
            record = {"prompt": prompt, "candidates": list(rewrites),
                      "rewards": [_mean(r) for r in combined[:k]],
                      "components": {key: [_mean(r) for r in v[:k]] for key, v in components.items()},
                      "cos": [float(c) for c in cos],
                      "original_reward": _mean(combined[k]),
                      "original_components": {key: _mean(v[k]) for key, v in components.items()},
                      "seeds": seeds}
            handle.write(json.dumps(json_safe(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # a crash loses at most the prompt being worked on
            bar.update(1)
    return out_path


def json_safe(value):
    """NaN -> null: strict JSON readers reject NaN; ``make_pairs`` reads null as "no opinion"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def pairs_of(record: dict, pairing: str = "best_worst", margin: float = 0.0) -> list[dict]:
    """The pairs of one candidates record: best vs worst, or every two candidates, chosen = the
    higher combined reward; pairs within ``margin`` (ties), pairs of identical texts and
    candidates without a finite reward are dropped."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} must be 'best_worst' or 'all'")
    rewards = record["rewards"]
    usable = [i for i, r in enumerate(rewards) if r is not None and math.isfinite(r)]
    usable.sort(key=lambda i: -rewards[i])  # stable: equal rewards keep the sampling order
    if len(usable) < 2:
        return []
    candidates = [(usable[0], usable[-1])] if pairing == "best_worst" else list(combinations(usable, 2))
    components = record.get("components", {})
    out = []
    for w, l in candidates:
        if rewards[w] - rewards[l] <= margin or record["candidates"][w] == record["candidates"][l]:
            continue
        out.append({"prompt": record["prompt"], "chosen": record["candidates"][w], "rejected": record["candidates"][l],
                    "reward_chosen": rewards[w], "reward_rejected": rewards[l],
                    "cos_chosen": record["cos"][w], "cos_rejected": record["cos"][l],
                    "components_chosen": {h: v[w] for h, v in components.items()},
                    "components_rejected": {h: v[l] for h, v in components.items()}})
    return out


def make_pairs(candidates_path: str | Path, pairs_path: str | Path, pairing: str = "best_worst",
               margin: float = 0.0) -> int:
    """Write ``pairs.jsonl`` from ``candidates.jsonl``; returns the number of pairs. Rewritten
    whole (atomically) on every call: it is cheap and derived."""
    if margin < 0:
        raise ValueError(f"margin={margin} must be >= 0")
    records = read_candidates(candidates_path)
    if not records:
        raise ValueError(f"{candidates_path}: no candidates; run build_candidates first")
    pairs_path = Path(pairs_path)
    pairs_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pairs_path.with_name(pairs_path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            for pair in pairs_of(record, pairing, margin):
                handle.write(json.dumps(pair) + "\n")
                count += 1
    os.replace(tmp, pairs_path)
    return count


# --------------------------------------------------------------------------------------------
# Command line: `pairs` (the lead mounts it under `diffpo prompt`)
# --------------------------------------------------------------------------------------------


def parse_reward(text: str) -> RewardSpec:
    """``NAME[=WEIGHT][:rewrite|:original]``, e.g. ``aesthetic=1`` or ``clip=1:original``."""
    head, _, against = text.partition(":")
    name, _, weight = head.partition("=")
    try:
        return RewardSpec(name.strip(), float(weight) if weight else 1.0, (against or "rewrite").strip())
    except ValueError as error:
        raise ValueError(f"--reward {text!r}: {error}; write NAME[=WEIGHT][:rewrite|:original], "
                         "e.g. clip=1:original") from None


def load_pipeline(model: str, device: str = "cpu", dtype: str = "float32"):
    """A DDIM pipeline of the diffusion model ``model`` (hub id, local folder or ``tiny``)."""
    from diffpo.models.loading import load_stack

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} must be float32, float16 or bfloat16")
    return load_stack(model, dtype=getattr(torch, dtype), device=device).pipeline()
