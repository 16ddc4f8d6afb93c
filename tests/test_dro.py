"""Diffusion-DRO: the hinge loss by hand, the DPM-Solver++ sampler against diffusers, the replay
buffer, and the online loop on the bundled tiny model (first loss = m, stored negatives are the
lagged copy's own predictions, the lagged-copy sync, exact resume)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffpo.config import ConfigError, TrainConfig, from_dict
from diffpo.data.replay import ReplayBuffer
from diffpo.kernel.trajectory import sample_dpm_solver, solver_timesteps
from diffpo.objectives.dro import dro_loss
from diffpo.trainers import run_training

MARGIN = 0.001


# ---- the loss -------------------------------------------------------------------------------------


def test_dro_hinge_loss_against_hand_computed_values():
    policy_exp = torch.tensor([0.5, 0.2], requires_grad=True)
    ref_exp = torch.tensor([0.4, 0.3])
    policy_neg = torch.tensor([0.1, 0.1], requires_grad=True)
    ref_neg = torch.tensor([0.05, 0.0])
    loss, metrics = dro_loss(policy_exp, ref_exp, policy_neg, ref_neg, MARGIN)
    # d_exp = [0.1, -0.1], d_neg = [0.05, 0.1]: diff = [0.05, -0.2] -> [0.051, 0]
    torch.testing.assert_close(loss, torch.tensor([0.051, 0.0]))
    assert float(metrics["active"]) == 0.5
    loss.sum().backward()
    # the active sample pulls its expert error down and pushes its negative error up; the other none
    torch.testing.assert_close(policy_exp.grad, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(policy_neg.grad, torch.tensor([-1.0, 0.0]))


def test_dro_loss_is_the_margin_when_policy_reference_and_lagged_agree():
    e = torch.rand(4)
    loss, metrics = dro_loss(e, e, e * 0, e * 0, MARGIN)
    torch.testing.assert_close(loss, torch.full((4,), MARGIN))
    with pytest.raises(ValueError, match="margin"):
        dro_loss(e, e, e, e, -1.0)


# ---- the sampler ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_matches_diffusers_multistep_scheduler(prediction_type):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    train = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    reference = DPMSolverMultistepScheduler.from_config(train.config, prediction_type=prediction_type,
                                                        algorithm_type="dpmsolver++", solver_order=2,
                                                        final_sigmas_type="zero")

    def denoise(x, t, cond):  # any smooth function of (x, t) will do
        return torch.tanh(0.5 * x) + 1e-3 * t.float().view(-1, 1, 1, 1)

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = solver_timesteps(1000, 20, 2, jitter=False)
    ours = sample_dpm_solver(denoise, train, x_T, {}, grid, prediction_type=prediction_type)
    reference.set_timesteps(timesteps=grid[:, 0].tolist())
    x = x_T.clone()
    for i, t in enumerate(reference.timesteps):
        torch.testing.assert_close(ours.latents[i], x, rtol=1e-4, atol=1e-4)  # what the model saw at step i
        output = denoise(x, t.repeat(2), {})
        torch.testing.assert_close(ours.predictions[i], output, rtol=1e-4, atol=1e-4)
        x = reference.step(output, t, x).prev_sample
    torch.testing.assert_close(ours.final, x, rtol=1e-4, atol=1e-4)


def test_dpm_solver_records_the_conditional_or_the_guided_prediction():
    """Guidance steps the solver in both modes (same latents); ``record`` picks what is stored."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.1

    def denoise(x, t, cond):  # a toy eps model whose output depends on the text
        return torch.einsum("ij,bjhw->bihw", weight, x) + cond["encoder_hidden_states"].view(-1, 1, 1, 1)

    cond, uncond = {"encoder_hidden_states": torch.ones(2)}, {"encoder_hidden_states": torch.zeros(2)}
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    grid = solver_timesteps(1000, 4, 2, jitter=False)
    conditional = sample_dpm_solver(denoise, scheduler, x_T, cond, grid, uncond, 4.0)
    stepped = sample_dpm_solver(denoise, scheduler, x_T, cond, grid, uncond, 4.0, record="guided")
    assert torch.equal(conditional.latents, stepped.latents) and torch.equal(conditional.final, stepped.final)
    for i in range(4):
        x, t = conditional.latents[i], grid[i]
        c, u = denoise(x, t, cond), denoise(x, t, uncond)
        torch.testing.assert_close(conditional.predictions[i], c)
        torch.testing.assert_close(stepped.predictions[i], u + 4.0 * (c - u))
    with pytest.raises(ValueError, match="record"):
        sample_dpm_solver(denoise, scheduler, x_T, cond, grid, uncond, 4.0, record="both")


