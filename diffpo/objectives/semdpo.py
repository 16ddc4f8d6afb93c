"""Sem-DPO (Mohamed et al., 2025): DPO on a prompt rewriter's sequence log-probabilities, each pair
weighted by how well the chosen rewrite keeps the source prompt's meaning.

    L = W · (−log σ(β · ((log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)))))
    W = exp(−α (1 − cos(e(x), e(y_w))))     (diffpo.prompt.semantic.semantic_weights)

α = 0 is plain DPO (Rafailov et al. 2023, Eq. 7). The margin is computed by diffpo's one DPO
function, diffusion_dpo_loss, with errors = −log p: its −½β_d(Δθ − Δref) equals β(Δlogπ − Δlogπ_ref)
for β_d = 2β.
"""

from __future__ import annotations

import torch

from diffpo.objectives.dpo import diffusion_dpo_loss


def semdpo_loss(
    policy_logp_w: torch.Tensor,
    policy_logp_l: torch.Tensor,
    ref_logp_w: torch.Tensor,
    ref_logp_l: torch.Tensor,
    weights: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair Sem-DPO loss (B,) and detached metrics; exactly log 2 when the policy is the reference."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    loss, inner = diffusion_dpo_loss(-policy_logp_w, -policy_logp_l, -ref_logp_w, -ref_logp_l,
                                     beta=2.0 * beta, name="dpo")
    weights = weights.to(loss.dtype)
    with torch.no_grad():
        chosen = beta * (policy_logp_w - ref_logp_w)  # DPO's implicit rewards r = β log(π/π_ref)
        rejected = beta * (policy_logp_l - ref_logp_l)
        metrics = {
            "acc": inner["implicit_acc"],
            "dpo_loss": loss.mean(),  # unweighted: exactly log 2 at initialisation whatever the weights
            "weight_mean": weights.mean(),
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(),
            "logp_chosen": policy_logp_w.mean(),
            "logp_rejected": policy_logp_l.mean(),
        }
    return weights * loss, metrics
