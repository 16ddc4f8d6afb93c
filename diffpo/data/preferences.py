"""Preferences between samples of one prompt from reward heads: one head ranks, several heads
give Pareto dominance (D3PO, Yang et al. 2024, uses reward rankings as a stand-in for humans)."""

from __future__ import annotations

import torch


def pareto_preference(scores_a: torch.Tensor, scores_b: torch.Tensor, margin: float = 0.0) -> int:
    """+1 if a dominates b, -1 if b dominates a, 0 (a tie) otherwise.

    ``scores_*`` hold one score per head (higher is better). A head counts a sample as better
    only when it leads by more than ``margin``; a dominates b when it is better on at least one
    head and worse on none."""
    diff = scores_a.double() - scores_b.double()
    a_better, b_better = bool((diff > margin).any()), bool((diff < -margin).any())
    if a_better and not b_better:
        return 1
    if b_better and not a_better:
        return -1
    return 0


def reward_preferences(scores: torch.Tensor, pairs: list[tuple[int, int, int]], samples_per_prompt: int,
                       margin: float = 0.0) -> list[tuple[int, int, int, bool]]:
    """(group, winner, loser, tie) for each (group, a, b) pair; ``scores`` is (heads, samples) with
    sample ``group * samples_per_prompt + i`` the i-th image of a group."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (heads, samples), got shape {tuple(scores.shape)}")
    out = []
    for group, a, b in pairs:
        ia, ib = group * samples_per_prompt + a, group * samples_per_prompt + b
        sign = pareto_preference(scores[:, ia], scores[:, ib], margin)
        winner, loser = (b, a) if sign < 0 else (a, b)
        out.append((group, winner, loser, sign == 0))
    return out
