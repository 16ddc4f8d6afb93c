"""HPSv3 on a tiny random-weight Qwen2-VL saved as HPSv3.safetensors.

Format (diffpo.rewards.tiny_qwen2vl): the names a transformers 4.4x Qwen2VLForConditionalGeneration
subclass saves (``model.layers.*``, ``visual.*``, ``lm_head.weight``) plus the released head
``rm_head.0/3/5`` (HPSv3's ``Qwen2VLRewardModelBT`` with rm_head_type "ranknet": Linear(hidden,
1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2)), loaded by the release with
``load_state_dict(strict=True)``. The reference is the release's forward written with
transformers' own ``Qwen2VLModel`` (its own image-token scatter) and the head by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffpo.rewards import REWARDS, load
from diffpo.rewards.hps_v3 import INSTRUCTION, RATING_REQUEST

PIXELS = 4 * 28 * 28  # 56 x 56 for square images: 4 visual tokens keep the test fast
PROMPTS = ["a red circle", "a photo of a cat on a long sofa", "a dog", "blue"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffpo.rewards.tiny_qwen2vl import save_tiny_hps_v3

    return save_tiny_hps_v3(tmp_path_factory.mktemp("hpsv3"))


def kwargs(folder, **extra):
    return dict(path=str(folder), arch=str(folder), processor_path=str(folder / "processor"), pixels=PIXELS, **extra)


def reference(folder, images, prompts):
    """(mu, sigma) per image, one image at a time (no padding), as the release computes them."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    state = load_file(folder / "HPSv3.safetensors")
    config = Qwen2VLConfig.from_pretrained(folder)
    model = Qwen2VLModel(config).eval()
    renamed = {("language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in state.items() if not k.startswith(("rm_head.", "lm_head."))}
    model.load_state_dict(renamed, strict=True)
    processor = AutoProcessor.from_pretrained(folder / "processor")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    reward_id = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    side = round(math.sqrt(PIXELS) / 28) * 28  # square inputs: smart_resize gives side x side
    out = []
    for image, prompt in zip(images, prompts):
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).resize((side, side), Image.BICUBIC)
        text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>" + INSTRUCTION.format(text_prompt=prompt) + RATING_REQUEST +
                "<|im_end|>\n<|im_start|>assistant\n")
        batch = processor(text=[text], images=[pil], return_tensors="pt")
        length = batch["input_ids"].shape[1]
        positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)  # sequential, as the release's forward
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).last_hidden_state
        x = hidden[0, batch["input_ids"][0] == reward_id]
        assert x.shape[0] == 1
        for index, act in ((0, True), (3, True), (5, False)):
            x = F.linear(x, state[f"rm_head.{index}.weight"], state[f"rm_head.{index}.bias"])
            x = F.relu(x) if act else x
        out.append(x[0])
    return torch.stack(out)


def smooth_images(n, size=32, seed=0):
    noise = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)


def test_hps_v3_mu_and_sigma_equal_the_release_forward(folder):
    images = smooth_images(4)
    expected = reference(folder, images, PROMPTS)
    head = load("hps-v3", batch_size=4, **kwargs(folder))
    mu = head(images, PROMPTS)  # one padded batch of prompts of different lengths
    assert mu.shape == (4,) and torch.allclose(mu, expected[:, 0], atol=1e-4)
    sigma = load("hps-v3", output="sigma", **kwargs(folder))(images, PROMPTS)
    assert torch.allclose(sigma, expected[:, 1], atol=1e-4)
    # prompts and images both move the score by far more than the tolerance: the comparison has teeth
    assert expected[:, 0].std() > 1e-2
    same_prompt = head(images, ["a cat"] * 4)
    assert same_prompt.max() - same_prompt.min() > 5e-3


