"""SePPO (Zhang et al., *SePPO: Semi-Policy Preference Optimization for Diffusion Alignment*, 2024).

Only winners x_w are given; a reference drawn from a pool of past checkpoints generates x_r for the
same prompt. With per-sample errors at shared noise and timestep,
sigma_w = e_theta(x_w) - e_ref(x_w) and sigma_r = e_theta(x_r) - e_ref(x_r), the anchor-based
adaptive flip (AAF) is

* sigma_w < 0 (the policy already denoises the winner better than the reference): x_r is a loser,
  loss = -log sigma(-beta/2 (sigma_w - sigma_r));
* otherwise both are pulled toward the policy: loss = -log sigma(-beta/2 (sigma_w + sigma_r)).

The sign rule is diffpo's reading of the paper (its public repo has no training code); it lives
only in ``aaf_loss`` so that it can be changed in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def aaf_loss(policy_err_w, ref_err_w, policy_err_r, ref_err_r, beta: float = 5000.0,
             adaptive_flip: bool = True) -> tuple[torch.Tensor, dict]:
    """Per-pair SePPO loss (B,) and metrics, including ``flip_rate`` (share of pairs in the second case).
    ``adaptive_flip=False`` keeps every pair in the first case (x_r always the loser: SePPO without AAF)."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    sigma_w = policy_err_w - ref_err_w
    sigma_r = policy_err_r - ref_err_r
    anchor_ok = sigma_w.detach() < 0  # the branch is a decision, not something to differentiate
    if not adaptive_flip:
        anchor_ok = torch.ones_like(anchor_ok)
    inner = torch.where(anchor_ok, sigma_w - sigma_r, sigma_w + sigma_r)
    loss = -F.logsigmoid(-0.5 * beta * inner)
    with torch.no_grad():
        metrics = {"flip_rate": (~anchor_ok).float().mean(), "sigma_w": sigma_w.mean(), "sigma_r": sigma_r.mean()}
    return loss, metrics
