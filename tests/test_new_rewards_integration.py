"""The new heads through diffpo's entry points: ``diffpo score``,
``diffpo eval``'s reward config (the online trainer loads heads the same way, by name and options)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_imagereward import checkpoint  # noqa: F401  (fixture)
from test_remote_reward import Judge, judge_server

from diffpo.cli import main


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (h, w) in {"a.png": (32, 32), "b.png": (40, 32), "c.png": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "prompts.txt").write_text("a red circle\na photo of a cat\nthe dog on a mat\n")
    return folder


def pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def test_diffpo_score_with_the_remote_and_imagereward_heads(image_folder, tmp_path, checkpoint):  # noqa: F811
    from diffpo.rewards import load

    out = tmp_path / "scores.jsonl"
    judge = Judge()
    with judge_server(judge) as url:
        assert main(["score", "--images", str(image_folder), "--prompts", str(image_folder / "prompts.txt"),
                     "--reward", "remote", "--reward-option", f"remote.url={url}", "--reward-option", "remote.protocol=json",
                     "--reward", "imagereward", "--reward-option", f"imagereward.path={checkpoint}",
                     "--reward-option", f"imagereward.tokenizer_path={checkpoint / 'tokenizer'}",
                     "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    head = load("imagereward", path=str(checkpoint), tokenizer_path=str(checkpoint / "tokenizer"))
    for row in rows:
        image = pixels(image_folder / row["file"])
        assert row["remote"] == pytest.approx(float(image.mean()) + len(row["prompt"]), abs=1e-5)
        assert row["imagereward"] == pytest.approx(float(head(image[None], [row["prompt"]])[0]), abs=1e-4)


def test_eval_and_online_configs_accept_the_new_heads(checkpoint):  # noqa: F811
    from diffpo.config import ConfigError
    from diffpo.eval.config import RewardConfig
    from diffpo.eval.scoring import load_head

    config = RewardConfig(name="imagereward", path=str(checkpoint), options={"tokenizer_path": str(checkpoint / "tokenizer"), "raw": True})
    head = load_head(config, device="cpu", dtype="fp32")
    assert head.raw and head(torch.rand(1, 3, 32, 32), ["a cat"]).shape == (1,)
    remote = load_head(RewardConfig(name="remote", options={"url": "http://127.0.0.1:9/v1", "model": "judge"}))
    assert remote.url.endswith("/v1/chat/completions")
    for name in ("hps-v3", "video-reward", "imagereward", "remote"):
        RewardConfig(name=name)  # known names
    with pytest.raises(ConfigError, match="did you mean 'hps-v3'"):
        RewardConfig(name="hps-v3.0")


def test_vlm_reward_benchmark_runs_and_writes_its_figures(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = tmp_path / "vlm.json"
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_vlm_reward.py"), "--images", "2",
                             "--batch-size", "2", "--pixels", str(4 * 28 * 28), "--out", str(out)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["speedup"] == pytest.approx(report["one_per_call_s"] / report["batched_s"])
    assert report["max_abs_score_difference"] < 1e-3 and report["machine"]["cpu_cores"] >= 1
