"""GRPO and DiffusionNFT on video models: the bundled AnimateDiff model (``tiny-video``, DDIM with
eta, the whole-clip ``motion-match`` reward) and a tiny Wan2.1 pipeline built in code (flow SDE with
a window, an image reward averaged over frames). On each: the first step is on-policy (ratio 1, KL
0, the recomputed log-probabilities equal the sampling-time ones), the score tables are per caption
group, NFT starts at its old policy, and the exported LoRA loads with the pipeline's own
``load_lora_weights`` into a denoiser equal to the trained one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffpo.config import ConfigError, TrainConfig, from_dict
from diffpo.trainers import run_training

ANIMATEDIFF_FRAMES = 4  # the bundled model's clips (32 px)
WAN_FRAMES = 5  # 4k + 1: two latent frames


@pytest.fixture(scope="module")
def motion_prompts(tmp_path_factory) -> str:
    """Two captions of the moving-shapes world (motion-match scores those only)."""
    from diffpo.data.moving_shapes import motion_captions

    path = tmp_path_factory.mktemp("prompts") / "captions.txt"
    path.write_text("\n".join(motion_captions(2, seed=1)) + "\n")
    return str(path)


def video_config(tmp_path, method: str, model: str, prompts: str, frames: int, **sections) -> TrainConfig:
    """Two captions x a group of 4 clips, batch 2: two optimizer steps per round."""
    data = {
        "method": method, "output_dir": str(tmp_path / method), "max_steps": 2, "train_batch_size": 2, "log_every": 1,
        "progress_bar": False, "checkpoint_every": 1, "model": {"pretrained": model},
        "data": {"num_frames": frames}, "objective": {"clip_range": 0.2, "kl_coef": 0.04}, "optim": {"lr": 1e-2},
        "online": {"prompts": prompts, "prompts_per_round": 2, "samples_per_prompt": 4, "num_inference_steps": 3,
                   "timestep_fraction": 1.0, "eta": 0.0 if method == "nft" else 1.0, "save_images": True,
                   "rewards": ["motion-match"], "gold_rewards": ["colour-match"]},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return from_dict(TrainConfig, data)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wan_config(tmp_path, method: str, model: str, prompts: str, **sections) -> TrainConfig:
    online = {"rewards": ["jpeg-compressibility"], "gold_rewards": [], "eta": 1.0,  # (DDIM's eta: unused on flow models)
              "sampler": {"name": "ode"} if method == "nft" else {"name": "flow_sde", "window": [0, 2]}}
    online.update(sections.pop("online", {}))
    return video_config(tmp_path, method, model, prompts, WAN_FRAMES, data={"num_frames": WAN_FRAMES, "resolution": 32},
                        online=online, **sections)


# ---- the round: 5-D trajectories, per-caption groups, on-policy log-probabilities ------------------


def _check_round(run_dir, config: TrainConfig, frames: int, latent_frames: int):
    """The stored trajectories are 5-D; re-scoring their steps under the *base* model (what the policy
    is before its first update) gives the sampling-time log-probabilities; every row of the score
    table is one caption's group, scored on that caption."""
    from diffpo.data import rounds
    from diffpo.kernel.samplers import SampledTrajectory
    from diffpo.models.families import TextEmbeddings
    from diffpo.models.loading import load_stack
    from diffpo.rewards import load as load_reward
    from diffpo.serialization import load_state_file
    from diffpo.trainers.common import build_sampler

    folder = rounds.round_dir(run_dir, 0)
    stored = load_state_file(folder / "samples-p0.safetensors")
    manifest = rounds.read_manifest(folder)
    prompts, g = manifest.prompts, manifest.samples_per_prompt
    assert stored["prompts"] == [p for p in prompts for _ in range(g)]
    trajectory = SampledTrajectory.from_state_dict(stored)
    n = len(stored["prompts"])
    assert trajectory.final.ndim == 5 and trajectory.final.shape[0] == n and trajectory.final.shape[2] == latent_frames

    stack = load_stack(config.model.pretrained)
    sampler = build_sampler(config.online.sampler, stack, config.online.eta)
    text = stack.encode_prompts(stored["prompts"])
    empty = stack.encode_prompts([""])
    uncond = stack.family.unet_conditioning(TextEmbeddings(empty.hidden.expand(n, -1, -1)))
    samples = torch.arange(n)
    for step in trajectory.steps:
        with torch.no_grad():
            out = sampler.rescore_step(stack.denoiser(), trajectory, step.repeat(n), samples,
                                       stack.family.unet_conditioning(text), uncond, config.online.guidance_scale)
        torch.testing.assert_close(out.log_prob, trajectory.recorded_log_probs(step.repeat(n), samples), atol=1e-5, rtol=0)

    clips = stack.decode_latents(trajectory.final)
    assert clips.shape[:3] == (n, frames, 3)
    tables = json.loads((folder / "scores.json").read_text())
    for name in config.online.rewards:
        table = torch.tensor(tables[name])
        assert table.shape == (len(prompts), g)
        # row j holds the G clips sampled for caption j, scored against caption j
        torch.testing.assert_close(table.flatten(), load_reward(name)(clips, stored["prompts"]), atol=1e-5, rtol=0)
    images = [name for group in manifest.images for name in group]
    assert len(images) == n and all((folder / name).is_file() and name.endswith(".gif") for name in images)
    return tables


