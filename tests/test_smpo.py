"""SmPO's soft labels and loss against hand-computed values."""

import math

import pytest
import torch

from diffpo.objectives.smpo import PICKSCORE_HIGH, PICKSCORE_LOW, smpo_loss, soft_labels


def test_soft_labels_are_the_softmax_of_min_max_normalised_rewards():
    rw, rl = torch.tensor([0.25]), torch.tensor([0.20])
    nw = (0.25 - PICKSCORE_LOW) / (PICKSCORE_HIGH - PICKSCORE_LOW)
    nl = (0.20 - PICKSCORE_LOW) / (PICKSCORE_HIGH - PICKSCORE_LOW)
    expected = math.exp(nw) / (math.exp(nw) + math.exp(nl))
    assert float(soft_labels(rw, rl)) == pytest.approx(expected, rel=1e-6)
    assert float(soft_labels(torch.tensor([3.0]), torch.tensor([1.0]), low=0.0, high=4.0)) == pytest.approx(
        math.exp(0.75) / (math.exp(0.75) + math.exp(0.25)), rel=1e-6)
    with pytest.raises(ValueError, match="high > low"):
        soft_labels(rw, rl, low=1.0, high=1.0)


def test_smpo_loss_is_log2_at_initialisation_and_hand_computed_after():
    e = torch.tensor([0.3, 0.1])
    p = torch.tensor([0.7, 0.6])
    loss, _ = smpo_loss(e, e + 0.2, e, e + 0.2, p, beta=2000.0)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    # dtheta - dref = (0.1 - 0.3) - (0.2 - 0.3) = -0.1, so logit = -1/2 * beta * gamma * (2p - 1) * -0.1 = 0.2
    loss, metrics = smpo_loss(torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.3]),
                              torch.tensor([0.7]), beta=1.0, gamma=10.0)
    # per-term differences against the reference: winner 0.1 - 0.2, loser 0.3 - 0.3
    assert float(metrics["diff_w"]) == pytest.approx(-0.1) and float(metrics["diff_l"]) == 0.0
    logit = -0.5 * 1.0 * 10.0 * (2 * 0.7 - 1) * (-0.1)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-logit))), rel=1e-5)


def test_equal_rewards_give_no_gradient():
    policy_w = torch.tensor([0.2, 0.4], requires_grad=True)
    policy_l = torch.tensor([0.3, 0.1], requires_grad=True)
    p = soft_labels(torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2]))
    assert torch.equal(p, torch.full((2,), 0.5))
    loss, _ = smpo_loss(policy_w, policy_l, torch.zeros(2), torch.zeros(2), p, beta=5000.0)
    loss.sum().backward()
    assert torch.equal(policy_w.grad, torch.zeros(2)) and torch.equal(policy_l.grad, torch.zeros(2))
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))


def test_smpo_first_step_is_log2_on_the_bundled_model(tmp_path):
    first, second = _two_smpo_steps(tmp_path, "policy")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at initialisation
    assert 0.5 < first["soft_label"] < 1.0 and second["loss"] != first["loss"]


def test_smpo_inverting_with_the_reference_differs_from_the_policy_only_after_an_update(tmp_path):
    """Step 1: policy == reference, so both inversions give the same x~ and the same loss (log 2);
    step 2: the policy has moved, so inverting with it lands elsewhere than the reference's fixed x~."""
    policy = _two_smpo_steps(tmp_path / "policy", "policy")
    reference = _two_smpo_steps(tmp_path / "reference", "reference")
    assert reference[0]["loss"] == policy[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert reference[1]["loss"] != policy[1]["loss"]


def test_smpo_without_inversion_is_diffusion_dpo_with_beta_scaled_by_the_soft_label():
    """inversion_steps=0: x_t from the forward process with the pair's shared noise, so with one soft
    label p for every pair SmPO trains exactly as Diffusion-DPO with beta' = beta gamma (2p - 1) (the
    rewards agree with make_pairs' alternating labels: the labelled winner has the higher score)."""
    import tempfile
    from pathlib import Path

    p = float(soft_labels(torch.tensor([0.25]), torch.tensor([0.18])))
    with tempfile.TemporaryDirectory() as folder:
        smpo = _two_smpo_steps(Path(folder) / "smpo", "policy", inversion_steps=0, rewards=lambda i: (0.25, 0.18) if i % 2 else (0.18, 0.25))
        dpo = _two_smpo_steps(Path(folder) / "dpo", "policy", method="diffusion_dpo", beta=2000.0 * 10.0 * (2 * p - 1))
    assert smpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert smpo[1]["loss"] == pytest.approx(dpo[1]["loss"], rel=1e-5) and smpo[1]["loss"] != smpo[0]["loss"]


def _two_smpo_steps(tmp_path, inversion_model: str, inversion_steps: int = 3, method: str = "smpo",
                    beta: float = 2000.0, rewards=lambda i: (0.2 + 0.01 * i, 0.18)) -> list[dict]:
    import json

    from conftest import make_pairs
    from diffpo.config import TrainConfig, from_dict
    from diffpo.data.writer import write_pairs_parquet
    from diffpo.trainers import run_training

    pairs = make_pairs(4)
    for i, pair in enumerate(pairs):
        pair["reward_0"], pair["reward_1"] = rewards(i)
    source = write_pairs_parquet(tmp_path / "pairs.parquet", pairs)
    objective = {"beta": beta}
    if method == "smpo":
        objective.update(inversion_steps=inversion_steps, inversion_model=inversion_model)
    config = from_dict(TrainConfig, {
        "method": method, "output_dir": str(tmp_path / "run"), "max_steps": 2, "train_batch_size": 2,
        "progress_bar": False, "model": {"pretrained": "tiny"}, "objective": objective,
        "optim": {"lr": 1e-3}, "data": {"source": str(source), "score_columns": ["reward_0", "reward_1"]}})
    run_dir = run_training(config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smpo_without_scores_is_a_config_error(tmp_path, shapes_parquet):
    from diffpo.config import ConfigError, TrainConfig, from_dict
    from diffpo.trainers import run_training

    config = from_dict(TrainConfig, {"method": "smpo", "output_dir": str(tmp_path / "run"), "max_steps": 1,
                                     "model": {"pretrained": "tiny"}, "data": {"source": shapes_parquet}})
    with pytest.raises(ConfigError, match="score_columns"):
        run_training(config)
