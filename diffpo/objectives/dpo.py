"""Diffusion-DPO (Wallace et al., CVPR 2024) and its hinge / IPO variants.

With Δθ = e_θ(w) − e_θ(l) and Δref = e_ref(w) − e_ref(l) (per-sample errors of the shared kernel),
the implicit reward margin is h = −½(Δθ − Δref), and the DESIGN.md convention (the original
Diffusion-DPO code) is z = β·h. The diffusers research example writes −½β·2(...), i.e. its β is
half of ours: β_diffpo = 2·β_diffusers_example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss (B,) and detached metrics.

    * ``sigmoid`` — Diffusion-DPO Eq. 14: −log σ(β·h), h = −½(Δθ − Δref).
    * ``hinge``   — SLiC-HF (Zhao et al. 2023) on the same margin: max(0, 1 − β·h).
    * ``ipo``     — IPO (Azar et al. 2024, Eq. 17): (h − 1/(2β))², β acting as IPO's τ.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    policy_gap = policy_err_w - policy_err_l
    ref_gap = ref_err_w - ref_err_l
    margin = -0.5 * (policy_gap - ref_gap)
    logits = beta * margin
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(logits)
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - logits)
    elif loss_type == "ipo":
        loss = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r} is unknown: use 'sigmoid', 'hinge' or 'ipo'")
    with torch.no_grad():
        # A pair counts as right when the policy moved towards the winner more than the reference;
        # an exact tie (as at initialisation) counts one half.
        correct = (logits > 0).float() + 0.5 * (logits == 0).float()
        metrics = {
            "implicit_acc": correct.mean(),
            "margin": margin.mean(),
            "policy_gap": policy_gap.mean(),
            "ref_gap": ref_gap.mean(),
            "policy_err_w": policy_err_w.mean(),
            "policy_err_l": policy_err_l.mean(),
            "ref_err_w": ref_err_w.mean(),
            "ref_err_l": ref_err_l.mean(),
        }
    return loss, metrics


def sft_loss(policy_err_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on the preferred images only: the plain denoising loss e_θ(w)."""
    return policy_err_w, {"policy_err_w": policy_err_w.detach().mean()}