def _first_grpo_step(run_dir):
    first, second = metrics(run_dir)[:2]
    # before the first update the policy is the sampler (ratio 1) and the base (LoRA B = 0: KL 0)
    assert first["ratio_deviation"] < 1e-5 and first["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["kl"] == 0.0 and first["loss"] == pytest.approx(first["policy_loss"])
    assert abs(first["advantage_mean"]) < 1e-6
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"]) and second["kl"] > 0
    return first


def _first_nft_step(run_dir):
    first, second = metrics(run_dir)[:2]
    assert first["positive_error"] == pytest.approx(first["negative_error"], rel=1e-6)  # theta = v_old
    assert first["old_deviation"] == 0.0 and first["kl"] == 0.0
    assert math.isfinite(second["loss"]) and second["old_deviation"] > 0


def _trained_lora_denoiser(model: str, run_dir, config: TrainConfig):
    """The base denoiser with the run's last LoRA checkpoint: the policy as training left it."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from diffpo.models.loading import load_stack
    from diffpo.models.lora import attach_lora

    stack = load_stack(model)
    attach_lora(stack.unet, config.lora.rank, None, 0.0, config.lora.target_modules, config.lora.part, stack.family)
    checkpoint = sorted((Path(run_dir) / "checkpoints").glob("step-*"))[-1]
    set_peft_model_state_dict(stack.unet, load_file(checkpoint / "lora_adapter.safetensors"))
    return stack


def _check_export(model: str, run_dir, config: TrainConfig, x: torch.Tensor, pipeline_class):
    """``pipeline_class.load_lora_weights(final/)`` gives a denoiser equal to the trained one, and
    different from the base one (the LoRA moved)."""
    from diffpo.models.loading import load_stack

    trained = _trained_lora_denoiser(model, run_dir, config)
    source = trained.source
    pipe = pipeline_class.from_pretrained(source)
    pipe.load_lora_weights(str(Path(run_dir) / "final"))
    denoiser = getattr(pipe, trained.family.denoiser_attr)
    assert {n for n, m in denoiser.named_modules() if hasattr(m, "lora_A")} == {
        n for n, m in trained.unet.named_modules() if hasattr(m, "lora_A")}
    cond = trained.family.unet_conditioning(trained.encode_prompts(["a red circle moving left on a blue background"] *
                                                                   x.shape[0]))
    t = torch.tensor([300.0, 700.0])[: x.shape[0]]
    with torch.no_grad():
        from_pipeline = trained.family.denoiser(denoiser)(x, t, cond)
        policy = trained.denoiser()(x, t, cond)
        base = load_stack(model).denoiser()(x, t, cond)
    torch.testing.assert_close(from_pipeline, policy, atol=1e-5, rtol=0)
    assert (policy - base).abs().max() > 1e-4


# ---- the bundled AnimateDiff model ---------------------------------------------------------------


def test_grpo_on_the_bundled_video_model_with_a_whole_clip_reward(tmp_path, motion_prompts):
    from diffusers import AnimateDiffPipeline

    config = video_config(tmp_path, "grpo", "tiny-video", motion_prompts, ANIMATEDIFF_FRAMES,
                          online={"sampler": {"on_policy_tolerance": 1e-5}})
    run_dir = run_training(config)
    first = _first_grpo_step(run_dir)
    assert "reward/motion-match" in first and "reward/colour-match" in first  # whole-clip and per-frame heads
    tables = _check_round(run_dir, config, ANIMATEDIFF_FRAMES, ANIMATEDIFF_FRAMES)
    assert torch.tensor(tables["motion-match"]).std(dim=1).min() > 0  # every group has something to rank
    assert first["advantage_std"] == pytest.approx(1.0, abs=0.01)  # normalised within each caption's group
    x = torch.randn(2, 4, ANIMATEDIFF_FRAMES, 16, 16, generator=torch.Generator().manual_seed(5))
    _check_export("tiny-video", run_dir, config, x, AnimateDiffPipeline)


def test_nft_on_the_bundled_video_model(tmp_path, motion_prompts):
    config = video_config(tmp_path, "nft", "tiny-video", motion_prompts, ANIMATEDIFF_FRAMES)
    run_dir = run_training(config)
    _first_nft_step(run_dir)
    from diffpo.data import rounds
    from diffpo.serialization import load_state_file

    final = load_state_file(rounds.round_dir(run_dir, 0) / "samples-p0.safetensors")["final"]
    assert final.shape == (8, 4, ANIMATEDIFF_FRAMES, 16, 16)
    assert (rounds.round_dir(run_dir, 0) / "old_policy.safetensors").is_file()


# ---- a tiny Wan2.1 pipeline (flow matching, causal 3-D VAE) ----------------------------------------


@pytest.mark.parametrize("method", ["grpo", "ddpo"])
def test_grpo_and_ddpo_on_wan_with_the_flow_sde_window(tmp_path, tiny_wan_dir, motion_prompts, method):
    """DDPO: the same loss, advantages from the per-prompt stat tracker (here below its minimum count:
    normalised over the round)."""
    from diffusers import WanPipeline

    config = wan_config(tmp_path, method, tiny_wan_dir, motion_prompts)
    run_dir = run_training(config)
    _first_grpo_step(run_dir)
    _check_round(run_dir, config, WAN_FRAMES, 2)
    stored = json.loads((Path(run_dir) / "final" / "diffpo.json").read_text())
    assert stored["pipeline_class"] == "WanPipeline"
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    _check_export(tiny_wan_dir, run_dir, config, x, WanPipeline)


def test_nft_on_wan(tmp_path, tiny_wan_dir, motion_prompts):
    from diffusers import WanPipeline

    config = wan_config(tmp_path, "nft", tiny_wan_dir, motion_prompts)
    run_dir = run_training(config)
    _first_nft_step(run_dir)
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    _check_export(tiny_wan_dir, run_dir, config, x, WanPipeline)


# ---- ModelScope text-to-video (UNet3DConditionModel: full fine-tuning only) ---------------------------


def test_grpo_fully_fine_tunes_a_modelscope_unet3d(tmp_path, motion_prompts):
    """No LoRA in diffusers for ``UNet3DConditionModel``: the KL's base is a frozen copy, the first step
    is on-policy with KL 0, the UNet moves and exports whole."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    from diffpo.models.tiny import build_tiny_text_to_video_components

    model = tmp_path / "tiny-t2v"
    TextToVideoSDPipeline(**build_tiny_text_to_video_components(seed=0)).save_pretrained(model)
    config = video_config(tmp_path, "grpo", str(model), motion_prompts, ANIMATEDIFF_FRAMES, finetune="full",
                          optim={"lr": 1e-4}, online={"rewards": ["jpeg-compressibility"], "gold_rewards": []})
    run_dir = run_training(config)
    _first_grpo_step(run_dir)
    _check_round(run_dir, config, ANIMATEDIFF_FRAMES, ANIMATEDIFF_FRAMES)
    trained = UNet3DConditionModel.from_pretrained(run_dir / "final" / "unet")
    base = UNet3DConditionModel.from_pretrained(model, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))


