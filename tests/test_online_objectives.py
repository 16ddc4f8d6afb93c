"""D3PO's clipped per-step loss, SePPO's anchor-based flip and the checkpoint pool."""

import math

import pytest
import torch

from diffpo.models.pool import CheckpointPool
from diffpo.objectives.d3po import d3po_step_loss
from diffpo.objectives.seppo import aaf_loss


def test_d3po_is_log2_when_policy_equals_reference():
    logp = torch.randn(4)
    loss, metrics = d3po_step_loss(logp, logp.clone(), logp + 1, logp + 1)
    assert torch.equal(loss, torch.full((4,), math.log(2.0)))
    assert metrics["implicit_acc"].item() == 0.5


def test_d3po_hand_computed_and_clamped():
    # w: log ratio 0.05 (inside the clip), l: log ratio -0.5 -> clamped to log(0.9)
    loss, metrics = d3po_step_loss(torch.tensor([0.05]), torch.tensor([0.0]), torch.tensor([-0.5]), torch.tensor([0.0]),
                                   beta=0.1, clip=0.1)
    z = 0.1 * (0.05 - math.log(0.9))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-6)
    assert metrics["clip_fraction"].item() == 0.0  # only the winner's clipping is counted


def test_d3po_clamp_stops_the_gradient_and_ties_give_none():
    w = torch.tensor([0.5, 0.0], requires_grad=True)
    loss, _ = d3po_step_loss(w, torch.zeros(2), torch.zeros(2), torch.zeros(2), tie=torch.tensor([False, True]))
    loss.sum().backward()
    assert w.grad[0].item() == 0.0  # exp(0.5) > 1.1: clamped, no gradient (PPO-style trust region)
    assert w.grad[1].item() == 0.0 and loss[1].item() == 0.0  # tie
    inside = torch.tensor([0.01], requires_grad=True)
    d3po_step_loss(inside, torch.zeros(1), torch.zeros(1), torch.zeros(1))[0].sum().backward()
    assert inside.grad.item() < 0  # descending raises the winner's log-prob


def test_aaf_sign_rule_on_hand_made_errors():
    beta = 10.0
    # pair 0: sigma_w = -0.1 < 0 -> x_r is a loser: inner = sigma_w - sigma_r = -0.1 - 0.2
    # pair 1: sigma_w = +0.1 >= 0 -> both pulled: inner = sigma_w + sigma_r = 0.1 + 0.2
    loss, metrics = aaf_loss(torch.tensor([0.4, 0.6]), torch.tensor([0.5, 0.5]), torch.tensor([0.7, 0.7]),
                             torch.tensor([0.5, 0.5]), beta=beta)
    expected = [math.log1p(math.exp(0.5 * beta * -0.3)), math.log1p(math.exp(0.5 * beta * 0.3))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert metrics["flip_rate"].item() == 0.5
    # without the flip, pair 1 is a plain Diffusion-DPO pair too: inner = sigma_w - sigma_r = 0.1 - 0.2
    loss, metrics = aaf_loss(torch.tensor([0.4, 0.6]), torch.tensor([0.5, 0.5]), torch.tensor([0.7, 0.7]),
                             torch.tensor([0.5, 0.5]), beta=beta, adaptive_flip=False)
    assert loss.tolist() == pytest.approx([expected[0], math.log1p(math.exp(0.5 * beta * -0.1))], rel=1e-5)
    assert metrics["flip_rate"].item() == 0.0


def test_aaf_is_log2_at_initialisation():
    e_w, e_r = torch.rand(3), torch.rand(3)
    loss, metrics = aaf_loss(e_w, e_w.clone(), e_r, e_r.clone())
    assert torch.equal(loss, torch.full((3,), math.log(2.0)))
    assert metrics["flip_rate"].item() == 1.0  # sigma_w = 0 is not < 0


def test_pool_strategies_cover_their_entries():
    pool = CheckpointPool("base", "uniform")
    for i in range(1, 4):
        pool.add(f"ckpt{i}")
    gen = torch.Generator().manual_seed(0)
    draws = {pool.draw(gen) for _ in range(200)}
    assert draws == {"base", "ckpt1", "ckpt2", "ckpt3"}
    first, latest = CheckpointPool("base", "first"), CheckpointPool("base", "latest")
    for p in (first, latest):
        p.add("a")
        p.add("b")
    assert {first.draw(gen) for _ in range(10)} == {"base"} and {latest.draw(gen) for _ in range(10)} == {"b"}
    with pytest.raises(ValueError, match="uniform, first, latest"):
        CheckpointPool("base", "random")


def test_d3po_saturated_ratio_gives_a_zero_not_a_nan_gradient():
    # exp(200) overflows float32: the clamp must not turn it into 0 * inf
    w = torch.tensor([200.0, -200.0], requires_grad=True)
    loss, metrics = d3po_step_loss(w, torch.zeros(2), torch.zeros(2), torch.zeros(2))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.equal(w.grad, torch.zeros(2))
    assert metrics["clip_fraction"] == 1.0
