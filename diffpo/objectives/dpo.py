"""Diffusion-DPO (Wallace et al., CVPR 2024) and its hinge / IPO variants.

With Δθ = e_θ(w) − e_θ(l) and Δref = e_ref(w) − e_ref(l) (per-sample errors of the shared kernel),
the implicit reward margin is h = −½(Δθ − Δref), and the DESIGN.md convention (the original
Diffusion-DPO code) is z = β·h. The diffusers research example writes −½β·2(...), i.e. its β is
half of ours: β_diffpo = 2·β_diffusers_example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_NAMES = ("dpo", "hinge", "ipo")


def implicit_margin(policy_err_w: torch.Tensor, policy_err_l: torch.Tensor, ref_err_w: torch.Tensor | None,
                    ref_err_l: torch.Tensor | None) -> torch.Tensor:
    """h = −½(Δθ − Δref) per pair (B,); no reference (reference-free objectives) means Δref = 0."""
    policy_gap = policy_err_w - policy_err_l
    ref_gap = 0.0 if ref_err_w is None else ref_err_w - ref_err_l
    return -0.5 * (policy_gap - ref_gap)


@torch.no_grad()
def pair_metrics(logits: torch.Tensor, margin: torch.Tensor, policy_err_w: torch.Tensor, policy_err_l: torch.Tensor,
                 ref_err_w: torch.Tensor | None = None, ref_err_l: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The detached metrics every DPO-family loss logs (reference entries only when there is one)."""
    # A pair counts as right when the policy moved towards the winner more than the reference;
    # an exact tie (as at initialisation) counts one half.
    correct = (logits > 0).float() + 0.5 * (logits == 0).float()
    metrics = {
        "implicit_acc": correct.mean(),
        "margin": margin.mean(),
        "policy_gap": (policy_err_w - policy_err_l).mean(),
        "policy_err_w": policy_err_w.mean(),
        "policy_err_l": policy_err_l.mean(),
    }
    if ref_err_w is not None:
        metrics.update(ref_gap=(ref_err_w - ref_err_l).mean(), ref_err_w=ref_err_w.mean(), ref_err_l=ref_err_l.mean())
    return metrics


def diffusion_dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 5000.0,
    name: str = "dpo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss (B,) and detached metrics.

    * ``dpo``   — Diffusion-DPO Eq. 14: −log σ(β·h), h = −½(Δθ − Δref).
    * ``hinge`` — SLiC-HF (Zhao et al. 2023) on the same margin: max(0, 1 − β·h).
    * ``ipo``   — IPO (Azar et al. 2024, Eq. 17): (h − 1/(2β))², β acting as IPO's τ.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0: pass a positive objective.beta")
    margin = implicit_margin(policy_err_w, policy_err_l, ref_err_w, ref_err_l)
    logits = beta * margin
    if name == "dpo":
        loss = -F.logsigmoid(logits)
    elif name == "hinge":
        loss = torch.relu(1.0 - logits)
    elif name == "ipo":
        loss = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"objective name {name!r} is not a diffusion_dpo_loss form: use 'dpo', 'hinge' or 'ipo'")
    return loss, pair_metrics(logits, margin, policy_err_w, policy_err_l, ref_err_w, ref_err_l)


def sft_loss(policy_err_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on the preferred images only: the plain denoising loss e_θ(w)."""
    return policy_err_w, {"policy_err_w": policy_err_w.detach().mean()}
