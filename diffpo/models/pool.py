"""A pool of past policy checkpoints to draw SePPO references from (entry 0 is the base model)."""

from __future__ import annotations

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
