"""Preference data: formats, winner ordering, ties, columns, augmentation, image conversion."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_pairs
from diffpo.config import DataConfig
from diffpo.data.images import BadSampleError, decode_image
from diffpo.data.pairs import DataError, PreferencePairs, build_pairs, load_table
from diffpo.data.shapes import all_specs, parse_caption, sample_shapes
from diffpo.data.writer import write_pairs_parquet


def _png(colour, size=(40, 32), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixel(tensor):
    return ((tensor[:, 0, 0] + 1) * 127.5).round().tolist()


def test_winner_comes_first_and_ties_are_dropped(tmp_path):
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    rows = [{"image_0": red, "image_1": blue, "label_0": 1.0, "caption": "a"},
            {"image_0": red, "image_1": blue, "label_0": 0.0, "caption": "b"},
            {"image_0": red, "image_1": blue, "label_0": 0.5, "caption": "tie"}]
    path = write_pairs_parquet(tmp_path / "p.parquet", rows)
    pairs = build_pairs(DataConfig(source=str(path)), resolution=16, seed=0)
    assert len(pairs) == 2
    assert _pixel(pairs[0]["pixels_w"]) == [255, 0, 0] and _pixel(pairs[0]["pixels_l"]) == [0, 0, 255]
    assert _pixel(pairs[1]["pixels_w"]) == [0, 0, 255] and pairs[1]["caption"] == "b"
    assert len(build_pairs(DataConfig(source=str(path), keep_ties=True), 16, 0)) == 3


def test_missing_column_and_empty_and_all_ties_are_clear_errors(tmp_path):
    path = write_pairs_parquet(tmp_path / "p.parquet", make_pairs(4, ties=4))
    with pytest.raises(DataError, match="all|every pair is a tie"):
        build_pairs(DataConfig(source=str(path)), 16, 0)
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\]"):
        build_pairs(DataConfig(source=str(path), caption_column="prompt"), 16, 0)
    with pytest.raises(DataError, match="no parquet files"):
        load_table(str(tmp_path / "none" / "*.parquet"))


def test_labels_outside_the_valid_set_are_rejected(tmp_path):
    rows = make_pairs(2)
    rows[1]["label_0"] = 0.7
    path = write_pairs_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(DataError, match="0, 0.5 or 1"):
        build_pairs(DataConfig(source=str(path)), 16, 0)


def test_jsonl_manifest_with_relative_paths(tmp_path):
    images = sample_shapes(4, seed=3)
    lines = []
    for i in range(2):
        for j in (0, 1):
            images[2 * i + j][0].save(tmp_path / f"{i}_{j}.png")
        lines.append({"jpg_0": f"{i}_0.png", "jpg_1": f"{i}_1.png", "label_0": 0, "caption": images[2 * i][1]})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    pairs = build_pairs(DataConfig(source=str(tmp_path / "m.jsonl")), 32, 0)
    expected = torch.from_numpy(np.asarray(images[1][0], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(pairs[0]["pixels_w"], expected, atol=1e-6)  # label 0 -> image 1 wins


def test_flips_joint_and_independent_and_deterministic(shapes_parquet):
    from diffpo.data.pairs import flip_decisions

    joint = [flip_decisions(0, 0, i, "joint") for i in range(64)]
    assert all(a == b for a, b in joint) and 10 < sum(a for a, _ in joint) < 54
    independent = [flip_decisions(0, 0, i, "independent") for i in range(64)]
    assert any(a != b for a, b in independent)
    plain = build_pairs(DataConfig(source=shapes_parquet), 32, 0)
    flipped = build_pairs(DataConfig(source=shapes_parquet, flip="joint"), 32, 0)
    i = next(i for i, (a, _) in enumerate(joint) if a)
    assert torch.equal(flipped[i]["pixels_w"], plain[i]["pixels_w"].flip(-1))
    assert torch.equal(flipped[i]["pixels_l"], plain[i]["pixels_l"].flip(-1))
    assert torch.equal(flipped[i]["pixels_w"], flipped[i]["pixels_w"])


def test_random_crop_records_offsets_and_centre_crop_is_centred():
    table_rows = [{"jpg_0": _png((10, 20, 30), (64, 32)), "jpg_1": _png((1, 2, 3), (32, 48)), "label_0": 1.0, "caption": "c"}]
    import datasets

    table = datasets.Dataset.from_list(table_rows)
    centre = PreferencePairs(table, resolution=16)[0]
    assert centre["original_size_w"].tolist() == [32, 64] and centre["crop_w"].tolist() == [0, 8]
    assert centre["crop_l"].tolist() == [4, 0]
    crops = {tuple(PreferencePairs(table, resolution=16, crop="random", seed=s)[0]["crop_w"].tolist()) for s in range(8)}
    assert len(crops) > 1 and all(top == 0 and 0 <= left <= 16 for top, left in crops)


@pytest.mark.parametrize("mode,colour", [("L", 128), ("RGBA", (255, 0, 0, 0)), ("CMYK", (0, 255, 255, 0)), ("P", 3)])
def test_other_image_modes_become_rgb(mode, colour):
    image = decode_image(_png(colour, mode=mode) if mode != "CMYK" else _jpeg_cmyk())
    assert image.mode == "RGB"
    if mode == "RGBA":  # fully transparent composites onto white
        assert image.getpixel((0, 0)) == (255, 255, 255)


def _jpeg_cmyk():
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_sixteen_bit_image_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_corrupt_image_names_the_sample():
    data = _png((1, 2, 3))[:40]
    with pytest.raises(BadSampleError, match="row 7.*corrupt"):
        decode_image(data, where="row 7 column jpg_0")


def test_shapes_captions_round_trip():
    specs = all_specs()
    assert len(specs) == 3 * 6 * 5
    assert all(parse_caption(s.caption) == s for s in specs)
    assert parse_caption("a photo of a cat") is None
