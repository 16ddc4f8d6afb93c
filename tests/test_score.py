"""``diffpo score`` end to end: image folders to JSONL, preference pairs to a new parquet."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffpo.cli import main


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    """A tiny open_clip architecture as a ``local-dir:`` folder and an HPS-format checkpoint of it."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny-hps")
    config = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}}
    (root / "arch").mkdir()
    (root / "arch" / "open_clip_config.json").write_text(json.dumps(config))
    arch = f"local-dir:{root / 'arch'}"
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, root / "HPS_v2.1_compressed.pt")
    return arch, str(root / "HPS_v2.1_compressed.pt")


def hps_args(tiny_hps):
    arch, checkpoint = tiny_hps
    return ["--reward", "hps-v2.1", "--reward-option", f"hps-v2.1.path={checkpoint}",
            "--reward-option", f"hps-v2.1.arch={arch}"]


def hps_scores(tiny_hps, images, prompts):
    from diffpo.rewards import load

    arch, checkpoint = tiny_hps
    return load("hps-v2.1", path=checkpoint, arch=arch)(images, prompts).tolist()


def pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = {"b.png": (32, 32), "a.png": (40, 32), "c.jpg": (32, 32)}  # mixed sizes are grouped, not stacked
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_score_folder_writes_one_line_per_image_in_file_name_order(image_folder, tmp_path, tiny_hps):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\nthird prompt\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--images", str(image_folder), "--prompts", str(prompts), "--reward", "brightness",
                 *hps_args(tiny_hps), "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == ["a.png", "b.png", "c.jpg"]
    assert [r["prompt"] for r in rows] == ["first prompt", "second prompt", "third prompt"]
    for row in rows:
        image = pixels(image_folder / row["file"])
        assert row["brightness"] == pytest.approx(float(image.mean()), abs=1e-6)
        assert row["hps-v2.1"] == pytest.approx(hps_scores(tiny_hps, image[None], [row["prompt"]])[0], abs=1e-3)


def test_score_folder_with_a_manifest_and_a_count_mismatch(image_folder, tmp_path, capsys):
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(json.dumps({"file": "c.jpg", "prompt": "red"}) + "\n" + json.dumps({"file": "a.png", "prompt": "blue"}) + "\n")
    out = tmp_path / "manifest.jsonl"
    main(["score", "--images", str(image_folder), "--prompts", str(manifest), "--reward", "brightness",
          "--out", str(out), "--no-progress"])
    assert [(r["file"], r["prompt"]) for r in map(json.loads, out.read_text().splitlines())] == [("c.jpg", "red"), ("a.png", "blue")]

    short = tmp_path / "short.txt"
    short.write_text("only one prompt\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--images", str(image_folder), "--prompts", str(short), "--reward", "brightness", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "3 images" in err and "1 prompts" in err and "\n" not in err.strip()


def test_score_pairs_writes_a_new_parquet_and_leaves_the_input_unchanged(shapes_parquet, tmp_path, tiny_hps, capsys):
    import pyarrow.parquet as pq

    from diffpo.data.images import decode_image

    before = hashlib.sha256(open(shapes_parquet, "rb").read()).hexdigest()
    out = tmp_path / "scored.parquet"
    main(["score", "--pairs", shapes_parquet, "--reward", "brightness", *hps_args(tiny_hps), "--out", str(out),
          "--batch-size", "8", "--no-progress"])
    assert hashlib.sha256(open(shapes_parquet, "rb").read()).hexdigest() == before
    source, scored = pq.read_table(shapes_parquet).to_pydict(), pq.read_table(out).to_pydict()
    for column in source:  # every input column kept as it was
        assert scored[column] == source[column]
    assert {"brightness_0", "brightness_1", "label_brightness", "hps-v2.1_0", "hps-v2.1_1", "label_hps-v2.1"} <= set(scored)
    first = torch.stack([pixels_of(decode_image(v)) for v in source["jpg_0"]])
    second = torch.stack([pixels_of(decode_image(v)) for v in source["jpg_1"]])
    assert scored["brightness_0"] == pytest.approx(first.mean(dim=(1, 2, 3)).tolist(), abs=1e-6)
    assert scored["brightness_1"] == pytest.approx(second.mean(dim=(1, 2, 3)).tolist(), abs=1e-6)
    expected = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scored["brightness_0"], scored["brightness_1"])]
    assert scored["label_brightness"] == expected and len(set(expected)) > 1
    assert scored["hps-v2.1_0"] == pytest.approx(hps_scores(tiny_hps, first, source["caption"]), abs=1e-3)

    with pytest.raises(SystemExit):
        main(["score", "--pairs", shapes_parquet, "--reward", "brightness", "--out", shapes_parquet, "--no-progress"])
    assert "is the input file" in capsys.readouterr().err
    assert hashlib.sha256(open(shapes_parquet, "rb").read()).hexdigest() == before


def pixels_of(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_score_preference_label_ties_and_bad_options(capsys, tmp_path):
    from diffpo.eval.scoring import preference_label

    assert [preference_label(2, 1), preference_label(1, 2), preference_label(1, 1)] == [1.0, 0.0, 0.5]
    assert np.isnan(preference_label(float("nan"), 1))
    with pytest.raises(SystemExit):
        main(["score", "--pairs", str(tmp_path / "x.parquet"), "--reward", "brightness", "--reward-option", "clip.raw=true"])
    assert "NAME.KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "--reward", "brightness"])
    assert "either --images" in capsys.readouterr().err
