"""Files that ship inside the diffpo package: the bundled models, prompt sets and report template
(``diffpo/assets``) and the shipped configs (``diffpo/configs``).

They are found through ``importlib.resources`` so that a wheel installed anywhere finds them; a
source checkout sees the same folders through its top-level ``assets`` and ``configs`` links."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def package_path(*parts: str) -> Path:
    """The installed path of ``diffpo/<parts...>``. diffpo installs as plain files (never zipped),
    so the traversable is a real folder that diffusers' ``from_pretrained`` can read."""
    return Path(str(files("diffpo").joinpath(*parts)))


def assets_dir() -> Path:
    return package_path("assets")


def configs_dir() -> Path:
    return package_path("configs")


def shipped_config(relative: str) -> Path:
    """A shipped config by its path inside ``configs/`` (``diffusion_dpo/sd15.yaml``)."""
    return configs_dir() / relative
