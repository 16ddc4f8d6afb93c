"""``diffpo quickstart`` end to end on the bundled model, with its default config."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=1800)  # minutes alone; a busy shared machine can triple it
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_quickstart_moves_the_reward_with_a_high_win_rate(quickstart_run):
    out, result = quickstart_run
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["reward"] == "jpeg-compressibility"
    before, after = summary["reward_before"], summary["reward_after"]
    assert after["mean"] > before["mean"]
    assert after["ci95"][0] > before["mean"]
    assert summary["win_rate"]["ci95"][0] > 0.6
    # still the captioned shapes, not noise: the colour check must not drop
    colours = summary["checks"]["colour-match"]
    assert colours["after"]["mean"] > colours["before"]["mean"] - 0.05
    assert "win rate" in result.stdout


def test_quickstart_writes_what_it_did(quickstart_run):
    from PIL import Image

    out, _ = quickstart_run
    for name in ("config.yaml", "pairs.parquet", "before_after.png", "train/config.yaml", "train/metrics.jsonl",
                 "train/final/pytorch_lora_weights.safetensors"):
        assert (out / name).is_file(), name
    assert Image.open(out / "before_after.png").size[0] > 0
    import pandas as pd

    pairs = pd.read_parquet(out / "pairs.parquet")
    assert {"jpg_0", "jpg_1", "label_0", "caption"} <= set(pairs.columns)
    assert (pairs.reward_0 >= pairs.reward_1).all()
    # held out means held out: the headline captions were never in a training pair
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions["heldout"]) == 30 and len(captions["train"]) == 60
    assert set(pairs.caption) == set(captions["train"]) and not set(captions["heldout"]) & set(pairs.caption)
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["eval_images_per_model"] == 30 * 4 and summary["seen_captions"]["images_per_model"] == 60 * 4
    # every shape is among the held-out captions, evenly
    from collections import Counter

    from diffpo.data.shapes import parse_caption

    assert set(Counter(parse_caption(c).shape for c in captions["heldout"]).values()) == {10}


@pytest.mark.parametrize("method", ["d3po", "seppo", "dro", "smpo"])
def test_method_quickstart_presets_run_end_to_end(tmp_path, method):
    """The method's preset (configs/quickstart_<method>.yaml) is picked by `method=`; shortened here
    to a few steps, it trains, evaluates and writes its report (the full runs are the slow tests)."""
    out = tmp_path / method
    short = ["train.max_steps=2", "eval_seeds_per_prompt=1", "eval_steps=4", "sample_steps=4", "num_prompts=4",
             "train.online.prompts_per_round=2", "train.train_batch_size=4", "train.online.replay_batch_size=4"]
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", f"method={method}", f"output_dir={out}", *short],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["method"] == method and summary["train_steps"] == 2
    saved = (out / "train" / "config.yaml").read_text()
    assert f"method: {method}" in saved
    preset = {"d3po": "beta: 0.1", "seppo": "pool_every: 10", "dro": "margin: 0.01", "smpo": "score_low: -1.5"}[method]
    assert preset in saved  # the preset, not the DPO default
    assert (out / "report" / "index.html").is_file() and (out / "train" / "final" / "diffpo.json").is_file()
    captions = json.loads((out / "captions.json").read_text())
    if method == "d3po":  # the rounds draw their prompts from the training captions only
        round_file = out / "train" / "rounds" / "round-0000" / "round.json"
        assert round_file.is_file() and not (out / "pairs.parquet").exists()
        assert set(json.loads(round_file.read_text())["prompts"]) <= set(captions["train"])
    elif method == "smpo":  # all pairs of each caption's 4 samples, with both rewards for the soft labels
        import pandas as pd

        pairs = pd.read_parquet(out / "pairs.parquet")
        assert {"reward_0", "reward_1"} <= set(pairs.columns) and summary["pairs"] == len(pairs) > 4
    else:  # winners / experts: the best of each caption's samples
        assert (out / "pairs.parquet").is_file() and summary["pairs"] == 4
    if method == "seppo":
        assert not (out / "train" / "pool" / "pool.json").exists()  # 2 steps < pool_every: only the base
    if method == "dro":
        assert (out / "train" / "checkpoints" / "step-2" / "replay_buffer-p0.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method,measured", [("d3po", "0.681 [0.614, 0.742], ~5 min"), ("dro", "0.692 [0.613, 0.771] on held-out captions, ~11 min"),
                                             ("smpo", "0.758 [0.683, 0.833] on held-out captions, ~13 min"), ("seppo", "0.617 [0.547, 0.683], ~3 min")])
def test_online_quickstart_moves_the_reward_with_a_high_win_rate(tmp_path, method, measured):
    """The shipped preset of an online method, full length on 2 CPU cores (measured: ``measured``)."""
    out = tmp_path / method
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", f"method={method}", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["reward_after"]["mean"] > summary["reward_before"]["mean"]
    assert summary["win_rate"]["ci95"][0] > 0.55


def test_flow_candidates_share_x_T_and_differ_only_through_the_flow_sde():
    """Noise level 0 is the pipeline's own Euler sampler (same guidance, text and decoding: equal
    images); at the preset's level the candidates of one x_T differ, and rerunning gives the same."""
    from diffpo.eval.generate import generate, initial_latents
    from diffpo.models.loading import load_stack
    from diffpo.quickstart import QuickstartConfig, _sample_flow_sde

    stack = load_stack("tiny-flow")
    pipe = stack.pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a blue background"] * 2
    x_T = initial_latents([3], stack.family.pipeline_latent_shape(pipe)).repeat(2, 1, 1, 1)
    config = QuickstartConfig(model="flow", sample_steps=3, guidance_scale=5.0, sample_eta=0.0, share_initial_noise=False)
    ode = _sample_flow_sde(config, stack, prompts, x_T)
    reference = generate(pipe, prompts, [3, 3], 3, 5.0, latents=x_T)
    torch.testing.assert_close(ode, reference, atol=2e-3, rtol=0)  # 8-bit-level agreement of decoded pixels
    sde = dict(sample_eta=0.7, share_initial_noise=True)
    first = _sample_flow_sde(dataclasses.replace(config, **sde), stack, prompts, x_T)
    again = _sample_flow_sde(dataclasses.replace(config, **sde), stack, prompts, x_T)
    assert torch.equal(first, again)
    assert (first[0] - first[1]).abs().mean() > 1e-3 and (first[0] - ode[0]).abs().mean() > 1e-3
    # stochastic in the first step only: the candidates still differ, and lie closer to the ODE image
    windowed = _sample_flow_sde(dataclasses.replace(config, sample_window=[0, 1], **sde), stack, prompts, x_T)
    assert (windowed[0] - windowed[1]).abs().mean() > 1e-3
    assert (windowed - ode).abs().mean() < (first - ode).abs().mean()


