"""Objective variants from the preference-optimization literature on the Diffusion-DPO margin.

Every variant reuses DESIGN.md's convention: per-pair margin h = −½(Δθ − Δref) with
Δθ = e_θ(w) − e_θ(l), Δref = e_ref(w) − e_ref(l), logit z = β·h and ℓ(z) = −log σ(z) (the DPO
logistic loss). Each function returns the per-pair loss (B,) and detached metrics, like
``diffusion_dpo_loss``; ``OBJECTIVES`` maps ``objective.name`` to the one the offline loop calls.
See docs/objective_variants.md for papers, equations and values at initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpo.objectives.dpo import DPO_NAMES, diffusion_dpo_loss, implicit_margin, pair_metrics


def _check(beta: float, epsilon: float | None = None) -> None:
    if beta <= 0:
        raise ValueError(f"objective.beta={beta} must be > 0: pass a positive beta")
    if epsilon is not None and not 0.0 <= epsilon < 0.5:
        raise ValueError(f"objective.epsilon={epsilon} must lie in [0, 0.5): it is the assumed label-flip rate")


def _logits(policy_w, policy_l, ref_w, ref_l, beta):
    margin = implicit_margin(policy_w, policy_l, ref_w, ref_l)
    return beta * margin, margin


def robust_dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                    beta: float, epsilon: float) -> tuple[torch.Tensor, dict]:
    """rDPO (Chowdhury et al., *Provably Robust DPO*, ICML 2024): [(1−ε)ℓ(z) − εℓ(−z)] / (1−2ε).

    Unbiased for the clean-label DPO loss when each label is flipped with probability ε; it can go
    below 0 for large z (the −εℓ(−z) term). ε = 0 is DPO; z = 0 (initialisation) gives log 2."""
    _check(beta, epsilon)
    logits, margin = _logits(policy_w, policy_l, ref_w, ref_l, beta)
    loss = ((1.0 - epsilon) * -F.logsigmoid(logits) - epsilon * -F.logsigmoid(-logits)) / (1.0 - 2.0 * epsilon)
    return loss, pair_metrics(logits, margin, policy_w, policy_l, ref_w, ref_l)


def conservative_dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                          beta: float, epsilon: float) -> tuple[torch.Tensor, dict]:
    """cDPO (Mitchell, *A note on DPO with noisy preferences*, 2023): (1−ε)ℓ(z) + εℓ(−z), i.e. DPO
    with label smoothing ε. Bounded below (its minimum sits at z = log((1−ε)/ε)); log 2 at z = 0."""
    _check(beta, epsilon)
    logits, margin = _logits(policy_w, policy_l, ref_w, ref_l, beta)
    loss = (1.0 - epsilon) * -F.logsigmoid(logits) + epsilon * -F.logsigmoid(-logits)
    return loss, pair_metrics(logits, margin, policy_w, policy_l, ref_w, ref_l)


def margin_weights(score_w: torch.Tensor, score_l: torch.Tensor, scale: float = 1.0, weight_min: float = 0.0,
                   weight_max: float = 2.0) -> torch.Tensor:
    """MADPO-style per-pair weights (B,): w = clip(2σ(−(s_w − s_l)/scale), w_min, w_max).

    A closed form of the pair alone (no batch normalisation, which would make every weight 1 at
    train_batch_size 1, the paper configs' setting): equal scores give 1, a large winner lead
    (easy pair) tends to 0, a reward that disagrees with the label (hard pair) tends to 2."""
    if scale <= 0:
        raise ValueError(f"objective.madpo_scale={scale} must be > 0: it is the reward margin unit")
    if not 0.0 <= weight_min <= weight_max:
        raise ValueError(f"objective.madpo_weight_min={weight_min} and madpo_weight_max={weight_max} need "
                         "0 <= min <= max: weights must never be negative")
    margin = score_w.double() - score_l.double()
    return (2.0 * torch.sigmoid(-margin / scale)).clamp(weight_min, weight_max).float()


def madpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               weights: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """MADPO (Rho, *Margin Adaptive DPO*, 2025): the DPO loss scaled per pair, w·ℓ(z); w·log 2 at
    initialisation (log 2 for a pair with equal reward scores)."""
    _check(beta)
    logits, margin = _logits(policy_w, policy_l, ref_w, ref_l, beta)
    base = -F.logsigmoid(logits)
    weights = weights.to(base)
    metrics = pair_metrics(logits, margin, policy_w, policy_l, ref_w, ref_l)
    metrics.update(pair_weight=weights.mean().detach(), dpo_loss=base.detach().mean())
    return weights * base, metrics


def simpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, beta: float,
               gamma_margin: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reference-free margin, SimPO-style (Meng et al., NeurIPS 2024, Eq. 6 without length
    normalisation, which images lack): −log σ(−½β(e_θ(w) − e_θ(l)) − γ). No reference term at
    all, so it is *not* log 2 at initialisation: that is −log σ(−½βΔθ − γ) of the base model."""
    _check(beta)
    margin = implicit_margin(policy_w, policy_l, None, None)
    logits = beta * margin - gamma_margin
    metrics = pair_metrics(beta * margin, margin, policy_w, policy_l)  # accuracy: the winner has the lower error
    return -F.logsigmoid(logits), metrics


def kto_feedback_loss(policy_err: torch.Tensor, ref_err: torch.Tensor, desirable: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, dict]:
    """Diffusion-KTO (Li et al., *Aligning Diffusion Models by Optimizing Human Utility*, 2024) with
    KTO's value function (Ethayarajh et al., 2024) on per-image (unpaired) binary feedback.

    Per image r = −½β(e_θ − e_ref); reference point z_ref = max(0, mean of r over the batch),
    detached; desirable images 1 − σ(r − z_ref), undesirable ones 1 − σ(z_ref − r). At
    initialisation r = z_ref = 0: every image's loss is 1/2 (not log 2)."""
    _check(beta)
    reward = -0.5 * beta * (policy_err - ref_err)
    # the batch estimate of KL(policy || reference), never negative, and a constant to the gradient
    z_ref = reward.mean().clamp(min=0.0).detach()
    good = desirable.to(reward.device).bool()
    loss = torch.where(good, 1.0 - torch.sigmoid(reward - z_ref), 1.0 - torch.sigmoid(z_ref - reward))
    with torch.no_grad():
        metrics = {"kto_z_ref": z_ref, "desirable_fraction": good.float().mean(),
                   # masked means (NaN when a side is absent) without reading the mask on the host
                   "reward_desirable": reward.where(good, float("nan")).nanmean(),
                   "reward_undesirable": reward.where(~good, float("nan")).nanmean()}
    return loss, metrics


def kto_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict]:
    """Diffusion-KTO on pairs data, as the paper builds it from Pick-a-Pic: every winner is a
    desirable image and every loser an undesirable one (``kto_feedback_loss`` over the 2B images,
    one reference point); per pair the mean of its two images' losses, 1/2 at initialisation."""
    ones = torch.ones_like(policy_w, dtype=torch.bool)
    per_image, image_metrics = kto_feedback_loss(torch.cat([policy_w, policy_l]), torch.cat([ref_w, ref_l]),
                                                 torch.cat([ones, ~ones]), beta)
    loss_w, loss_l = per_image.chunk(2)
    logits, margin = _logits(policy_w, policy_l, ref_w, ref_l, beta)  # r_w − r_l = β·h
    metrics = pair_metrics(logits, margin, policy_w, policy_l, ref_w, ref_l)
    metrics.update(kto_z_ref=image_metrics["kto_z_ref"], reward_w=image_metrics["reward_desirable"],
                   reward_l=image_metrics["reward_undesirable"])
    return 0.5 * (loss_w + loss_l), metrics


