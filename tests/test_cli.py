"""The ``diffpo`` command: help, one-line user errors, exit codes."""

import subprocess
import sys

import pytest


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "diffpo", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", [[], ["train"], ["cache"], ["quickstart"]])
def test_every_command_has_help(command):
    result = _run(*command, "--help")
    assert result.returncode == 0 and "usage: diffpo" in result.stdout


def test_unknown_config_key_is_one_line_naming_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("method: diffusion_dpo\noptim:\n  learning_rate: 1.0e-5\n")
    result = _run("train", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.learning_rate" in lines[0] and "Traceback" not in result.stderr


def test_missing_config_and_bad_override_are_one_line_errors(tmp_path):
    result = _run("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 3\n")
    result = _run("train", str(config), "objective.beta=-5")
    assert result.returncode == 2 and "objective.beta=-5.0 must be > 0" in result.stderr.strip()


def test_missing_model_path_is_a_one_line_error(tmp_path, shapes_parquet):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  pretrained: {tmp_path / 'missing-model'}\ndata:\n  source: {shapes_parquet}\n")
    result = _run("train", str(config), f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_accelerate_launch_runs_the_same_config(tmp_path, tiny_sd_dir, shapes_parquet):
    import json
    import os
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "diffusion_dpo" / "tiny.yaml"
    launcher = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(launcher), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "diffpo", "train", str(config), f"model.pretrained={tiny_sd_dir}",
         f"data.source={shapes_parquet}", f"output_dir={tmp_path / 'run'}", "max_steps=2", "train_batch_size=4", "log_every=1",
         "progress_bar=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_cache_command_builds_a_complete_cache(tmp_path, tiny_sd_dir, shapes_parquet):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  pretrained: {tiny_sd_dir}\ndata:\n  source: {shapes_parquet}\ncache:\n  dir: {tmp_path / 'cache'}\n")
    result = _run("cache", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file() and "cache of 32 pairs" in result.stdout


def test_a_run_dirs_config_reruns_from_another_working_directory(tmp_path, tiny_sd_dir, shapes_parquet):
    """Relative paths given in one folder are stored absolute in RUN_DIR/config.yaml, so the rerun
    from elsewhere finds the same data and writes into the same run dir."""
    import json
    import shutil

    import yaml

    first, second = tmp_path / "first", tmp_path / "second"
    (first / "data").mkdir(parents=True)
    second.mkdir()
    shutil.copy(shapes_parquet, first / "data" / "pairs.parquet")
    common = [f"model.pretrained={tiny_sd_dir}", "train_batch_size=4", "log_every=1", "progress_bar=false"]
    result = _run("train", "configs/diffusion_dpo/tiny.yaml", "output_dir=runs/r", "data.source=data/pairs.parquet",
                  "max_steps=1", *common, cwd=first)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = first / "runs" / "r"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["output_dir"] == str(run_dir) and saved["data"]["source"] == str(first / "data" / "pairs.parquet")
    assert saved["model"]["pretrained"] == tiny_sd_dir
    result = _run("train", str(run_dir / "config.yaml"), "max_steps=2", "resume_from=latest", cwd=second)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (second / "runs").exists()