# ---- what is still refused -------------------------------------------------------------------------


def test_video_settings_that_do_not_fit_are_one_line_errors(tmp_path, tiny_wan_dir, motion_prompts):
    with pytest.raises(ConfigError, match=r"is a video model \(AnimateDiffPipeline\): set data.num_frames"):
        run_training(video_config(tmp_path, "grpo", "tiny-video", motion_prompts, None))
    with pytest.raises(ConfigError, match=r"reward 'motion-match' scores whole clips .* is an image model: use a video "
                                          r"model or an image reward$"):
        run_training(video_config(tmp_path, "grpo", "tiny", motion_prompts, None))
    with pytest.raises(ConfigError, match=r"data.num_frames=4: the Wan VAE takes 4k\+1 frames .*use 5$"):
        run_training(video_config(tmp_path, "grpo", tiny_wan_dir, motion_prompts, 4,
                                  data={"num_frames": 4, "resolution": 32}, online={"sampler": {"name": "flow_sde"}}))


# ---- the quickstart preset ---------------------------------------------------------------------------


@pytest.mark.slow
def test_video_grpo_quickstart_preset_runs_end_to_end(tmp_path):
    """``diffpo quickstart model=video method=grpo`` picks ``quickstart_grpo_video.yaml`` (motion-match
    trained, colour-match gold, clips of 4 frames), shortened here."""
    import subprocess
    import sys

    import yaml

    from diffpo.quickstart import default_config_path

    assert default_config_path("grpo", "video").name == "quickstart_grpo_video.yaml"
    out = tmp_path / "grpo-video"
    short = ["train.max_steps=1", "eval_seeds_per_prompt=1", "eval_steps=2", "sample_steps=4", "num_prompts=2",
             "heldout_prompts=4", "eval_seen_prompts=2", "samples_per_prompt=2", "train.online.prompts_per_round=2",
             "train.train_batch_size=4", "train.online.sampler.window=[0,2]"]
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", "model=video", "method=grpo",
                             f"output_dir={out}", *short], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["method"] == "grpo" and summary["reward"] == "motion-match" and "temporal_consistency" in summary
    saved = yaml.safe_load((out / "train" / "config.yaml").read_text())
    assert saved["data"]["num_frames"] == ANIMATEDIFF_FRAMES and saved["online"]["rewards"] == ["motion-match"]
    assert saved["online"]["gold_rewards"] == ["colour-match"]
    first = json.loads((out / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ratio_deviation"] < 1e-4 and "reward/motion-match" in first
    assert (out / "before_after.gif").is_file()
