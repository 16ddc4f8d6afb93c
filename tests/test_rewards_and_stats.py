"""Programmatic rewards and the statistics of before/after comparisons."""

import numpy as np
import pytest
import torch

from diffpo.data.shapes import ShapeSpec, draw_shape
from diffpo.eval.stats import bootstrap_ci, paired_win_rate, summarize
from diffpo.rewards import REWARDS, load


def _tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_colour_match_rewards_the_captioned_colours():
    spec = ShapeSpec("circle", "red", "blue")
    rng = np.random.default_rng(0)
    good = _tensor(draw_shape(spec, 32, rng))
    wrong = _tensor(draw_shape(ShapeSpec("circle", "green", "yellow"), 32, rng))
    no_shape = torch.zeros(3, 32, 32)
    no_shape[2] = 220 / 255  # the blue background alone
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = load("colour-match")(torch.stack([good, wrong, no_shape, noise]), [spec.caption] * 4)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == 0.0 and scores[2] == 0.0
    assert scores[3] < 0.15


def test_colour_match_hand_computed_fractions():
    # 32x32: left 8 columns red (25%), the rest blue -> (0.25 + 0.75) * min(1, 0.25 / 0.05) = 1;
    # 1 red column (3.125%) -> presence 0.625 -> score 0.625
    image = torch.zeros(3, 32, 32)
    image[2] = 220 / 255
    one_column = image.clone()
    image[:, :, :8] = torch.tensor([220, 30, 30]).view(3, 1, 1) / 255
    one_column[:, :, :1] = torch.tensor([220, 30, 30]).view(3, 1, 1) / 255
    scores = load("colour-match")(torch.stack([image, one_column]), ["a red square on a blue background"] * 2)
    assert scores.tolist() == pytest.approx([1.0, 0.625])
    assert torch.isnan(load("colour-match")(image[None], ["a photo of a cat"]))[0]


def test_jpeg_compressibility_prefers_flat_images_and_scores_videos_per_frame():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    head = load("jpeg-compressibility")
    assert head(flat, ["x"]) > head(noise, ["x"])
    video = torch.stack([torch.cat([flat, noise])])  # (1, F=2, 3, H, W)
    assert head(video, ["x"]).item() == pytest.approx((head(flat, ["x"]) + head(noise, ["x"])).item() / 2)


def test_reward_interface_errors():
    with pytest.raises(ValueError, match="did you mean 'colour-match'"):
        load("color-match")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        REWARDS["brightness"]()(torch.zeros(3, 8, 8), ["x"])
    with pytest.raises(ValueError, match="one prompt per image"):
        REWARDS["brightness"]()(torch.zeros(2, 3, 8, 8), ["x"])
    with pytest.raises(ValueError, match="uint8"):
        REWARDS["brightness"]()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["x"])


def test_paired_win_rate_counts_ties_as_half():
    result = paired_win_rate([1, 2, 3, 4], [0, 2, 5, 1])
    assert result["mean"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert result["ties"] == 1 and result["n"] == 4
    lo, hi = result["ci95"]
    assert 0 <= lo <= result["mean"] <= hi <= 1


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    assert summarize([1.0, float("nan"), 3.0])["mean"] == 2.0


def test_jpeg_incompressibility_is_the_negated_size():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(load("jpeg-incompressibility")(images, ["a", "b"]), -load("jpeg-compressibility")(images, ["a", "b"]))
