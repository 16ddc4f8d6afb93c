"""Learned reward heads on tiny random-weight models saved in the official file formats.

Every reference score here is computed by hand from the saved weights (PIL resize, manual
normalisation, cosine by hand), independently of diffpo's preprocessing code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffpo.rewards import REWARDS, load

ARCH = "diffpo-test-tiny-clip"
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a dog on a mat", "a red circle on a blue background"]
# |official - differentiable| on square images, per head, in the units head_kwargs gives (see the
# docstrings): clip is raw here, so 1e-3 of a cosine is the docstring's 0.1 on the 100 scale
AGREEMENT = {"clip": 1e-3, "hps-v2": 0.05, "hps-v2.1": 0.05, "pickscore": 0.02, "aesthetic": 0.01}


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A tiny open_clip ViT (registered with add_model_config) saved as HPS checkpoints, a plain
    open_clip checkpoint, an aesthetic MLP and a PickScore-style CLIPModel + processor folder."""
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffpo.models.tokenizer import build_clip_tokenizer
    from diffpo.rewards.aesthetic import AestheticMLP

    root = tmp_path_factory.mktemp("reward-weights")
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (root / f"{ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH).eval()
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 1}, root / "HPS_v2_compressed.pt")
    torch.save({"state_dict": {k: v * 1.01 for k, v in state.items()}}, root / "HPS_v2.1_compressed.pt")
    torch.save(state, root / "clip.pt")
    # the same model with the image projection negated: flips the sign of every cosine
    torch.save({**state, "visual.proj": -state["visual.proj"]}, root / "clip_flipped.pt")
    torch.manual_seed(1)
    mlp = AestheticMLP(32)
    torch.save(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")

    tokenizer = build_clip_tokenizer(1000)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(root / "pickscore")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(root / "processor")
    return root


def head_kwargs(name, weights):
    return {
        "clip": dict(path=str(weights / "clip.pt"), arch=ARCH, raw=True),
        "hps-v2": dict(path=str(weights), arch=ARCH),
        "hps-v2.1": dict(path=str(weights / "HPS_v2.1_compressed.pt"), arch=ARCH),
        "pickscore": dict(path=str(weights / "pickscore"), processor_path=str(weights / "processor")),
        "aesthetic": dict(path=str(weights), arch=ARCH, clip_path=str(weights / "clip.pt")),
    }[name]


def smooth_images(n, size=48, seed=0):
    """Smooth random images in [0, 1] (upsampled noise: realistic for resampling comparisons)."""
    noise = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)


def pil_images(images):
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def open_clip_reference(state_file, images, prompts, size=32, state_key=None):
    """Cosines by hand: PIL bicubic resize to size x size, /255, OpenAI normalisation, encode,
    divide by the norms, dot product."""
    import open_clip

    model = open_clip.create_model(ARCH).eval()
    state = torch.load(state_file, weights_only=True)
    model.load_state_dict(state[state_key] if state_key else state)
    pixels = torch.stack([
        (torch.from_numpy(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255).permute(2, 0, 1) - MEAN) / STD
        for im in pil_images(images)])
    with torch.no_grad():
        image = model.encode_image(pixels)
        text = model.encode_text(open_clip.get_tokenizer(ARCH)(prompts))
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1), image, model


@pytest.mark.parametrize("name,file", [("hps-v2", "HPS_v2_compressed.pt"), ("hps-v2.1", "HPS_v2.1_compressed.pt")])
def test_hps_equals_hand_computed_100_cos(weights, name, file):
    images = smooth_images(4, size=32)  # already 224-equivalent: no resize, only the 8-bit rounding
    reference, _, _ = open_clip_reference(weights / file, images, PROMPTS, state_key="state_dict")
    head = load(name, path=str(weights), arch=ARCH)
    assert torch.allclose(head(images, PROMPTS), 100 * reference, atol=1e-3)
    raw = load(name, path=str(weights), arch=ARCH, raw=True)(images, PROMPTS)
    assert torch.allclose(raw, reference, atol=1e-5)
    assert not head.encoder.model.training


