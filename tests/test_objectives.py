"""Hand-computed Diffusion-DPO / hinge / IPO / SFT math."""

import math

import pytest
import torch

from diffpo.objectives import METHODS, diffusion_dpo_loss, sft_loss


def test_sigmoid_loss_matches_hand_computation():
    # dtheta = 0.30 - 0.50 = -0.20 ; dref = 0.40 - 0.45 = -0.05 ; h = -0.5 * (-0.15) = 0.075
    loss, metrics = diffusion_dpo_loss(torch.tensor([0.30]), torch.tensor([0.50]), torch.tensor([0.40]),
                                       torch.tensor([0.45]), beta=10.0)
    z = 10.0 * 0.075
    assert loss.item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-6)
    assert metrics["margin"].item() == pytest.approx(0.075, rel=1e-6)
    assert metrics["implicit_acc"].item() == 1.0
    assert metrics["policy_gap"].item() == pytest.approx(-0.20, rel=1e-6)
    assert metrics["ref_gap"].item() == pytest.approx(-0.05, rel=1e-6)


def test_beta_convention_is_half_beta_times_gap():
    # With beta = 2 the logit is exactly -(dtheta - dref): the convention's 1/2.
    w, l, rw, rl = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0])
    loss, _ = diffusion_dpo_loss(w, l, rw, rl, beta=2.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(1.0))), rel=1e-6)


def test_hinge_and_ipo_hand_computed():
    args = (torch.tensor([0.30, 0.5]), torch.tensor([0.50, 0.5]), torch.tensor([0.40, 0.5]), torch.tensor([0.45, 0.5]))
    hinge, _ = diffusion_dpo_loss(*args, beta=10.0, name="hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - 0.75), 1.0], rel=1e-6)
    ipo, _ = diffusion_dpo_loss(*args, beta=10.0, name="ipo")
    assert ipo.tolist() == pytest.approx([(0.075 - 0.05) ** 2, 0.05 ** 2], rel=1e-5)


def test_equal_policy_and_reference_give_log2_and_half_accuracy():
    errs = torch.rand(4), torch.rand(4)
    loss, metrics = diffusion_dpo_loss(errs[0], errs[1], errs[0].clone(), errs[1].clone(), beta=5000.0)
    assert torch.equal(loss, torch.full((4,), math.log(2.0)))
    assert metrics["implicit_acc"].item() == 0.5


def test_loss_gradient_pushes_winner_error_down():
    w = torch.tensor([0.5], requires_grad=True)
    l = torch.tensor([0.5], requires_grad=True)
    loss, _ = diffusion_dpo_loss(w, l, torch.tensor([0.5]), torch.tensor([0.5]), beta=100.0)
    loss.sum().backward()
    assert w.grad.item() > 0 and l.grad.item() < 0  # descending lowers e(w), raises e(l)


def test_bad_arguments_raise():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="'nope' is not a diffusion_dpo_loss form"):
        diffusion_dpo_loss(t, t, t, t, name="nope")
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(t, t, t, t, beta=0.0)


def test_sft_is_winner_error_and_needs_no_reference():
    loss, metrics = sft_loss(torch.tensor([0.2, 0.4]))
    assert loss.tolist() == pytest.approx([0.2, 0.4])
    assert METHODS["sft"].needs_reference is False
    assert METHODS["diffusion_dpo"].needs_reference is True
