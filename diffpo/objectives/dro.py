"""Diffusion-DRO (Wu et al., *Ranking-based Preference Optimization for Diffusion Models from Implicit
User Feedback*, NeurIPS 2025; official code basiclab/DiffusionDRO).

No pairs: an expert image x (noised afresh at timestep t) and an online negative (x_t, t) taken from
a trajectory of the lagged policy, whose own prediction there is the negative's target. With
per-sample errors e, d_exp = e_theta(exp) - e_ref(exp) and d_neg = e_theta(neg) - e_ref(neg),
the ranking (hinge) loss is

    loss = max(0, d_exp - d_neg + m),  m = 0.001,

so the policy must denoise experts better, relative to the reference, than it reproduces its own
lagged samples. While policy, reference and lagged copy coincide both differences are 0 and the loss
is exactly m.
"""

from __future__ import annotations

import torch


def dro_loss(policy_err_expert, ref_err_expert, policy_err_negative, ref_err_negative,
             margin: float = 0.001) -> tuple[torch.Tensor, dict]:
    """Per-sample Diffusion-DRO hinge loss (B,) and metrics (``active``: share with non-zero loss)."""
    if margin < 0:
        raise ValueError(f"margin={margin} must be >= 0")
    expert_diff = policy_err_expert - ref_err_expert
    negative_diff = policy_err_negative - ref_err_negative
    diff = expert_diff - negative_diff
    loss = torch.clamp(diff + margin, min=0.0)
    with torch.no_grad():
        metrics = {"diff": diff.mean(), "expert_diff": expert_diff.mean(), "negative_diff": negative_diff.mean(),
                   "expert_err": policy_err_expert.mean(), "negative_err": policy_err_negative.mean(),
                   "active": (diff + margin > 0).float().mean()}
    return loss, metrics
