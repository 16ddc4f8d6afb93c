"""DiffusionNFT (Zheng et al., *DiffusionNFT: Online Diffusion Reinforcement with Forward Process*,
ICLR 2026; official code NVlabs/DiffusionNFT): reinforcement on the *forward* process. No
log-probabilities, no trajectories, any sampler (deterministic ODE included), no CFG needed.

The policy that sampled the round (v_old) generated clean samples x_0 with rewards; each reward
becomes an optimality probability r in [0, 1] from the clipped normalised advantage A:

    r = clip(A, -c, c) / (2c) + 1/2                                    (official: adv_clip_max c = 5)

A clean sample is noised afresh with the model's own forward process, x_t = a_t x_0 + b_t eps
(rectified flow: (1 - sigma) x_0 + sigma eps), with target v (the velocity eps - x_0, or the
noise / v target of a DDPM model). With the trained prediction v_theta and the frozen v_old at x_t,
the implicit positive and negative policies are

    v+ = (1 - beta) v_old + beta v_theta,     v- = (1 + beta) v_old - beta v_theta      (paper, Eq. 7)

and the loss pulls v+ toward the target on good samples and v- on bad ones (paper, Eq. 8):

    L = [ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ] / beta

(||.||^2 the shared kernel's per-sample error, the mean over latent dims; the 1/beta keeps the
gradient's size independent of beta, as the official code divides). Since v+ - v_old = beta
(v_theta - v_old) = -(v- - v_old), minimising it moves v_theta toward the good samples' targets and
away from the bad ones', by an amount bounded by the trust region beta. An optional
``kl_coef`` x ||v_theta - v_ref||^2 keeps the policy near the base model (official: 1e-4 or 0).
"""

from __future__ import annotations

import torch

from diffpo.kernel.denoising import per_sample_error


def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = clip(A, -c, c) / (2c) + 1/2, in [0, 1]."""
    if adv_clip <= 0:
        raise ValueError(f"adv_clip={adv_clip} must be > 0")
    return (advantages.float().clamp(-adv_clip, adv_clip) / (2 * adv_clip) + 0.5).clamp(0.0, 1.0)


def nft_loss(prediction: torch.Tensor, old_prediction: torch.Tensor, target: torch.Tensor, r: torch.Tensor,
             beta: float = 1.0, ref_prediction: torch.Tensor | None = None, kl_coef: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample DiffusionNFT loss (B,) and detached metrics. ``old_prediction`` is the sampling
    policy's (no gradient); ``ref_prediction`` the base model's, used when ``kl_coef`` > 0."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    old = old_prediction.detach().float()
    theta = prediction.float()
    positive = (1 - beta) * old + beta * theta
    negative = (1 + beta) * old - beta * theta
    r = r.float().to(theta.device)
    error_pos, error_neg = per_sample_error(target, positive), per_sample_error(target, negative)
    loss = (r * error_pos + (1 - r) * error_neg) / beta
    kl = per_sample_error(ref_prediction.detach().float(), theta) if ref_prediction is not None else None
    if kl is not None and kl_coef:
        loss = loss + kl_coef * kl
    with torch.no_grad():
        metrics = {"positive_error": error_pos.mean(), "negative_error": error_neg.mean(), "r": r.mean(),
                   "old_deviation": per_sample_error(old, theta.detach()).mean()}
        if kl is not None:
            metrics["kl"] = kl.mean()
    return loss, metrics