def test_video_seppo_quickstart_preset_picks_deterministic_winners_and_attention_lora(tmp_path):
    """``diffpo quickstart model=video method=seppo`` picks ``quickstart_seppo_video.yaml``: each caption's
    winner is the best of its 8 own-x_T DDIM clips, the pool references sample clips of the winners' shape,
    and the LoRA covers attention only; shortened here to two steps."""
    import pandas as pd
    import yaml

    from diffpo.quickstart import default_config_path

    assert default_config_path("seppo", "video").name == "quickstart_seppo_video.yaml"
    out = tmp_path / "seppo-video"
    short = ["train.max_steps=2", "eval_seeds_per_prompt=1", "eval_steps=2", "sample_steps=2", "num_prompts=2",
             "heldout_prompts=2", "eval_seen_prompts=2", "train.train_batch_size=2", "train.online.num_inference_steps=2"]
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", "model=video", "method=seppo",
                             f"output_dir={out}", *short], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["method"] == "seppo" and summary["pairs"] == 2  # one winner per training caption
    saved = yaml.safe_load((out / "train" / "config.yaml").read_text())
    assert saved["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"] and saved["ema"]["enabled"] is False
    assert saved["data"]["num_frames"] == 4
    quickstart = yaml.safe_load((out / "config.yaml").read_text())
    assert quickstart["sample_eta"] == 0.0 and quickstart["share_initial_noise"] is False
    assert quickstart["samples_per_prompt"] == 8  # best of 8 (best of 4 measured 0.484: no gain)
    winners = pd.read_parquet(out / "pairs.parquet")
    assert len(winners) == 2
