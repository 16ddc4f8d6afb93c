"""D3PO (Yang et al., *Using Human Feedback to Fine-tune Diffusion Models without Any Reward
Model*, CVPR 2024; official code yk7333/d3po): DPO applied to every step of sampled DDIM
trajectories, the two trajectories of a pair sharing the prompt and x_T.

Per step i: r_i = clamp(exp(log p_theta,i - log p_ref,i), 1 - eps, 1 + eps) and
loss_i = -log sigma(beta * (log r_i(w) - log r_i(l))), beta = 0.1, eps = 0.1 (paper, Eq. 9 with
the PPO-style clip of the official code). Ties give no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def d3po_step_loss(
    logp_policy_w: torch.Tensor,
    logp_ref_w: torch.Tensor,
    logp_policy_l: torch.Tensor,
    logp_ref_l: torch.Tensor,
    tie: torch.Tensor | None = None,
    beta: float = 0.1,
    clip: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss (B,) of one denoising step and detached metrics; tied pairs get loss 0 and no gradient."""
    if beta <= 0 or not 0 < clip < 1:
        raise ValueError(f"beta={beta} must be > 0 and clip={clip} in (0, 1)")
    # log(clamp(exp(d), 1 - clip, 1 + clip)) == clamp(d, log(1 - clip), log(1 + clip)), but the
    # latter never forms exp(d): a saturated exp(d) = inf would turn the zero gradient of the
    # clamp into 0 * inf = NaN and poison the weights
    low, high = math.log1p(-clip), math.log1p(clip)
    log_ratio_w = torch.clamp(logp_policy_w - logp_ref_w, low, high)
    log_ratio_l = torch.clamp(logp_policy_l - logp_ref_l, low, high)
    logits = beta * (log_ratio_w - log_ratio_l)
    loss = -F.logsigmoid(logits)
    if tie is not None:
        loss = torch.where(tie.to(loss.device, torch.bool), torch.zeros_like(loss), loss)
    with torch.no_grad():
        clipped = ((logp_policy_w - logp_ref_w > high) | (logp_policy_w - logp_ref_w < low)).float()
        metrics = {"implicit_acc": ((logits > 0).float() + 0.5 * (logits == 0).float()).mean(),
                   "clip_fraction": clipped.mean(), "log_ratio_w": log_ratio_w.mean(), "log_ratio_l": log_ratio_l.mean()}
    return loss, metrics