def test_jittered_grids_shift_each_sample_by_its_own_offset():
    grid = solver_timesteps(1000, 20, 64, jitter=True, generator=torch.Generator().manual_seed(0))
    assert grid.shape == (20, 64)
    offsets = grid - (torch.arange(20) * 50).flip(0)[:, None]
    assert (offsets == offsets[:1]).all()  # one offset per sample, the same at every step
    assert int(offsets.min()) >= 0 and int(offsets.max()) < 50
    assert len(offsets[0].unique()) > 10  # samples differ
    assert (grid[:-1] > grid[1:]).all()


# ---- the replay buffer --------------------------------------------------------------------------------


def trajectories(first: int, n: int, steps: int = 3) -> dict:
    """n trajectories whose every tensor encodes its trajectory id (first..first+n-1) and step."""
    ids = torch.arange(first, first + n).float()
    step = torch.arange(steps).float()
    code = ids[:, None] * 10 + step[None, :]  # (n, steps)
    return {"timesteps": code.long(), "latents": code[:, :, None, None].expand(n, steps, 2, 2).clone(),
            "predictions": -code[:, :, None, None].expand(n, steps, 2, 2).clone(),
            "expert": ids[:, None].expand(n, 2).clone(), "hidden": ids[:, None, None].expand(n, 3, 4).clone(),
            "pooled": None}


