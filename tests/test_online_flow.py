"""The online loop on the bundled tiny flow model (an SD3 transformer): D3PO with each stochastic
flow sampler, SePPO and Diffusion-DRO sampling through the sampler layer, the on-policy ratio check,
and one-line errors for a sampler that does not fit the model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffpo.config import ConfigError, TrainConfig, from_dict
from diffpo.trainers import run_training


def flow_config(tmp_path, method: str, sampler: dict | None = None, model: str = "tiny-flow", max_steps: int = 2,
                resume_from: str | None = None, **sections) -> TrainConfig:
    data = {
        "method": method, "output_dir": str(tmp_path / method), "max_steps": max_steps, "resume_from": resume_from, "train_batch_size": 2,
        "log_every": 1, "progress_bar": False, "model": {"pretrained": model},
        "objective": {"beta": 0.1 if method == "d3po" else 2000.0}, "optim": {"lr": 1e-3, "max_grad_norm": None},
        "online": {"prompts_per_round": 2, "samples_per_prompt": 2, "num_inference_steps": 3,
                   "rewards": ["jpeg-compressibility"], "sampler": sampler or {}},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(TrainConfig, data)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_b_moved(run_dir) -> bool:
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "final" / "pytorch_lora_weights.safetensors"))
    return any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("sampler", [{"name": "flow_sde", "on_policy_tolerance": 1e-6}, {"name": "dance_sde"},
                                     {"name": "cps", "noise_level": 0.8, "window": [0, 2]}])
def test_d3po_trains_a_flow_model_with_each_stochastic_sampler(tmp_path, sampler):
    from diffpo.data import rounds
    from diffpo.serialization import load_state_file

    run_dir = run_training(flow_config(tmp_path, "d3po", sampler))
    first, second = metrics(run_dir)
    # policy == reference at the first step: the per-step DPO loss is log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["log_ratio_w"] == 0.0 and math.isfinite(second["loss"])
    assert lora_b_moved(run_dir)
    stored = load_state_file(rounds.round_dir(run_dir, 0) / "trajectories-p0.safetensors")
    assert stored["sampler"] == sampler["name"]
    expected_steps = [0, 1] if sampler["name"] == "cps" else [0, 1, 2]  # the window [0, 2); CPS's last step is never recorded
    assert stored["steps"].tolist() == expected_steps and stored["log_probs"].shape == (len(expected_steps), 4)
    if "on_policy_tolerance" in sampler:  # fp32: re-scoring with the sampling weights reproduces sampling exactly
        assert first["on_policy_ratio_error"] <= 1e-6


def test_seppo_and_dro_run_on_a_flow_model(tmp_path, shapes_parquet):
    for method in ("seppo", "dro"):
        config = flow_config(tmp_path, method, data={"source": shapes_parquet})
        run_dir = run_training(config)
        first = metrics(run_dir)[0]
        assert math.isfinite(first["loss"]) and lora_b_moved(run_dir)
        if method == "seppo":  # policy == the pool's base at the first step
            assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        else:  # the lagged copy equals the policy: its stored predictions are the policy's, the loss the margin
            assert first["negative_err"] == pytest.approx(0.0, abs=1e-10)


def test_a_sampler_that_does_not_fit_the_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="^online.sampler.name=flow_sde: sampler 'flow_sde' does not fit a DDPM model: "
                                          "use one of ddim \\(StableDiffusionPipeline is a DDPM model\\)$"):
        run_training(flow_config(tmp_path, "d3po", {"name": "flow_sde"}, model="tiny"))
    with pytest.raises(ConfigError, match="does not fit a rectified-flow model: use one of flow_sde, dance_sde, cps, ode"):
        run_training(flow_config(tmp_path, "d3po", {"name": "ddim"}))
    with pytest.raises(ConfigError, match="needs a stochastic sampler"):
        run_training(flow_config(tmp_path, "d3po", {"name": "ode"}))
    with pytest.raises(ConfigError, match="online.eta=0.5 is DDIM's eta"):
        run_training(flow_config(tmp_path, "d3po", online={"eta": 0.5}))
    with pytest.raises(ConfigError, match="window"):
        flow_config(tmp_path, "d3po", {"name": "flow_sde", "window": [3, 1]})


@pytest.mark.slow
def test_d3po_on_a_flow_model_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    straight = run_training(flow_config(tmp_path / "a", "d3po", {"name": "flow_sde", "window": [1, 3]}, max_steps=4))
    first = flow_config(tmp_path / "b", "d3po", {"name": "flow_sde", "window": [1, 3]}, max_steps=2)
    run_training(first)
    resumed = run_training(flow_config(tmp_path / "b", "d3po", {"name": "flow_sde", "window": [1, 3]}, max_steps=4,
                                       resume_from="latest"))
    a = load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_d3po_on_a_unet_trains_only_the_ddim_window(tmp_path):
    from diffpo.data import rounds
    from diffpo.serialization import load_state_file

    run_dir = run_training(flow_config(tmp_path, "d3po", {"window": [1, 3], "on_policy_tolerance": 1e-6}, model="tiny",
                                       online={"num_inference_steps": 4}))
    first = metrics(run_dir)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["on_policy_ratio_error"] <= 1e-6
    stored = load_state_file(rounds.round_dir(run_dir, 0) / "trajectories-p0.safetensors")
    assert stored["sampler"] == "ddim" and stored["noise_level"] == 1.0 and stored["steps"].tolist() == [1, 2]


def test_seppo_samples_wan_clips_with_the_flow_sde(tmp_path, tiny_wan_dir):
    """A video flow model (tiny Wan2.1): the pool reference samples 5-D (B, C, F, h, w) latents with flow_sde."""
    from diffpo.data.moving_shapes import sample_moving_shapes
    from diffpo.data.writer import write_pairs_parquet

    clips = sample_moving_shapes(8, size=32, frames=5, seed=3)
    pairs = [{"image_0": clips[2 * i][0], "image_1": clips[2 * i + 1][0], "label_0": float(i % 2), "caption": clips[2 * i][1]}
             for i in range(4)]
    data = str(write_pairs_parquet(tmp_path / "pairs.parquet", pairs))
    config = flow_config(tmp_path, "seppo", model=tiny_wan_dir, max_steps=1, online={"num_inference_steps": 2},
                         data={"source": data, "resolution": 32, "num_frames": 5})
    first = metrics(run_training(config))[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
