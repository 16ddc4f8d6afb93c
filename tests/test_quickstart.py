"""``diffpo quickstart`` end to end on the bundled model, with its default config."""

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    result = subprocess.run([sys.executable, "-m", "diffpo", "quickstart", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=900)
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
