"""Training loops. ``run_training`` picks the loop the method names."""

from __future__ import annotations

import importlib
from pathlib import Path


def run_training(config) -> Path:
    """Train ``config`` with its method's loop; its local paths are made absolute first, so the run
    dir's ``config.yaml`` reruns from any working directory."""
    from diffpo.config import absolute_paths
    from diffpo.objectives import METHODS

    loop = importlib.import_module(f"diffpo.trainers.{METHODS[config.method].loop}")
    return loop.train(absolute_paths(config))
