"""GRPO on diffusion trajectories: Flow-GRPO (Liu et al., *Flow-GRPO: Training Flow Matching Models
via Online RL*, 2025), DanceGRPO (Xue et al., 2025) and DDPO (Black et al., *Training Diffusion
Models with Reinforcement Learning*, ICLR 2024) share one per-step loss.

For a stored denoising step of sample i with advantage A_i, the sampler's log-probability
log p_old and the current policy's log p_theta of the same transition (fp32, mean over latent dims):

    rho = exp(log p_theta - log p_old)
    L_clip = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))                    (PPO, Schulman et al. 2017, Eq. 7)
    L = L_clip + beta_KL · KL(p_theta(x_{t-1} | x_t) || p_ref(x_{t-1} | x_t))     (Flow-GRPO, Eq. 8)

Both steps are Gaussians with the same std s (the sampler's, which does not depend on the model),
so the KL is exact and lives in mean space (Flow-GRPO's velocity-space KL; for DDIM it is the
eps-space one): KL = ||mu_theta - mu_ref||^2 / (2 s^2), taken as the mean over latent dims like the
log-probabilities (``gaussian_mean_kl``).

Advantages are the group-normalised rewards of ``diffpo.rewards.combine`` (GRPO), clipped to
[-adv_clip, adv_clip]; DDPO's per-prompt stat tracking (``PerPromptStatTracker``) normalises a
prompt's rewards by the running statistics of that prompt over the last rounds.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, s^2 I) || N(ref_mean, s^2 I)) per latent dim, averaged over them -> (B,), fp32.
    ``std`` broadcasts against the means ((B, 1, ...) or a scalar)."""
    diff = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return diff.reshape(diff.shape[0], -1).mean(dim=1)


def grpo_step_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                   clip_range: float, kl: torch.Tensor | None = None, kl_coef: float = 0.0
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample loss (B,) of one denoising step and detached metrics: the PPO-clipped ratio loss
    plus ``kl_coef`` x ``kl`` (per sample, from ``gaussian_mean_kl``)."""
    if not 0 < clip_range < 1:
        raise ValueError(f"clip_range={clip_range} must lie in (0, 1)")
    log_ratio = log_prob.float() - old_log_prob.float().to(log_prob.device)
    ratio = torch.exp(log_ratio)
    advantages = advantages.float().to(log_prob.device)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    if kl is not None and kl_coef:
        loss = loss + kl_coef * kl
    with torch.no_grad():
        metrics = {"policy_loss": torch.maximum(unclipped, clipped).mean(),
                   "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean(),
                   "approx_kl_old": 0.5 * (log_ratio ** 2).mean(), "ratio": ratio.mean()}
        if kl is not None:
            metrics["kl"] = kl.mean()
    return loss, metrics


class PerPromptStatTracker:
    """DDPO's per-prompt stat tracking (official code ``PerPromptStatTracker``): each prompt keeps its
    last ``buffer_size`` rewards; a reward is normalised by its prompt's buffer mean and std (std +
    1e-6) once the buffer holds ``min_count`` rewards, before that by the mean and std of the
    whole batch. The state is rebuilt by replaying past rounds (``update`` is deterministic)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards_np = rewards.double().cpu().numpy()
        prompts_np = np.array(prompts, dtype=object)
        advantages = np.empty_like(rewards_np)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_np == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards_np[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards_np.mean(), rewards_np.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[mask] = (rewards_np[mask] - mean) / std
        return torch.from_numpy(advantages).float()
