"""The bundled tiny Wan2.1-layout video model (``assets/tiny-wan-shapes``): it loads by its short name
through the Wan family at its own size (32 px, 2k+1 frames), it moves its shapes the way the caption
says, and ``diffpo quickstart model=wan`` aligns it to the motion reward end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diffpo.models.loading import load_stack


@pytest.fixture(scope="module")
def wan_stack():
    return load_stack("tiny-wan")


def test_bundled_wan_loads_at_its_own_size_and_frame_rule(wan_stack):
    from diffusers import WanPipeline

    assert wan_stack.family.name == "wan" and wan_stack.is_video
    assert wan_stack.native_resolution == 32  # the transformer config's sample_size (8) x the VAE's 4x
    pipe = wan_stack.pipeline()
    assert isinstance(pipe, WanPipeline)
    assert wan_stack.family.pipeline_latent_shape(pipe, None, 5) == (8, 3, 8, 8)  # 5 frames -> 1 + 4/2 latent frames
    with pytest.raises(ValueError, match=r"num_frames=4: the Wan VAE takes 2k\+1 frames \(1, 3, 5, 7, \.\.\.\): use 5"):
        wan_stack.check_clip(4, 32)
    with pytest.raises(ValueError, match=r"resolution=30 is not a multiple of 4 .* use 32"):
        wan_stack.check_clip(5, 30)


def _clips(pipe, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt=prompts, height=32, width=32, num_frames=5, num_inference_steps=10, guidance_scale=5.0,
               generator=generators, output_type="pt")
    return out.frames.float().clamp(0, 1)


def test_the_caption_direction_decides_which_way_the_shape_moves(wan_stack):
    """Same x_T, captions that differ only in the direction word: the shape must travel further
    along "right" when the caption says right than when it says left (and likewise up / down) in
    nearly every pair, by a wide margin. For a model that ignores the word (the AnimateDiff model: left
    vs right moved its output 100x less than dropping the caption) x_T alone picks the direction."""
    from diffpo.data.moving_shapes import motion_captions, parse_motion_caption
    from diffpo.rewards import load

    pipe = wan_stack.pipeline()
    pipe.set_progress_bar_config(disable=True)
    motion = load("motion-match")
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    captions = motion_captions(16, seed=123)
    flipped = [c.replace(f"moving {parse_motion_caption(c).direction}", f"moving {opposite[parse_motion_caption(c).direction]}")
               for c in captions]
    seeds = list(range(500, 516))
    asked, other = _clips(pipe, captions, seeds), _clips(pipe, flipped, seeds)
    # both clips scored against the first caption's direction: travel that way, in image sides
    along_asked, along_other = motion(asked, captions), motion(other, captions)
    assert torch.isfinite(along_asked).all() and torch.isfinite(along_other).all()
    # measured when it was bundled: 16 of 16 pairs, by 1.03 image sides on average
    assert float((along_asked > along_other).float().mean()) >= 0.9
    assert float((along_asked - along_other).mean()) > 0.5


def test_wan_quickstart_preset_aligns_to_motion_end_to_end(tmp_path):
    """``diffpo quickstart model=wan`` picks ``quickstart_wan.yaml`` (DPO on motion-match pairs of own-x_T ODE
    clips, 5-frame clips of the bundled model), shortened here to two steps, trains and exports."""
    import yaml

    from diffpo.quickstart import default_config_path

    assert default_config_path(model="wan").name == "quickstart_wan.yaml"
    assert default_config_path("grpo", "wan").name == "quickstart_grpo_wan.yaml"
    assert default_config_path("nft", "wan").name == "quickstart_nft_wan.yaml"
    out = tmp_path / "wan"
    short = ["train.max_steps=2", "eval_seeds_per_prompt=1", "eval_steps=2", "sample_steps=2", "num_prompts=2",
             "heldout_prompts=2", "eval_seen_prompts=2", "train.train_batch_size=2", "min_margin=0"]
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", "model=wan", f"output_dir={out}", *short],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["method"] == "diffusion_dpo" and summary["reward"] == "motion-match"
    saved = yaml.safe_load((out / "train" / "config.yaml").read_text())
    assert saved["data"]["num_frames"] == 5 and saved["model"]["pretrained"] == "tiny-wan"
    quickstart = yaml.safe_load((out / "config.yaml").read_text())
    assert quickstart["sample_eta"] == 0.0 and quickstart["share_initial_noise"] is False
    assert (out / "train" / "final").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["diffusion_dpo", "grpo", "nft"])
def test_wan_motion_quickstart_wins_on_held_out_captions(tmp_path, method):
    """``diffpo quickstart model=wan`` (DPO), ``method=grpo`` and ``method=nft`` in full, as a user runs them:
    the aligned model moves the shapes further the captioned way than the base on held-out captions,
    colour kept (measured at seed 0: DPO 0.906 [0.844, 0.958], GRPO 0.964 [0.922, 0.995], NFT 0.922
    [0.865, 0.974]; each 4-7 min on 2 cores)."""
    out = tmp_path / method
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", "model=wan", f"method={method}",
                             f"output_dir={out}"], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["win_rate"]["mean"] > 0.6 and summary["win_rate"]["ci95"][0] > 0.5
    assert summary["reward_after"]["mean"] > summary["reward_before"]["mean"]
    colour = summary["checks"]["colour-match"]
    assert colour["after"]["mean"] >= colour["before"]["ci95"][0]
