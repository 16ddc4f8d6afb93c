"""Preference objectives. ``METHODS`` maps a method name to how a trainer runs it.

A new method that fits the offline-pairs loop costs one ``Method`` entry here: the function that
turns ``PairErrors`` into a per-pair loss, and whether it needs reference errors. ``diffusion_dpo``
further dispatches on ``objective.name`` (``variants.OBJECTIVES``: dpo, hinge, ipo, robust_dpo,
cdpo, madpo, simpo, kto); a reference-free name (``ObjectiveConfig.reference_free``) overrides
``needs_reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffpo.objectives.d3po import d3po_step_loss
from diffpo.objectives.dpo import diffusion_dpo_loss, sft_loss
from diffpo.objectives.dro import dro_loss
from diffpo.objectives.grpo import grpo_step_loss
from diffpo.objectives.nft import nft_loss
from diffpo.objectives.seppo import aaf_loss
from diffpo.objectives.smpo import smpo_loss, soft_labels
from diffpo.objectives.variants import OBJECTIVES


@dataclass(frozen=True)
class Method:
    loop: str  # the trainer module in diffpo.trainers that runs it
    needs_reference: bool  # the loop also skips the reference when ``objective.reference_free``
    loss: Callable  # offline pairs: (PairErrors, ObjectiveConfig, batch) -> (per-pair loss (B,), metrics); online: the step loss
    paper: str
    prepare: str | None = None  # offline pairs: how x_t and the target are made (None: shared noise; "inversion": SmPO)
    uses_losers: bool = True  # offline pairs: False runs the policy on the winners alone (SFT)


def _dpo(errors, objective, batch=None) -> tuple[torch.Tensor, dict]:
    return OBJECTIVES[objective.name](errors, objective, batch)


def _sft(errors, objective, batch=None) -> tuple[torch.Tensor, dict]:
    return sft_loss(errors.policy_w)


def _smpo(errors, objective, batch) -> tuple[torch.Tensor, dict]:
    p = soft_labels(torch.as_tensor(batch["score_w"]), torch.as_tensor(batch["score_l"]), objective.score_low,
                    objective.score_high)
    return smpo_loss(errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, p.to(errors.policy_w.device),
                     objective.beta, objective.gamma)


METHODS: dict[str, Method] = {
    "diffusion_dpo": Method("offline_pairs", True, _dpo, "Wallace et al., Diffusion Model Alignment Using DPO, CVPR 2024"),
    "sft": Method("offline_pairs", False, _sft, "supervised fine-tuning on preferred images (baseline)",
                  uses_losers=False),
    "smpo": Method("offline_pairs", True, _smpo, "Lu et al., Smoothed Preference Optimization via ReNoise Inversion "
                                                 "(SmPO), ICML 2025", prepare="inversion"),
    # online methods sample while training; diffpo.trainers.online calls their losses directly
    "d3po": Method("online", True, d3po_step_loss, "Yang et al., Using Human Feedback to Fine-tune Diffusion Models "
                                                   "without Any Reward Model (D3PO), CVPR 2024"),
    "seppo": Method("online", True, aaf_loss, "Zhang et al., SePPO: Semi-Policy Preference Optimization for "
                                              "Diffusion Alignment, 2024"),
    "dro": Method("online", True, dro_loss, "Wu et al., Ranking-based Preference Optimization for Diffusion Models "
                                            "from Implicit User Feedback (Diffusion-DRO), NeurIPS 2025"),
    # online RL on rewards: diffpo.trainers.grpo samples groups, normalises rewards, and calls these
    "grpo": Method("grpo", False, grpo_step_loss, "Liu et al., Flow-GRPO: Training Flow Matching Models via Online RL, "
                                                  "2025; Xue et al., DanceGRPO, 2025"),
    "ddpo": Method("grpo", False, grpo_step_loss, "Black et al., Training Diffusion Models with Reinforcement Learning "
                                                  "(DDPO), ICLR 2024"),
    "nft": Method("grpo", False, nft_loss, "Zheng et al., DiffusionNFT: Online Diffusion Reinforcement with Forward "
                                           "Process, ICLR 2026"),
}

__all__ = ["METHODS", "Method", "OBJECTIVES", "aaf_loss", "d3po_step_loss", "diffusion_dpo_loss", "dro_loss", "grpo_step_loss", "nft_loss", "sft_loss"]