def test_hps_v3_batch_size_invariance_and_dtype(folder):
    images = smooth_images(5, seed=1)
    prompts = PROMPTS + ["a much longer prompt about a green square on a table"]
    one = load("hps-v3", batch_size=1, **kwargs(folder))(images, prompts)
    three = load("hps-v3", batch_size=3, **kwargs(folder))(images, prompts)
    assert torch.allclose(one, three, atol=1e-4)
    bf16 = load("hps-v3", dtype="bf16", **kwargs(folder))
    assert next(bf16.backbone.parameters()).dtype == torch.bfloat16 and next(bf16.head.parameters()).dtype == torch.float32
    scores = bf16(images, prompts)
    assert scores.dtype == torch.float32 and torch.allclose(scores, one, atol=0.1)


def test_hps_v3_errors(folder, tmp_path):
    assert "hps-v3" in REWARDS and REWARDS["hps-v3"].differentiable
    with pytest.raises(FileNotFoundError, match=r"HPSv3\.safetensors not found at .*MizzenAI/HPSv3 or pass path="):
        load("hps-v3", path=str(tmp_path), arch=str(folder), processor_path=str(folder / "processor"))
    with pytest.raises(FileNotFoundError, match=r"HPSv3\.safetensors .*MizzenAI/HPSv3"):  # HF_HUB_OFFLINE=1
        load("hps-v3", arch=str(folder), processor_path=str(folder / "processor"))
    with pytest.raises(FileNotFoundError, match="Qwen2-VL config not found at"):
        load("hps-v3", path=str(folder), arch=str(tmp_path / "nowhere"), processor_path=str(folder / "processor"))
    with pytest.raises(ValueError, match="output='median' is unknown"):
        load("hps-v3", output="median", **{k: v for k, v in kwargs(folder).items()})
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "HPSv3.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, tmp_path / "no_head.safetensors")
    with pytest.raises(ValueError, match="no rm_head"):
        load("hps-v3", path=str(tmp_path / "no_head.safetensors"), arch=str(folder), processor_path=str(folder / "processor"))
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"does not match the Qwen2-VL config given by arch=: missing \['language_model.layers.1"):
        load("hps-v3", path=str(tmp_path / "short.safetensors"), arch=str(folder), processor_path=str(folder / "processor"))


def test_hps_v3_differentiable_path(folder):
    head = load("hps-v3", batch_size=2, **kwargs(folder))
    # at the target size in 8-bit values neither path resizes or rounds: the torch patches equal the processor's
    exact = (smooth_images(3, size=56, seed=2) * 255).round() / 255
    pixels = exact.clone().requires_grad_(True)
    scores = head.score_differentiable(pixels, PROMPTS[:3])
    assert torch.allclose(scores.detach(), head(exact, PROMPTS[:3]), atol=1e-4)
    scores.sum().backward()
    assert pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()
    # resized inputs: torch's antialiased bicubic vs PIL's, no 8-bit rounding: close, not equal
    images = smooth_images(3, size=40, seed=3)
    gap = (head.score_differentiable(images, PROMPTS[:3]) - head(images, PROMPTS[:3])).abs().max()
    spread = head(smooth_images(8, seed=4), PROMPTS * 2).std()
    assert gap < 0.1 * spread


def test_checkpoint_names_of_every_transformers_and_peft_layout_map_to_one_naming():
    from diffpo.rewards.qwen2vl_reward import canonical_key, right_padded

    cases = {
        "model.layers.0.mlp.up_proj.weight": "language_model.layers.0.mlp.up_proj.weight",  # transformers 4.4x
        "model.language_model.layers.0.mlp.up_proj.weight": "language_model.layers.0.mlp.up_proj.weight",  # 5.x
        "visual.blocks.0.attn.qkv.weight": "visual.blocks.0.attn.qkv.weight",
        "model.visual.merger.ln_q.bias": "visual.merger.ln_q.bias",
        "base_model.model.model.embed_tokens.weight": "language_model.embed_tokens.weight",  # peft
        "base_model.model.rm_head.modules_to_save.default.weight": "rm_head.weight",
        "base_model.model.rm_head.original_module.weight": None,
        "lm_head.weight": None,
        "rm_head.0.bias": "rm_head.0.bias",
    }
    for key, expected in cases.items():
        assert canonical_key(key) == expected, key
    with pytest.raises(ValueError, match="unexpected key 'text_projection.weight'"):
        canonical_key("text_projection.weight")
    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0]])) and not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))
