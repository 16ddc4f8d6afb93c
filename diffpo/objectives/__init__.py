"""Preference objectives. ``METHODS`` maps a method name to how a trainer runs it.

A new method that fits the offline-pairs loop costs one ``Method`` entry here: the function that
turns ``PairErrors`` into a per-pair loss, and whether it needs reference errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffpo.objectives.d3po import d3po_step_loss
from diffpo.objectives.dpo import diffusion_dpo_loss, sft_loss
from diffpo.objectives.seppo import aaf_loss


@dataclass(frozen=True)
class Method:
    loop: str  # the trainer module in diffpo.trainers that runs it
    needs_reference: bool
    loss: Callable  # offline pairs: (PairErrors, ObjectiveConfig) -> (per-pair loss (B,), metrics); online: the step loss
    paper: str


def _dpo(errors, objective) -> tuple[torch.Tensor, dict]:
    return diffusion_dpo_loss(
        errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, objective.beta, objective.loss_type
    )


def _sft(errors, objective) -> tuple[torch.Tensor, dict]:
    return sft_loss(errors.policy_w)


METHODS: dict[str, Method] = {
    "diffusion_dpo": Method("offline_pairs", True, _dpo, "Wallace et al., Diffusion Model Alignment Using DPO, CVPR 2024"),
    "sft": Method("offline_pairs", False, _sft, "supervised fine-tuning on preferred images (baseline)"),
    # online methods sample while training; diffpo.trainers.online calls their losses directly
    "d3po": Method("online", True, d3po_step_loss, "Yang et al., Using Human Feedback to Fine-tune Diffusion Models "
                                                   "without Any Reward Model (D3PO), CVPR 2024"),
    "seppo": Method("online", True, aaf_loss, "Zhang et al., SePPO: Semi-Policy Preference Optimization for "
                                              "Diffusion Alignment, 2024"),
}

__all__ = ["METHODS", "Method", "aaf_loss", "d3po_step_loss", "diffusion_dpo_loss", "sft_loss"]