def test_replay_buffer_keeps_the_last_trajectories_and_draws_consistent_entries():
    buffer = ReplayBuffer(capacity=4)
    buffer.add(**trajectories(0, 3))
    buffer.add(**trajectories(3, 3))
    assert len(buffer) == 4
    assert buffer.tensors["expert"][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # first in, first out
    drawn = buffer.sample(4, torch.Generator().manual_seed(0))
    assert sorted(drawn["rows"].tolist()) == [0, 1, 2, 3]  # without replacement while it holds enough
    ids = drawn["expert"][:, 0]
    # every field of a draw comes from the same trajectory and the same step
    torch.testing.assert_close(drawn["timesteps"].float(), ids * 10 + drawn["steps"].float())
    torch.testing.assert_close(drawn["latents"][:, 0, 0], ids * 10 + drawn["steps"].float())
    torch.testing.assert_close(drawn["predictions"], -drawn["latents"])
    torch.testing.assert_close(drawn["hidden"][:, 0, 0], ids)
    assert "pooled" not in drawn
    many = buffer.sample(9, torch.Generator().manual_seed(0))
    assert many["rows"].shape == (9,) and set(many["rows"].tolist()) <= {0, 1, 2, 3}


def test_replay_buffer_round_trips_and_rejects_mismatched_entries():
    buffer = ReplayBuffer(capacity=3)
    buffer.add(**trajectories(0, 2))
    restored = ReplayBuffer(capacity=3)
    restored.load_state_dict(buffer.state_dict())
    for key in buffer.tensors:
        torch.testing.assert_close(restored.tensors[key], buffer.tensors[key])
    bad = trajectories(5, 2)
    bad["expert"] = bad["expert"][:1]
    with pytest.raises(ValueError, match="disagree"):
        buffer.add(**bad)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(2).sample(1)
    with pytest.raises(ValueError, match="need"):
        ReplayBuffer(2).add(timesteps=torch.zeros(1, 2))


# ---- the loop -------------------------------------------------------------------------------------------


def dro_config(tmp_path, source, **online) -> TrainConfig:
    return from_dict(TrainConfig, {
        "method": "dro", "output_dir": str(tmp_path / "dro"), "max_steps": 3, "train_batch_size": 2,
        "log_every": 1, "progress_bar": False, "checkpoint_every": 1, "model": {"pretrained": "tiny"},
        "data": {"source": str(source)}, "optim": {"lr": 1e-3, "max_grad_norm": None},
        "online": {"num_inference_steps": 4, "guidance_scale": 1.0, **online}})


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(run_dir, step: int, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step}" / f"{name}.safetensors"))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_dro_first_loss_is_the_margin_and_negatives_are_the_lagged_predictions(tmp_path, shapes_parquet, guidance):
    """With guidance the lagged copy steps on guided outputs but stores its *conditional* prediction
    (what the policy is trained to output), so the first loss is still exactly the margin."""
    from diffpo.models.loading import load_stack, unet_denoiser

    run_dir = run_training(dro_config(tmp_path, shapes_parquet, lagged_sync_every=2, guidance_scale=guidance))
    first = records(run_dir)[0]
    # policy == reference == lagged copy: expert and negative differences vanish, the loss is m
    assert first["loss"] == pytest.approx(MARGIN, rel=1e-6)
    assert first["diff"] == 0.0 and first["active"] == 1.0
    # the buffer after step 1 holds the lagged copy's trajectories: while it equals the base model
    # (LoRA B = 0), its stored predictions are the base UNet's outputs at the stored (x_t, t, text)
    buffer = checkpoint_tensors(run_dir, 1, "replay_buffer-p0")
    assert buffer["latents"].shape[:2] == (2, 4) and buffer["timesteps"].shape == (2, 4)
    base = unet_denoiser(load_stack("tiny").unet)
    with torch.no_grad():
        for step in range(4):
            out = base(buffer["latents"][:, step], buffer["timesteps"][:, step], {"encoder_hidden_states": buffer["hidden"]})
            torch.testing.assert_close(out, buffer["predictions"][:, step], rtol=1e-4, atol=1e-5)
    # the lagged copy syncs every 2 optimizer steps: at step 1 it is still the initial LoRA (B = 0)
    # and is stored with the checkpoint; at step 2 it equals the policy, so nothing is stored
    lagged = checkpoint_tensors(run_dir, 1, "lagged_policy")
    assert all(float(v.abs().max()) == 0 for k, v in lagged.items() if "lora_B" in k or "lora.up" in k)
    assert not (run_dir / "checkpoints" / "step-2" / "lagged_policy.safetensors").exists()
    assert (run_dir / "checkpoints" / "step-3" / "lagged_policy.safetensors").exists()


def test_dro_resume_continues_exactly(tmp_path, shapes_parquet):
    from safetensors.torch import load_file

    straight = run_training(dro_config(tmp_path / "a", shapes_parquet, lagged_sync_every=2))
    config = dro_config(tmp_path / "b", shapes_parquet, lagged_sync_every=2)
    run_training(dataclasses.replace(config, max_steps=1))  # stops between two syncs of the lagged copy
    resumed = run_training(dataclasses.replace(config, resume_from="latest"))
    a = load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [r["loss"] for r in records(straight)] == pytest.approx([r["loss"] for r in records(resumed)], abs=1e-9)


def test_dro_config_errors_are_one_line(tmp_path, shapes_parquet):
    with pytest.raises(ConfigError, match="margin"):
        from_dict(TrainConfig, {"method": "dro", "objective": {"margin": -0.1}})
    with pytest.raises(ConfigError, match="replay_size"):
        dro_config(tmp_path, shapes_parquet, replay_size=0)
    with pytest.raises(ValueError, match="replay_batch_size"):
        run_training(dro_config(tmp_path, shapes_parquet, replay_batch_size=1000))
