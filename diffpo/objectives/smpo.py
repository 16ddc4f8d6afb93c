"""SmPO (Lu et al., *Smoothed Preference Optimization via ReNoise Inversion*, ICML 2025; official
code JaydenLyh/SmPO): Diffusion-DPO with soft labels from a reward head.

Soft label: r' = (r - low) / (high - low) (min-max normalised reward; the official PickScore
constants on raw cosine are low = 0.11543526500463486, high = 0.28201571106910706) and
p = exp(r'_w) / (exp(r'_w) + exp(r'_l)) = sigmoid(r'_w - r'_l).

Loss: -log sigma(-1/2 beta gamma (2p - 1) (dtheta - dref)) with gamma = 10 (the official scale),
dtheta = e_theta(w) - e_theta(l) and dref likewise (DESIGN.md's beta convention). Equal rewards
give p = 1/2: the loss is log 2 with no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PICKSCORE_LOW, PICKSCORE_HIGH = 0.11543526500463486, 0.28201571106910706


def soft_labels(reward_w: torch.Tensor, reward_l: torch.Tensor, low: float = PICKSCORE_LOW,
                high: float = PICKSCORE_HIGH) -> torch.Tensor:
    """p (B,): the probability that w is preferred, from min-max normalised rewards."""
    if high <= low:
        raise ValueError(f"reward normalisation needs high > low, got low={low}, high={high}")
    scale = high - low
    return torch.sigmoid((reward_w.double() - reward_l.double()) / scale).float()


def smpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
              p: torch.Tensor, beta: float, gamma: float = 10.0) -> tuple[torch.Tensor, dict]:
    """Per-pair SmPO loss (B,) and detached metrics."""
    if beta <= 0 or gamma <= 0:
        raise ValueError(f"beta={beta} and gamma={gamma} must be > 0")
    delta = (policy_w - policy_l) - (ref_w - ref_l)
    logits = -0.5 * beta * gamma * (2 * p.to(delta) - 1) * delta
    loss = -F.logsigmoid(logits)
    with torch.no_grad():
        metrics = {"implicit_acc": ((logits > 0).float() + 0.5 * (logits == 0).float()).mean(),
                   "soft_label": p.float().mean(), "margin": (-0.5 * delta).mean(),
                   # per term against the reference: both rising together is what the loss leaves free
                   "diff_w": (policy_w - ref_w).mean(), "diff_l": (policy_l - ref_l).mean()}
    return loss, metrics
