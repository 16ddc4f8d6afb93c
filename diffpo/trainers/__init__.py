"""Training loops. ``run_training`` picks the loop the method names."""

from __future__ import annotations

import importlib
from pathlib import Path


def run_training(config) -> Path:
    from diffpo.objectives import METHODS

    loop = importlib.import_module(f"diffpo.trainers.{METHODS[config.method].loop}")
    return loop.train(config)
