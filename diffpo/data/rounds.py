"""Sampling rounds of the online trainer on disk, and the human labels that come back for them.

A round is a folder ``RUN_DIR/rounds/round-NNNN/`` holding

* ``round.json``: the prompts, ``samples_per_prompt`` images per prompt (the images of one prompt
  share x_T), the image files, and the pairs to judge as ``[group, a, b]`` (all pairs within a group);
* ``images/gGGGG-sS.png``: the decoded samples;
* ``trajectories-pP.safetensors`` (per process P): what training re-scores (latents per step,
  timesteps, log-probs, prompts), written with ``diffpo.serialization.save_state_file`` (no pickle);
* ``labels.jsonl``: one JSON object per judgement, ``{"group", "a", "b", "choice", "time"}`` with
  ``choice`` one of ``"a"``, ``"b"``, ``"tie"``. Appended and fsynced line by line, so closing the
  labelling page (or killing its server) midway loses nothing; a later line for the same pair wins.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

ROUNDS_DIR = "rounds"
MANIFEST = "round.json"
LABELS = "labels.jsonl"
CHOICES = ("a", "b", "tie")


@dataclass
class RoundManifest:
    folder: Path
    index: int
    prompts: list[str]
    samples_per_prompt: int
    images: list[list[str]]  # per group, file names relative to the round folder
    pairs: list[tuple[int, int, int]]  # (group, a, b)

    def image_path(self, group: int, sample: int) -> Path:
        return self.folder / self.images[group][sample]


def round_dir(run_dir: str | Path, index: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / f"round-{index:04d}"


def list_rounds(run_dir: str | Path) -> list[Path]:
    """Round folders that have a manifest, oldest first."""
    root = Path(run_dir) / ROUNDS_DIR
    return sorted(p for p in root.glob("round-*") if (p / MANIFEST).is_file()) if root.is_dir() else []


def all_pairs(groups: int, samples_per_prompt: int) -> list[tuple[int, int, int]]:
    return [(g, a, b) for g in range(groups) for a, b in combinations(range(samples_per_prompt), 2)]


def write_manifest(folder: Path, index: int, prompts: list[str], samples_per_prompt: int, images: list[list[str]]) -> RoundManifest:
    """Write ``round.json`` last and atomically: a folder with a manifest is a complete round."""
    manifest = RoundManifest(folder, index, list(prompts), samples_per_prompt, images, all_pairs(len(prompts), samples_per_prompt))
    data = {"round": index, "prompts": manifest.prompts, "samples_per_prompt": samples_per_prompt,
            "images": images, "pairs": [list(p) for p in manifest.pairs]}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: str | Path) -> RoundManifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a sampling round (no {MANIFEST}): pass RUN_DIR/rounds/round-NNNN")
    data = json.loads(path.read_text())
    return RoundManifest(folder, int(data["round"]), list(data["prompts"]), int(data["samples_per_prompt"]),
                         [list(g) for g in data["images"]], [tuple(p) for p in data["pairs"]])


def append_label(folder: str | Path, group: int, a: int, b: int, choice: str) -> dict:
    """Record one judgement durably (flush + fsync before returning)."""
    if choice not in CHOICES:
        raise ValueError(f"choice {choice!r} must be one of {', '.join(CHOICES)}")
    record = {"group": int(group), "a": int(a), "b": int(b), "choice": choice, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with (Path(folder) / LABELS).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return record


def read_labels(folder: str | Path) -> dict[tuple[int, int, int], str]:
    """{(group, a, b): choice}; the last judgement of a pair wins. A torn last line (the writer was
    killed mid-line) is ignored; a malformed line elsewhere is an error naming it."""
    path = Path(folder) / LABELS
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    labels = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key, choice = (int(record["group"]), int(record["a"]), int(record["b"])), record["choice"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                continue
            raise ValueError(f"{path} line {number} is not a label object "
                             '{"group", "a", "b", "choice"}: fix or delete that line') from None
        if choice not in CHOICES:
            raise ValueError(f"{path} line {number}: choice {choice!r} must be one of {', '.join(CHOICES)}")
        labels[key] = choice
    return labels


def pending_pairs(manifest: RoundManifest, labels: dict) -> list[tuple[int, int, int]]:
    return [p for p in manifest.pairs if p not in labels]


def labelled_preferences(manifest: RoundManifest, labels: dict) -> list[tuple[int, int, int, bool]]:
    """(group, winner, loser, tie) for every judged pair of the round."""
    unknown = [k for k in labels if k not in set(manifest.pairs)]
    if unknown:
        raise ValueError(f"{manifest.folder / LABELS} names pairs {unknown[:3]} that round {manifest.index} does not have")
    out = []
    for (g, a, b), choice in labels.items():
        winner, loser = (a, b) if choice in ("a", "tie") else (b, a)
        out.append((g, winner, loser, choice == "tie"))
    return out