# ---- the offline loop's dispatch: (PairErrors, ObjectiveConfig, batch) -> (loss (B,), metrics) ----------


def _reference(errors, name: str):
    if errors.ref_w is None:
        raise ValueError(f"objective.name={name} compares against the reference but got no reference errors: "
                         "run it with method=diffusion_dpo (which builds one)")
    return errors.ref_w, errors.ref_l


def _scores(batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not batch or "score_w" not in batch:
        raise ValueError(f"objective.name={name} needs reward scores with every pair: set data.score_columns "
                         "(e.g. [reward_0, reward_1]) and cache.enabled=false")
    return torch.as_tensor(batch["score_w"]), torch.as_tensor(batch["score_l"])


def _dpo_family(errors, objective, batch=None):
    return diffusion_dpo_loss(errors.policy_w, errors.policy_l, *_reference(errors, objective.name), objective.beta,
                              objective.name)


def _robust(errors, objective, batch=None):
    return robust_dpo_loss(errors.policy_w, errors.policy_l, *_reference(errors, "robust_dpo"), objective.beta,
                           objective.epsilon)


def _cdpo(errors, objective, batch=None):
    return conservative_dpo_loss(errors.policy_w, errors.policy_l, *_reference(errors, "cdpo"), objective.beta,
                                 objective.epsilon)


def _madpo(errors, objective, batch=None):
    score_w, score_l = _scores(batch, "madpo")
    weights = margin_weights(score_w, score_l, objective.madpo_scale, objective.madpo_weight_min,
                             objective.madpo_weight_max)
    return madpo_loss(errors.policy_w, errors.policy_l, *_reference(errors, "madpo"),
                      weights.to(errors.policy_w.device), objective.beta)


def _simpo(errors, objective, batch=None):
    return simpo_loss(errors.policy_w, errors.policy_l, objective.beta, objective.gamma_margin)


def _kto(errors, objective, batch=None):
    return kto_loss(errors.policy_w, errors.policy_l, *_reference(errors, "kto"), objective.beta)


OBJECTIVES = {
    **{name: _dpo_family for name in DPO_NAMES},
    "robust_dpo": _robust,
    "cdpo": _cdpo,
    "madpo": _madpo,
    "simpo": _simpo,
    "kto": _kto,
}
