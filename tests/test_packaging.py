"""The wheel carries everything diffpo needs at run time, and an installed wheel finds it without a
source checkout: the bundled models, prompt sets, report template and shipped configs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                             str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("diffpo-*.whl")
    return path


def tracked_package_files() -> list[str]:
    result = subprocess.run(["git", "ls-files", "diffpo"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("not a git checkout: the tracked file list is unknown")
    return result.stdout.split()


def test_the_wheel_holds_every_package_file_and_the_bundled_models(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in tracked_package_files() if f not in names]
    assert missing == [], missing[:10]
    for required in ("diffpo/assets/tiny-sd-shapes/model_index.json",
                     "diffpo/assets/tiny-sd-shapes/unet/diffusion_pytorch_model.safetensors",
                     "diffpo/assets/tiny-video-shapes/model_index.json",
                     "diffpo/assets/prompts/partiprompts/PartiPrompts.tsv",
                     "diffpo/assets/prompts/partiprompts/LICENSE",
                     "diffpo/assets/report/template.html",
                     "diffpo/configs/quickstart.yaml", "diffpo/configs/diffusion_dpo/sd15_lora.yaml",
                     "diffpo/configs/accelerate/multi_gpu.yaml"):
        assert required in names, required
    outside = [n for n in names if not n.startswith(("diffpo/", "diffpo-"))]
    assert outside == []


def test_an_installed_wheel_finds_its_models_and_configs_outside_a_checkout(wheel, tmp_path):
    """The wheel unpacked into a folder of its own and imported from an unrelated working
    directory: resources resolve inside that folder, the bundled model loads, shipped configs are
    found by name."""
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import diffpo, diffpo.resources as r; from diffpo.models.loading import load_stack; "
            "from diffpo.config import find_config; s = load_stack('tiny'); "
            "print(diffpo.__file__); print(r.assets_dir()); print(s.source); "
            "print(find_config('configs/diffusion_dpo/tiny.yaml')); print(find_config('diffusion_dpo/sd15.yaml'))")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()[-5:]
    assert all(line.startswith(str(target)) for line in lines), lines
    assert lines[2].endswith("tiny-sd-shapes") and lines[3].endswith("diffusion_dpo/tiny.yaml")
