"""VideoAlign's VideoReward on tiny random-weight releases in KwaiVGI/VideoReward's layout.

Layout (diffpo.rewards.tiny_qwen2vl.save_tiny_video_reward, after VideoAlign's utils.py
``load_model_from_checkpoint`` and train_reward.py): ``model_config.json`` with data_config /
model_config / peft_lora_config / inference_config, and ``checkpoint-<step>/`` holding either
``model.pth`` or peft's ``adapter_model.safetensors`` + ``non_lora_state_dict.pth`` (names under
``base_model.model.``) over the base model. The head is ``Qwen2VLRewardModelBT.rm_head``,
``nn.Linear(hidden, 3, bias=False)``, read at <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> with the
diagonal taken (output_dim 3). The reference merges the LoRA by hand and runs transformers' own
``Qwen2VLModel`` on the processor's video inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffpo.rewards import REWARDS, load
from diffpo.rewards.video_reward import release_prompt

PIXELS = 4 * 28 * 28
PROMPTS = ["a red ball rolls to the left", "a cat"]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    from diffpo.rewards.tiny_qwen2vl import save_tiny_video_reward

    root = tmp_path_factory.mktemp("videoreward")
    return {"lora": save_tiny_video_reward(root / "lora", lora=True), "full": save_tiny_video_reward(root / "full", lora=False)}


def kwargs(folder, **extra):
    return dict(path=str(folder), arch=str(folder), processor_path=str(folder / "processor"), min_pixels=PIXELS, **extra)


def videos(n=2, frames=4, size=32, seed=0):
    noise = torch.rand(n * frames, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False).view(n, frames, 3, size, size)


def merged_release_state(folder):
    """Every weight of the tiny release with its LoRA merged by hand (W + alpha/r * B @ A)."""
    from safetensors.torch import load_file

    settings = json.loads((folder / "model_config.json").read_text())
    if (folder / "checkpoint-10" / "model.pth").exists():
        return torch.load(folder / "checkpoint-10" / "model.pth", weights_only=True), settings
    state = load_file(folder / "base" / "model.safetensors")
    state.update({k[len("base_model.model."):]: v for k, v in
                  torch.load(folder / "checkpoint-10" / "non_lora_state_dict.pth", weights_only=True).items()})
    adapter = load_file(folder / "checkpoint-10" / "adapter_model.safetensors")
    scale = settings["peft_lora_config"]["lora_alpha"] / settings["peft_lora_config"]["lora_r"]
    for key in [k for k in adapter if "lora_A" in k]:
        target = key[len("base_model.model."):].replace(".lora_A.weight", ".weight")
        state[target] = state[target] + scale * adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
    return state, settings


def reference(folder, clips, prompts):
    import torchvision.transforms.functional as TF
    from transformers import AutoProcessor, Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    state, settings = merged_release_state(folder)
    config = Qwen2VLConfig.from_pretrained(folder)
    model = Qwen2VLModel(config).eval()
    renamed = {("language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in state.items() if not k.startswith(("rm_head.", "lm_head."))}
    model.load_state_dict(renamed, strict=True)
    processor = AutoProcessor.from_pretrained(folder / "processor")
    tokens = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
    processor.tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    ids = processor.tokenizer.convert_tokens_to_ids(tokens)
    stats = settings["inference_config"]
    rows = []
    for clip, prompt in zip(clips, prompts):
        frames = TF.resize((clip * 255).round(), [56, 56], TF.InterpolationMode.BICUBIC, antialias=True)  # 32 px -> 4 x 28 x 28 pixels
        text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|video_pad|><|vision_end|>" + release_prompt(prompt) + "<|im_end|>\n<|im_start|>assistant\n")
        batch = processor(text=[text], videos=[frames], return_tensors="pt", videos_kwargs={"do_rescale": True})
        positions = torch.arange(batch["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                           pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"]).last_hidden_state[0]
        row = {}
        for k, (name, token) in enumerate(zip(("VQ", "MQ", "TA"), ids)):
            value = hidden[batch["input_ids"][0] == token][0] @ state["rm_head.weight"][k]  # the diagonal
            row[name] = (value - stats[f"{name}_mean"]) / stats[f"{name}_std"]
        row["overall"] = row["VQ"] + row["MQ"] + row["TA"]
        rows.append(row)
    return {name: torch.stack([r[name] for r in rows]) for name in ("VQ", "MQ", "TA", "overall")}


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_video_reward_dimensions_equal_the_release_forward(releases, layout):
    folder = releases[layout]
    clips = videos()
    expected = reference(folder, clips, PROMPTS)
    head = load("video-reward", **kwargs(folder))
    scores = head.scores(clips, PROMPTS)
    for name in ("VQ", "MQ", "TA", "overall"):
        assert torch.allclose(scores[name], expected[name], atol=1e-4), name
    assert torch.allclose(head(clips, PROMPTS), expected["overall"], atol=1e-4)
    assert (expected["VQ"] - expected["MQ"]).abs().max() > 1e-3  # the three dimensions really differ


def test_video_reward_options_batch_invariance_and_frames(releases):
    folder = releases["lora"]
    clips = videos(3, frames=6, seed=1)
    prompts = PROMPTS + ["waves on a beach at sunset"]
    one = load("video-reward", batch_size=1, **kwargs(folder))
    assert torch.allclose(one(clips, prompts), load("video-reward", batch_size=3, **kwargs(folder))(clips, prompts), atol=1e-4)
    raw = load("video-reward", normalize=False, output="TA", **kwargs(folder))(clips, prompts)
    assert torch.allclose((raw - 0.1) / 2.0, one.scores(clips, prompts)["TA"], atol=1e-4)
    # num_frames=2 samples frames 0 and 5 (linspace, rounded): the same as scoring those frames
    two = load("video-reward", num_frames=2, **kwargs(folder))(clips, prompts)
    assert torch.allclose(two, one(clips[:, [0, 5]], prompts), atol=1e-4)
    with pytest.raises(ValueError, match=r"scores videos \(B, F, 3, H, W\)"):
        one(clips[:, 0], prompts)


def test_video_reward_errors(releases, tmp_path):
    assert "video-reward" in REWARDS and REWARDS["video-reward"].scores_videos
    with pytest.raises(FileNotFoundError, match=r"model_config\.json not found at .*KwaiVGI/VideoReward"):
        load("video-reward", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not downloadable from KwaiVGI/VideoReward"):  # HF_HUB_OFFLINE=1
        load("video-reward")
    folder = releases["lora"]
    with pytest.raises(FileNotFoundError, match=r"base model not found at .*pass base_path="):
        load("video-reward", base_path=str(tmp_path / "no" / "base"), **kwargs(folder))
    with pytest.raises(ValueError, match="output='sum' is unknown"):
        load("video-reward", output="sum", **kwargs(folder))
