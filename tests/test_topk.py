"""``diffpo data top-k``: the K best distinct images of a pair dataset by a reward head."""

import pandas as pd
import pytest
import torch

from conftest import make_pairs
from diffpo.cli import main
from diffpo.data.topk import top_k_images
from diffpo.data.writer import write_pairs_parquet
from diffpo.eval.scoring import to_tensor
from diffpo.rewards import load


@pytest.fixture()
def pairs_with_a_repeat(tmp_path):
    pairs = make_pairs(6)
    pairs[5]["image_1"] = pairs[0]["image_0"]  # Pick-a-Pic shows one image in several pairs
    return write_pairs_parquet(tmp_path / "pairs.parquet", pairs), pairs


def test_top_k_are_the_best_distinct_images(pairs_with_a_repeat):
    path, pairs = pairs_with_a_repeat
    head = load("jpeg-compressibility")
    images = [p["image_0"] for p in pairs] + [p["image_1"] for p in pairs[:5]]  # the 11 distinct images
    captions = [p["caption"] for p in pairs] + [p["caption"] for p in pairs[:5]]
    scores = head(torch.stack([to_tensor(im) for im in images]), captions)
    expected = sorted(scores.tolist(), reverse=True)[:4]
    records = top_k_images(str(path), head, 4, batch_size=3, progress=False)
    assert [r["score"] for r in records] == pytest.approx(expected)
    assert len({(r["row"], r["column"]) for r in records}) == 4
    everything = top_k_images(str(path), head, 100, progress=False)
    assert len(everything) == 11  # the repeated image counted once


def test_cli_writes_an_image_caption_parquet(pairs_with_a_repeat, tmp_path, capsys):
    path, _ = pairs_with_a_repeat
    out = tmp_path / "experts.parquet"
    assert main(["data", "top-k", "--source", str(path), "--reward", "jpeg-compressibility", "--k", "3",
                 "--out", str(out), "--no-progress"]) == 0
    table = pd.read_parquet(out)
    assert list(table.columns)[:2] == ["jpg_0", "caption"] and len(table) == 3
    assert table["jpeg-compressibility"].is_monotonic_decreasing
    assert "3 images written" in capsys.readouterr().out


def test_missing_column_is_a_one_line_error(pairs_with_a_repeat, tmp_path, capsys):
    path, _ = pairs_with_a_repeat
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "top-k", "--source", str(path), "--reward", "brightness", "--k", "2", "--out",
              str(tmp_path / "x.parquet"), "--caption-column", "prompt", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "prompt" in err and "\n" not in err
