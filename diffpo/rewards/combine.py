"""Several rewards for online RL (GRPO, DiffusionNFT), and a guard against reward hacking.

* ``group_normalise``: a reward's scores standardised within each prompt's group of G samples,
  A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps) (Flow-GRPO, Liu et al. 2025, Eq. 4; DanceGRPO);
  with ``global_std`` the denominator is the std over every sample of the round (Flow-GRPO's
  ``global_std`` option: groups whose samples all score alike then get small advantages instead
  of amplified noise).
* ``combine``: A = sum_k w_k · group_normalise(r_k): each reward is normalised *before* the
  weighted sum, so a reward in kB and a reward in [0, 1] weigh what their weights say, not what
  their units say. Every reward's raw scores stay available and are logged separately.
* ``RewardSet``: the trained heads with their weights and the *gold* heads, scored on every sample
  and never trained on: a held-out judge of whether the trained reward still means what it should.
* ``HackingGuard``: stops a run when the gold reward falls while the trained reward rises
  (Gao et al., *Scaling Laws for Reward Model Overoptimization*, 2023: the proxy keeps rising
  while the gold score turns down).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STD_EPS = 1e-4  # Flow-GRPO's PerPromptStatTracker: std + 1e-4


def group_normalise(scores: torch.Tensor, global_std: bool = False, eps: float = STD_EPS) -> torch.Tensor:
    """(P, G) scores of P prompts x G samples -> advantages (P, G): minus the group mean, over the
    group's std (population std, as numpy's) or with ``global_std`` the std of all P·G scores."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"group scores must be (prompts, samples >= 2), got {tuple(scores.shape)}")
    scores = scores.double()
    centred = scores - scores.mean(dim=1, keepdim=True)
    std = scores.std(correction=0) if global_std else scores.std(dim=1, keepdim=True, correction=0)
    return (centred / (std + eps)).float()


def combine(scores: dict[str, torch.Tensor], weights: dict[str, float], global_std: bool = False) -> torch.Tensor:
    """Advantages (P, G) = sum_k w_k · group_normalise(scores[k]) over the trained rewards ``weights`` names."""
    missing = [name for name in weights if name not in scores]
    if missing:
        raise ValueError(f"no scores for reward {missing[0]!r}; scored: {', '.join(scores)}")
    total = None
    for name, weight in weights.items():
        term = weight * group_normalise(scores[name], global_std)
        total = term if total is None else total + term
    return total


def reward_stats(scores: dict[str, torch.Tensor], prefix: str = "reward") -> dict[str, float]:
    """Mean and std of every reward's raw scores (``reward/NAME``, ``reward/NAME_std``), NaNs ignored."""
    stats = {}
    for name, values in scores.items():
        values = values.double().flatten()
        values = values[~values.isnan()]
        stats[f"{prefix}/{name}"] = float(values.mean()) if values.numel() else float("nan")
        stats[f"{prefix}/{name}_std"] = float(values.std(correction=0)) if values.numel() else float("nan")
    return stats


@dataclass
class RewardSet:
    """Trained heads (``weights``: name -> weight) and gold heads (logged, never trained on)."""

    heads: dict  # name -> RewardHead, trained and gold alike
    weights: dict[str, float]
    gold: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, names: list[str], weights: list[float] | None, gold: list[str], options: dict | None = None) -> "RewardSet":
        from diffpo.rewards import load as load_reward

        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} reward weights for {len(names)} rewards: give one weight per reward")
        overlap = sorted(set(names) & set(gold))
        if overlap:
            raise ValueError(f"reward {overlap[0]!r} is both trained and gold: a gold reward is one the run never trains on")
        options = options or {}
        heads = {name: load_reward(name, **options.get(name, {})) for name in dict.fromkeys([*names, *gold])}
        return cls(heads, dict(zip(names, weights)), list(gold))

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Raw scores (B,) of every head, trained and gold; a NaN from a trained head is an error."""
        scores = {name: head(images, prompts).float() for name, head in self.heads.items()}
        for name in self.weights:
            if scores[name].isnan().any():
                bad = prompts[int(scores[name].isnan().nonzero()[0])]
                raise ValueError(f"reward {name!r} scored NaN (prompt {bad!r}): a trained reward must score every "
                                 "prompt (colour-match scores only shape captions)")
        return scores

    def trained_mean(self, scores: dict[str, torch.Tensor]) -> float:
        """The weighted mean raw score of the trained rewards (what the guard sees rising)."""
        return float(sum(w * scores[name].double().mean() for name, w in self.weights.items()))

    def gold_mean(self, scores: dict[str, torch.Tensor]) -> float | None:
        if not self.gold:
            return None
        return float(sum(scores[name].double().nanmean() for name in self.gold) / len(self.gold))


class RewardHackingStop(RuntimeError):
    """The gold reward fell while the trained reward rose for ``patience`` rounds."""


@dataclass
class HackingGuard:
    """Watch (trained, gold) round means; ``update`` returns a message once the gold mean has stayed
    more than ``tolerance`` below its best while the trained mean stayed above its value at that
    best, for ``patience`` rounds in a row (0: never stop, only log). Its state is plain floats, kept
    in the checkpoint's trainer state, so a resumed run continues the count."""

    tolerance: float = 0.0
    patience: int = 0
    best_gold: float | None = None
    trained_at_best: float | None = None
    strikes: int = 0

    def update(self, trained: float, gold: float | None) -> tuple[dict[str, float], str | None]:
        if gold is None:
            return {}, None
        if self.best_gold is None or gold >= self.best_gold:
            self.best_gold, self.trained_at_best, self.strikes = gold, trained, 0
        elif self.best_gold - gold > self.tolerance and trained > self.trained_at_best:
            self.strikes += 1
        else:
            self.strikes = 0
        metrics = {"gold_drop": self.best_gold - gold, "hacking_strikes": float(self.strikes)}
        if self.patience and self.strikes >= self.patience:
            return metrics, (f"reward hacking: the gold reward fell from {self.best_gold:.4g} to {gold:.4g} (more than "
                             f"online.hacking_tolerance={self.tolerance}) while the trained reward rose from "
                             f"{self.trained_at_best:.4g} to {trained:.4g}, {self.strikes} rounds in a row")
        return metrics, None

    def state(self) -> dict:
        return {"guard_best_gold": self.best_gold, "guard_trained_at_best": self.trained_at_best,
                "guard_strikes": self.strikes}

    def load(self, state: dict) -> None:
        self.best_gold = state.get("guard_best_gold")
        self.trained_at_best = state.get("guard_trained_at_best")
        self.strikes = int(state.get("guard_strikes", 0))