def test_hps_letterboxes_non_square_images_centred(weights):
    # 16 x 32 -> longest side 32 is already the model size: no resize, 8 zero rows above and below
    wide = smooth_images(2, size=32)[:, :, 8:24, :]
    canvas = torch.zeros(2, 3, 32, 32)
    canvas[:, :, 8:24, :] = (wide * 255).round() / 255
    import open_clip

    model = open_clip.create_model(ARCH).eval()
    model.load_state_dict(torch.load(weights / "HPS_v2_compressed.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        image = model.encode_image((canvas - MEAN) / STD)
        text = model.encode_text(open_clip.get_tokenizer(ARCH)(PROMPTS[:2]))
    reference = 100 * (image / image.norm(dim=-1, keepdim=True) * text / text.norm(dim=-1, keepdim=True)).sum(-1)
    head = load("hps-v2", path=str(weights), arch=ARCH)
    assert torch.allclose(head(wide, PROMPTS[:2]), reference, atol=1e-3)
    # an odd padding (15 rows) puts the extra row at the bottom, as HPSv2's ResizeMaxSize does
    odd = smooth_images(1, size=32)[:, :, :17, :]
    canvas = torch.zeros(1, 3, 32, 32)
    canvas[:, :, 7:24, :] = (odd * 255).round() / 255
    with torch.no_grad():
        image = model.encode_image((canvas - MEAN) / STD)
    reference = 100 * (image / image.norm(dim=-1, keepdim=True) * text[:1] / text[:1].norm(dim=-1, keepdim=True)).sum(-1)
    assert torch.allclose(head(odd, PROMPTS[:1]), reference, atol=1e-3)


def test_clip_score_is_100_max_cos_0_and_raw_is_the_cosine(weights):
    images = smooth_images(4)
    cos, _, _ = open_clip_reference(weights / "clip.pt", images, PROMPTS)
    flipped, _, _ = open_clip_reference(weights / "clip_flipped.pt", images, PROMPTS)
    assert torch.allclose(load("clip", path=str(weights / "clip.pt"), arch=ARCH, raw=True)(images, PROMPTS), cos, atol=1e-5)
    for file, reference in (("clip.pt", cos), ("clip_flipped.pt", flipped)):
        scores = load("clip", path=str(weights / file), arch=ARCH)(images, PROMPTS)
        assert torch.allclose(scores, 100 * reference.clamp(min=0), atol=1e-3)
    assert (cos < 0).all() and (flipped > 0).all()  # so both branches of max(cos, 0) were exercised


def test_pickscore_equals_hand_computed_logit_scale_cos_and_probabilities(weights):
    from transformers import CLIPModel, CLIPProcessor

    images = smooth_images(4)
    model = CLIPModel.from_pretrained(weights / "pickscore").eval()
    processor = CLIPProcessor.from_pretrained(weights / "processor")
    with torch.no_grad():  # the official example, written out
        image = model.get_image_features(**processor(images=pil_images(images), return_tensors="pt"))
        text = model.get_text_features(**processor(text=PROMPTS, padding=True, truncation=True, max_length=77,
                                                   return_tensors="pt"))
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    reference = model.logit_scale.exp() * (image / image.norm(dim=-1, keepdim=True) * text / text.norm(dim=-1, keepdim=True)).sum(-1)
    head = load("pickscore", **head_kwargs("pickscore", weights))
    assert torch.allclose(head(images, PROMPTS), reference, atol=1e-4)
    probs = head.probabilities(images, PROMPTS[1])
    with torch.no_grad():
        one = model.get_text_features(**processor(text=[PROMPTS[1]], return_tensors="pt"))
    one = one if isinstance(one, torch.Tensor) else one.pooler_output
    logits = model.logit_scale.exp() * (image / image.norm(dim=-1, keepdim=True) @ (one / one.norm(dim=-1, keepdim=True)).T)[:, 0]
    expected = torch.exp(logits) / torch.exp(logits).sum()
    assert torch.allclose(probs, expected, atol=1e-5) and probs.sum().item() == pytest.approx(1.0)


def test_aesthetic_equals_hand_computed_mlp_on_normalised_embedding(weights):
    images = smooth_images(3)
    _, embedding, _ = open_clip_reference(weights / "clip.pt", images, ["x"] * 3)
    state = torch.load(weights / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    x = embedding
    for layer in (0, 2, 4, 6, 7):  # dropout is the identity in eval; no activations in the released model
        x = x @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
    head = load("aesthetic", **head_kwargs("aesthetic", weights))
    assert torch.allclose(head(images, ["ignored"] * 3), x[:, 0], atol=1e-5)


@pytest.mark.parametrize("name", ["clip", "hps-v2", "hps-v2.1", "pickscore", "aesthetic"])
def test_scores_do_not_depend_on_batch_size(weights, name):
    images = smooth_images(5)
    prompts = PROMPTS + ["a blue square"]
    one = load(name, batch_size=1, **head_kwargs(name, weights))(images, prompts)
    three = load(name, batch_size=3, **head_kwargs(name, weights))(images, prompts)
    assert one.shape == (5,) and one.dtype == torch.float32
    assert torch.allclose(one, three, atol=1e-4)


@pytest.mark.parametrize("name", ["clip", "hps-v2", "hps-v2.1", "pickscore", "aesthetic"])
def test_gradients_reach_the_pixels_and_paths_agree_on_square_images(weights, name):
    head = load(name, batch_size=2, **head_kwargs(name, weights))
    images = smooth_images(3, seed=3)
    pixels = images.clone().requires_grad_(True)
    differentiable = head.score_differentiable(pixels, PROMPTS[:3])
    differentiable.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    official = head(images, PROMPTS[:3])
    assert (official - differentiable.detach()).abs().max() <= AGREEMENT[name]


def test_video_is_scored_as_the_mean_of_its_sampled_frames(weights):
    head = load("hps-v2", path=str(weights), arch=ARCH)
    frames = smooth_images(8, size=32, seed=4)
    videos = frames.view(2, 4, 3, 32, 32)
    prompts = PROMPTS[:2]
    per_frame = head(frames, [p for p in prompts for _ in range(4)]).view(2, 4)
    assert torch.allclose(head(videos, prompts), per_frame.mean(1), atol=1e-4)
    every_other = load("hps-v2", path=str(weights), arch=ARCH, frame_stride=2)(videos, prompts)
    assert torch.allclose(every_other, per_frame[:, ::2].mean(1), atol=1e-4)
    videos = videos.clone().requires_grad_(True)
    head.score_differentiable(videos, prompts).sum().backward()
    assert videos.grad.abs().sum() > 0


def test_missing_checkpoints_fail_with_one_line_naming_the_file_and_where_to_get_it(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt not found at .*xswu/HPSv2 or pass path="):
        load("hps-v2.1", path=str(tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"), arch=ARCH)
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt not found at .*empty"):
        (tmp_path / "empty").mkdir()
        load("hps-v2", path=str(tmp_path / "empty"), arch=ARCH)
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt .*xswu/HPSv2"):  # HF_HUB_OFFLINE=1
        load("hps-v2.1", arch=ARCH)
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth not found at .*improved-aesthetic-predictor"):
        load("aesthetic", path=str(tmp_path / "empty"), arch=ARCH, clip_path=str(weights / "clip.pt"))
    with pytest.raises(FileNotFoundError, match=r"PickScore model not found at .*yuvalkirstain/PickScore_v1"):
        load("pickscore", path=str(tmp_path / "no-model"), processor_path=str(weights / "processor"))
    with pytest.raises(FileNotFoundError, match="open_clip checkpoint not found at"):
        load("clip", path=str(tmp_path / "clip.pt"), arch=ARCH)
    with pytest.raises(FileNotFoundError) as raised:
        load("hps-v2.1", path=str(tmp_path / "x.pt"), arch=ARCH)
    assert "\n" not in str(raised.value)


def test_bad_options_fail_clearly(weights):
    with pytest.raises(ValueError, match="unknown: use one of open_clip.list_models"):
        load("hps-v2", path=str(weights), arch="no-such-arch")
    with pytest.raises(ValueError, match="needs path="):
        load("clip", arch=ARCH)
    with pytest.raises(ValueError, match="has no weights"):
        load("brightness", path="x.pt")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load("hps-v2", path=str(weights), arch=ARCH, dtype="fp8")


@pytest.mark.parametrize("name", ["hps-v2", "brightness"])
def test_images_outside_0_1_or_of_the_wrong_shape_fail_clearly(weights, name):
    head = load(name, path=str(weights), arch=ARCH) if name != "brightness" else load(name)
    with pytest.raises(ValueError, match=r"images in \[0, 1\].*\(x \+ 1\) / 2"):
        head(torch.full((1, 3, 32, 32), -0.5), ["x"])
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        head(torch.full((1, 3, 32, 32), 255.0), ["x"])
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        head(torch.full((1, 3, 32, 32), float("nan")), ["x"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        head(torch.rand(1, 4, 32, 32), ["x"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        head.score_differentiable(torch.rand(3, 32, 32), ["x"])
    assert head(torch.full((1, 3, 32, 32), 1.0005), ["x"]).shape == (1,)  # within the tolerance


def test_dtype_is_injected(weights):
    images = smooth_images(2)
    fp32 = load("hps-v2", path=str(weights), arch=ARCH)(images, PROMPTS[:2])
    bf16_head = load("hps-v2", path=str(weights), arch=ARCH, dtype="bf16")
    assert next(bf16_head.encoder.model.parameters()).dtype == torch.bfloat16
    bf16 = bf16_head(images, PROMPTS[:2])
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, fp32, atol=3.0)


def test_registry_and_lazy_imports():
    assert {"clip", "hps-v2", "hps-v2.1", "pickscore", "aesthetic", "jpeg-compressibility", "brightness"} <= set(REWARDS)
    code = ("import sys, diffpo.rewards; heavy = [m for m in ('open_clip', 'transformers', 'torchvision') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
