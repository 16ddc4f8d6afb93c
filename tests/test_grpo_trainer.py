"""The GRPO / DDPO / DiffusionNFT loop on the bundled tiny model: first steps, the on-policy check,
gold rewards and the hacking guard, kill-and-resume, and group statistics over two processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffpo.config import ConfigError, TrainConfig, from_dict, save_config
from diffpo.trainers import run_training

TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).parents[1]


def rl_config(tmp_path, method: str, **overrides) -> TrainConfig:
    data = {
        "method": method, "output_dir": str(tmp_path / method), "max_steps": 2, "train_batch_size": 4,
        "log_every": 1, "progress_bar": False, "model": {"pretrained": "tiny"},
        "objective": {"clip_range": 0.2, "kl_coef": 0.04}, "optim": {"lr": 1e-3},
        "online": {"prompts_per_round": 2, "samples_per_prompt": 4, "num_inference_steps": 4, "timestep_fraction": 0.5,
                   "eta": 0.0 if method == "nft" else 1.0, "rewards": ["jpeg-compressibility"],
                   "gold_rewards": ["colour-match"], "save_images": False},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[key] = value
    return from_dict(TrainConfig, data)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def lora_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "pytorch_lora_weights.safetensors"))


def test_grpo_first_round_is_on_policy_and_logs_every_reward(tmp_path):
    run_dir = run_training(rl_config(tmp_path, "grpo", max_steps=3))
    first, second, third = metrics(run_dir)
    # re-scoring with the sampling weights: ratio 1 up to fp32 batch-composition rounding
    assert first["ratio_deviation"] < 1e-5 and first["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["kl"] == 0.0  # LoRA B = 0: the policy is the base model
    assert first["loss"] == pytest.approx(first["policy_loss"])
    # 2 prompts x 4 samples, batch 4: two steps per round
    assert (first["round"], second["round"], third["round"]) == (0.0, 0.0, 1.0)
    for key in ("reward/jpeg-compressibility", "reward/jpeg-compressibility_std", "reward/colour-match",
                "reward/colour-match_std", "advantage_mean", "advantage_std", "clip_fraction", "gold_drop",
                "time/sampling_s", "time/reward_s", "time/training_step_s"):
        assert key in first, key
    assert abs(first["advantage_mean"]) < 1e-6 and first["advantage_std"] == pytest.approx(1.0, abs=0.01)
    assert second["kl"] > 0  # the policy moved in step 1
    scores = json.loads((run_dir / "rounds" / "round-0000" / "scores.json").read_text())
    assert set(scores) == {"jpeg-compressibility", "colour-match"}
    assert [len(row) for row in scores["jpeg-compressibility"]] == [4, 4]
    assert any(float(v.abs().max()) > 0 for k, v in lora_weights(run_dir).items() if "lora_B" in k)


def test_the_on_policy_check_stops_with_a_clear_error(tmp_path):
    """The round's re-scoring deviates from the stored log-probabilities by fp32 rounding only, which
    depends on the thread count (0 exactly on some): a tolerance of 1e-12 must stop the run with the
    message exactly when the deviation the run measured exceeds it, and let it finish otherwise."""
    from diffpo.kernel.samplers import OffPolicyError

    config = rl_config(tmp_path, "grpo", max_steps=1, online__sampler={"on_policy_tolerance": 1e-12})
    try:
        run_dir = run_training(config)
    except OffPolicyError as error:
        assert re.search(r"on-policy ratio check failed.*float32 and sampler ddim \(noise_level=1", str(error)), error
        return
    assert metrics(run_dir)[0]["ratio_deviation"] <= 1e-12


def test_nft_first_step_at_the_old_policy(tmp_path):
    run_dir = run_training(rl_config(tmp_path, "nft", max_steps=3))
    first, second, third = metrics(run_dir)
    # theta = v_old at the start: v+ = v- = v_old, so both errors are the same number
    assert first["positive_error"] == pytest.approx(first["negative_error"], rel=1e-6)
    assert first["old_deviation"] == 0.0 and first["kl"] == 0.0
    assert second["old_deviation"] > 0  # v_old stays the round's sampler while theta moves
    assert third["round"] == 1.0 and third["old_deviation"] == 0.0  # round 1 sampled by the updated policy
    assert (run_dir / "rounds" / "round-0001" / "old_policy.safetensors").is_file()


def test_nft_resume_continues_exactly(tmp_path):
    straight = run_training(rl_config(tmp_path / "a", "nft", max_steps=3))
    run_training(rl_config(tmp_path / "b", "nft", max_steps=1))
    resumed = run_training(rl_config(tmp_path / "b", "nft", max_steps=3, resume_from="latest"))
    a, b = lora_weights(straight), lora_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(straight)] == [m["loss"] for m in metrics(resumed)]


def test_ddpo_kill_and_resume_gives_the_same_weights(tmp_path):
    """A real SIGKILL in the middle of saving step 3's checkpoint; resuming from step 2 (a round
    boundary, the per-prompt tracker rebuilt from the round files) reaches the same bits."""
    from diffpo.trainers.common import KILL_DURING_SAVE

    def config(name, **extra):
        return rl_config(tmp_path / name, "ddpo", max_steps=5, checkpoint_every=1, checkpoints_total_limit=None,
                         online__stat_min_count=2, **extra)

    straight = run_training(config("a"))
    killed = config("b")
    path = tmp_path / "b.yaml"
    save_config(killed, path)
    # the killed run computes with as many threads as the in-process runs: a different thread count
    # changes fp32 reduction order, and the comparison below is bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT), KILL_DURING_SAVE: "3"}
    result = subprocess.run([sys.executable, "-m", "diffpo", "train", str(path)], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)
    assert result.returncode == -9, result.stderr[-2000:]
    run_dir = Path(killed.output_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step")) == ["step-1", "step-2"]
    resumed = run_training(config("b", resume_from="latest"))
    a, b = lora_weights(straight), lora_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(straight)] == [m["loss"] for m in metrics(resumed)]
    assert metrics(straight)[-1]["round"] == 2.0


def test_reward_hacking_is_caught_on_the_bundled_model(tmp_path):
    """JPEG *in*compressibility at a large learning rate turns the shapes into noise: the trained
    reward rises while the gold colour-match falls, and the guard stops the run."""
    run_dir = run_training(rl_config(tmp_path, "grpo", max_steps=40, objective__clip_range=0.5, objective__kl_coef=0.0,
                                     optim__lr=3e-2, online__rewards=["jpeg-incompressibility"],
                                     online__hacking_patience=1, online__hacking_tolerance=0.05))
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert "reward hacking" in stopped["reason"]
    last = metrics(run_dir)[-1]
    assert last["hacking_stop"] == 1.0 and last["gold_drop"] > 0.05
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    first = metrics(run_dir)[0]
    assert last["reward/jpeg-incompressibility"] > first["reward/jpeg-incompressibility"]


@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_full_fine_tuning_keeps_a_frozen_base_and_old_policy(tmp_path, method):
    """finetune=full: the KL's base and NFT's v_old are frozen copies; the first round's KL is 0 (the
    policy is the base), the UNet moves, and the export is a whole UNet."""
    run_dir = run_training(rl_config(tmp_path, method, finetune="full", max_steps=2, optim__lr=1e-4))
    first, second = metrics(run_dir)
    assert first["kl"] == 0.0 and second["kl"] > 0
    if method == "nft":  # v_old is the round's sampling policy: at the first step the policy itself
        assert first["old_deviation"] == 0.0
    from diffusers import UNet2DConditionModel

    from diffpo.models.loading import resolve_source

    trained = UNet2DConditionModel.from_pretrained(run_dir / "final" / "unet")
    base = UNet2DConditionModel.from_pretrained(resolve_source("tiny"), subfolder="unet")
    moved = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert any(moved)


def test_shared_initial_noise_gives_a_group_one_x_T_and_distinct_samples(tmp_path):
    """online.share_initial_noise (DanceGRPO): the G samples of a group start from one x_T and differ
    only through the sampler's noise; groups of different prompts start from different x_T."""
    from diffpo.serialization import load_state_file

    run_dir = run_training(rl_config(tmp_path, "grpo", max_steps=1, online__share_initial_noise=True))
    stored = load_state_file(run_dir / "rounds" / "round-0000" / "samples-p0.safetensors")
    x_T = stored["latents"][0].view(2, 4, -1)  # (prompts, G, latent dims)
    assert torch.equal(x_T[0], x_T[0, :1].expand_as(x_T[0])) and torch.equal(x_T[1], x_T[1, :1].expand_as(x_T[1]))
    assert not torch.equal(x_T[0, 0], x_T[1, 0])
    final = stored["final"].view(2, 4, -1)
    assert (final[:, 0] - final[:, 1]).abs().amax(dim=1).min() > 1e-3  # the eta noise separates the group


