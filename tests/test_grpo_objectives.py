"""GRPO / DDPO / DiffusionNFT losses and the reward combination, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from diffpo.objectives.grpo import PerPromptStatTracker, gaussian_mean_kl, grpo_step_loss
from diffpo.objectives.nft import nft_loss, optimality_probability
from diffpo.rewards.combine import HackingGuard, combine, group_normalise, reward_stats


def test_group_normalise_by_hand():
    scores = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 6.0]])
    # group 0: mean 2, population std 1; group 1: std 0 -> 0 / 1e-4 = 0; group 2: mean 3, std 3
    expected = torch.tensor([[-1 / (1 + 1e-4), 1 / (1 + 1e-4)], [0.0, 0.0], [-3 / (3 + 1e-4), 3 / (3 + 1e-4)]])
    torch.testing.assert_close(group_normalise(scores), expected)
    # global std: the std of all six scores (mean 14/6)
    values = [1, 3, 2, 2, 0, 6]
    mean = sum(values) / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 6)
    expected_global = torch.tensor([[-1.0, 1.0], [0.0, 0.0], [-3.0, 3.0]]) / (std + 1e-4)
    torch.testing.assert_close(group_normalise(scores, global_std=True), expected_global)


def test_combine_normalises_each_reward_before_weighting():
    kb = torch.tensor([[-1000.0, -1002.0]])  # a reward in large units
    unit = torch.tensor([[0.2, 0.1]])
    a = combine({"kb": kb, "unit": unit}, {"kb": 1.0, "unit": 0.5})
    # each normalises to [+1, -1] (times std/(std+eps)); the units do not matter, the weights do
    expected = torch.tensor([[1 / (1 + 1e-4) + 0.5 * 0.05 / (0.05 + 1e-4), -(1 / (1 + 1e-4) + 0.5 * 0.05 / (0.05 + 1e-4))]])
    torch.testing.assert_close(a, expected)
    with pytest.raises(ValueError, match="no scores for reward 'other'"):
        combine({"kb": kb}, {"other": 1.0})
    stats = reward_stats({"kb": kb, "gold": torch.tensor([[1.0, float("nan")]])})
    assert stats["reward/kb"] == -1001.0 and stats["reward/kb_std"] == 1.0 and stats["reward/gold"] == 1.0


def test_grpo_loss_clips_like_ppo_by_hand():
    eps = 0.2
    old = torch.zeros(4)
    # ratios 1.5, 0.5, 1.1, 0.5 with advantages +1, +1, -2, -1
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5]))
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    logp.requires_grad_(True)
    loss, metrics = grpo_step_loss(logp, old, adv, eps)
    # max(-A r, -A clip(r)): [max(-1.5, -1.2), max(-0.5, -0.8), max(2.2, 2.2), max(0.5, 0.8)]
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, -0.5, 2.2, 0.8]))
    assert float(metrics["clip_fraction"]) == 0.75  # |r - 1| > 0.2 for 1.5, 0.5, 0.5
    loss.sum().backward()
    # gradient flows only through the unclipped branch: d(-A r)/dlogp = -A r for samples 1 and 2
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5, 2.2, 0.0]))


def test_grpo_on_policy_first_step_is_minus_advantage_with_kl():
    logp = torch.tensor([-1.3, 0.7])
    adv = torch.tensor([0.5, -2.0])
    kl = torch.tensor([0.1, 0.3])
    loss, metrics = grpo_step_loss(logp, logp.clone(), adv, 1e-4, kl=kl, kl_coef=0.04)
    torch.testing.assert_close(loss, -adv + 0.04 * kl)
    assert float(metrics["ratio"]) == 1.0 and float(metrics["clip_fraction"]) == 0.0


def test_gaussian_mean_kl_equals_the_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    std = torch.tensor([0.3, 0.5, 1.2]).view(3, 1, 1, 1)
    kl = gaussian_mean_kl(mean, ref, std)
    p = torch.distributions.Normal(mean, std.expand_as(mean))
    q = torch.distributions.Normal(ref, std.expand_as(ref))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).reshape(3, -1).mean(1))
    # and by hand for one sample: ||mu - mu_ref||^2 / (2 s^2) / dims
    torch.testing.assert_close(kl[1], ((mean[1] - ref[1]) ** 2).sum() / (2 * 0.25) / 32)


def test_ddpo_stat_tracker_uses_batch_stats_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    a = tracker.update(["x", "x", "y", "y"], torch.tensor([1.0, 3.0, 5.0, 7.0]))
    # buffers of 2 < 3: the batch's mean 4 and std sqrt(5)
    torch.testing.assert_close(a, (torch.tensor([1.0, 3.0, 5.0, 7.0]) - 4) / (math.sqrt(5) + 1e-6))
    b = tracker.update(["x", "x"], torch.tensor([2.0, 2.0]))
    # x's buffer [1, 3, 2, 2]: mean 2, std sqrt(0.5)
    torch.testing.assert_close(b, torch.zeros(2))
    c = tracker.update(["x"], torch.tensor([4.0]))  # buffer keeps the last 4: [3, 2, 2, 4], mean 2.75
    std = math.sqrt(((3 - 2.75) ** 2 + 2 * (2 - 2.75) ** 2 + (4 - 2.75) ** 2) / 4)
    torch.testing.assert_close(c, torch.tensor([(4 - 2.75) / (std + 1e-6)]))


def test_nft_loss_by_hand():
    # one latent dim per sample, two samples
    theta = torch.tensor([[1.0], [0.0]], requires_grad=True)
    old = torch.tensor([[0.0], [1.0]])
    target = torch.tensor([[2.0], [0.5]])
    r = torch.tensor([1.0, 0.25])
    beta = 0.5
    loss, metrics = nft_loss(theta, old, target, r, beta)
    # sample 0: v+ = 0.5*0 + 0.5*1 = 0.5, v- = 1.5*0 - 0.5*1 = -0.5; r=1: (0.5-2)^2 / 0.5 = 4.5
    # sample 1: v+ = 0.5*1 + 0 = 0.5, v- = 1.5*1 - 0 = 1.5; (0.25*(0)^2 + 0.75*(1.0)^2) / 0.5 = 1.5
    torch.testing.assert_close(loss.detach(), torch.tensor([4.5, 1.5]))
    loss.sum().backward()
    # d/dtheta: sample 0: r*2*(v+ - v)*beta/beta = 2*(-1.5) = -3; sample 1: (1-r)*2*(v- - v)*(-beta)/beta = -0.75*2*1 = -1.5
    torch.testing.assert_close(theta.grad, torch.tensor([[-3.0], [-1.5]]))
    assert float(metrics["r"]) == 0.625


def test_nft_at_old_policy_and_r_half_has_no_gradient():
    """theta = old: v+ = v- = v_old, and with r = 1/2 the two pulls cancel exactly."""
    torch.manual_seed(0)
    old = torch.randn(3, 2, 4)
    theta = old.clone().requires_grad_(True)
    target = torch.randn(3, 2, 4)
    loss, _ = nft_loss(theta, old, target, torch.full((3,), 0.5), beta=0.1)
    loss.sum().backward()
    torch.testing.assert_close(theta.grad, torch.zeros_like(theta), atol=1e-6, rtol=0)


def test_optimality_probability():
    torch.testing.assert_close(optimality_probability(torch.tensor([-10.0, -5.0, 0.0, 2.5, 7.0]), 5.0),
                               torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_hacking_guard_stops_when_gold_falls_while_trained_rises():
    guard = HackingGuard(tolerance=0.05, patience=2)
    assert guard.update(1.0, 0.80)[1] is None          # best gold 0.80 at trained 1.0
    assert guard.update(1.2, 0.78)[1] is None          # within tolerance
    metrics, stop = guard.update(1.3, 0.70)            # strike 1
    assert stop is None and metrics["hacking_strikes"] == 1.0 and metrics["gold_drop"] == pytest.approx(0.10)
    metrics, stop = guard.update(0.9, 0.70)            # trained fell below its value at the best gold: no strike
    assert stop is None and metrics["hacking_strikes"] == 0.0
    guard.update(1.4, 0.70)
    state = guard.state()
    resumed = HackingGuard(0.05, 2)
    resumed.load(state)
    _, stop = resumed.update(1.5, 0.65)                 # second strike in a row, after a resume
    assert stop is not None and "reward hacking" in stop and "0.8" in stop
    assert HackingGuard(0.05, 0).update(1.0, 0.5)[1] is None
