"""A pool of past policy checkpoints to draw SePPO references from (entry 0 is the base model)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

STRATEGIES = ("uniform", "first", "latest")


class CheckpointPool:
    """Holds snapshots (e.g. LoRA state dicts on the CPU) and draws one per iteration.

    ``uniform`` (SePPO's default): any entry with equal probability; ``first``: always the base
    model; ``latest``: the most recent snapshot (the paper's ablations)."""

    def __init__(self, base: Any, strategy: str = "uniform"):
        if strategy not in STRATEGIES:
            raise ValueError(f"pool strategy {strategy!r} is unknown: use one of {', '.join(STRATEGIES)}")
        self.entries, self.strategy = [base], strategy

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, snapshot: Any) -> None:
        self.entries.append(snapshot)

    def draw_index(self, generator: torch.Generator) -> int:
        if self.strategy == "first":
            return 0
        if self.strategy == "latest":
            return len(self.entries) - 1
        return int(torch.randint(0, len(self.entries), (1,), generator=generator))

    def draw(self, generator: torch.Generator) -> Any:
        return self.entries[self.draw_index(generator)]


POOL_INDEX = "pool.json"


def save_pool_entry(folder: Path, index: int, step: int, snapshot: dict) -> None:
    """Write snapshot ``index`` (taken after optimizer step ``step``) so that a resumed run gets its
    pool back; the index file is rewritten last and atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(snapshot, str(folder / f"entry-{index:04d}.safetensors"))
    entries = json.loads((folder / POOL_INDEX).read_text()) if (folder / POOL_INDEX).is_file() else []
    entries = [e for e in entries if e["index"] < index] + [{"index": index, "step": step}]
    tmp = folder / (POOL_INDEX + ".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, folder / POOL_INDEX)


def load_pool(folder: Path, strategy: str, upto_step: int) -> "CheckpointPool":
    """The pool as it was after optimizer step ``upto_step`` (entry 0, the base model, is None)."""
    from safetensors.torch import load_file

    pool = CheckpointPool(None, strategy)
    if (folder / POOL_INDEX).is_file():
        for entry in sorted(json.loads((folder / POOL_INDEX).read_text()), key=lambda e: e["index"]):
            if entry["step"] <= upto_step:
                pool.add(load_file(str(folder / f"entry-{entry['index']:04d}.safetensors")))
    return pool