def test_rl_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="gold reward is one the run never trains on"):
        rl_config(tmp_path, "grpo", online__gold_rewards=["jpeg-compressibility"])
    with pytest.raises(ConfigError, match="one weight per reward"):
        rl_config(tmp_path, "grpo", online__reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="needs a stochastic sampler"):
        run_training(rl_config(tmp_path, "grpo", online__eta=0.0))
    with pytest.raises(ConfigError, match="G identical samples per group"):
        run_training(rl_config(tmp_path, "nft", online__share_initial_noise=True))
    with pytest.raises(ConfigError, match="exceeds the 8 samples"):
        run_training(rl_config(tmp_path, "nft", train_batch_size=16))


WORKER = """
import json, sys, torch
from accelerate import Accelerator
from diffpo.rewards.combine import combine
from diffpo.trainers.grpo import gather_groups
accelerator = Accelerator(cpu=True)
generator = torch.Generator().manual_seed(0)
table = {"a": torch.randn(3, 4, generator=generator), "b": torch.rand(3, 4, generator=generator)}
n, p = accelerator.num_processes, accelerator.process_index
local = {k: v[:, p * 4 // n:(p + 1) * 4 // n] for k, v in table.items()}   # this process's share of each group
gathered = {k: gather_groups(accelerator, v) for k, v in local.items()}
advantages = combine(gathered, {"a": 1.0, "b": 0.5})
json.dump({"gathered": {k: v.tolist() for k, v in gathered.items()}, "advantages": advantages.tolist()},
          open(sys.argv[1] + f"-{n}-{p}.json", "w"))
accelerator.wait_for_everyone()
accelerator.end_training()  # tear the process group down before exit: gloo aborts a rank left holding it
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_group_statistics_over_two_processes_equal_one_process(tmp_path):
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun is not installed next to {sys.executable}")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for n in (1, 2):
        result = subprocess.run([str(TORCHRUN), "--nproc_per_node", str(n), "--master_addr", "127.0.0.1", "--master_port",
                                 str(_free_port()), str(script), str(tmp_path / "out")],
                                capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "out-1-0.json").read_text())
    for rank in (0, 1):
        two = json.loads((tmp_path / f"out-2-{rank}.json").read_text())
        assert two == one  # the same tables and the same advantages, bit for bit, on every process
    from diffpo.rewards.combine import combine

    generator = torch.Generator().manual_seed(0)
    table = {"a": torch.randn(3, 4, generator=generator), "b": torch.rand(3, 4, generator=generator)}
    assert one["advantages"] == combine(table, {"a": 1.0, "b": 0.5}).tolist()


@pytest.mark.slow
def test_grpo_runs_on_two_processes_with_whole_groups(tmp_path):
    """``torchrun --nproc_per_node 2 -m diffpo train``: each process samples 2 of every group's 4
    samples; the gathered score tables hold whole groups of 4."""
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun is not installed next to {sys.executable}")
    config = rl_config(tmp_path, "grpo", max_steps=2, train_batch_size=2)
    path = tmp_path / "grpo.yaml"
    save_config(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                             str(_free_port()), "-m", "diffpo", "train", str(path)],
                            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(config.output_dir)
    scores = json.loads((run_dir / "rounds" / "round-0000" / "scores.json").read_text())
    assert [len(row) for row in scores["jpeg-compressibility"]] == [4, 4]
    assert (run_dir / "rounds" / "round-0000" / "samples-p1.safetensors").is_file()
    first = metrics(run_dir)[0]
    assert first["ratio_deviation"] < 1e-5 and abs(first["advantage_mean"]) < 1e-6
