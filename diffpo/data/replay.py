"""The replay buffer of Diffusion-DRO's online negatives: the last ``capacity`` trajectories of the
lagged policy, each stored with the expert latent and the text conditioning of its caption.

Per trajectory (first dim N): ``timesteps`` (N, T), ``latents`` (N, T, ...) the latent the lagged
model saw at each step, ``predictions`` (N, T, ...) what it predicted there, ``expert`` (N, ...)
the caption's expert latent, ``hidden`` (N, L, D) and optionally ``pooled`` (N, P) text states.
A draw picks rows (without replacement while the buffer holds enough) and one step per row.
Tensors live on the CPU; a draw is moved to the training device by the caller.
"""

from __future__ import annotations

import torch

STEP_KEYS = ("timesteps", "latents", "predictions")  # indexed by (row, step)
ROW_KEYS = ("expert", "hidden", "pooled")  # indexed by row


class ReplayBuffer:
    """First in, first out over whole trajectories."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity={capacity} must be >= 1")
        self.capacity = capacity
        self.tensors: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self.tensors else self.tensors["timesteps"].shape[0]

    def add(self, **tensors: torch.Tensor | None) -> None:
        """Append N trajectories (keys of ``STEP_KEYS`` and ``ROW_KEYS``; ``pooled`` may be None)
        and drop the oldest beyond ``capacity``."""
        given = {k: v.detach().cpu() for k, v in tensors.items() if v is not None}
        missing = {"timesteps", "latents", "predictions", "expert", "hidden"} - given.keys()
        unknown = given.keys() - {*STEP_KEYS, *ROW_KEYS}
        if missing or unknown:
            raise ValueError(f"replay buffer entries need {sorted(missing)} and know no {sorted(unknown)}")
        rows = {v.shape[0] for v in given.values()}
        steps = {given[k].shape[1] for k in STEP_KEYS}
        if len(rows) != 1 or len(steps) != 1:
            raise ValueError(f"replay buffer entries disagree on trajectories {sorted(rows)} or steps {sorted(steps)}")
        if self.tensors and given.keys() != self.tensors.keys():
            raise ValueError(f"replay buffer holds {sorted(self.tensors)}, got {sorted(given)}")
        for key, value in given.items():
            joined = torch.cat([self.tensors[key], value]) if key in self.tensors else value
            self.tensors[key] = joined[-self.capacity:]

    def sample(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``batch`` (row, step) draws: rows without replacement when the buffer holds enough of
        them, with replacement otherwise; one uniformly drawn step per row."""
        n = len(self)
        if n == 0:
            raise ValueError("the replay buffer is empty: add trajectories before sampling")
        rows = torch.randperm(n, generator=generator)[:batch] if batch <= n else torch.randint(0, n, (batch,), generator=generator)
        steps = torch.randint(0, self.tensors["timesteps"].shape[1], (batch,), generator=generator)
        drawn = {key: self.tensors[key][rows, steps] for key in STEP_KEYS}
        drawn.update({key: self.tensors[key][rows] for key in ROW_KEYS if key in self.tensors})
        drawn["rows"], drawn["steps"] = rows, steps
        return drawn

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored tensors (contiguous, for safetensors); ``load_state_dict`` restores them."""
        return {k: v.contiguous() for k, v in self.tensors.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = {}
        if tensors:
            self.add(**tensors)
