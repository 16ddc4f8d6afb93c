"""Shared fixtures: a random tiny SD pipeline on disk and small shapes preference datasets."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# 2 threads on the 2-core CI machine; OMP_NUM_THREADS=1 when another torch job shares the cores
# (two 2-thread OpenMP pools on 2 cores run 15-50x slower)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-LM tests: their ops are too small to split, and a
    second thread only spins against other work on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A randomly initialised tiny StableDiffusionPipeline saved in the diffusers folder format."""
    from diffusers import StableDiffusionPipeline

    from diffpo.models.tiny import build_tiny_sd_components

    path = tmp_path_factory.mktemp("tiny-sd")
    StableDiffusionPipeline(**build_tiny_sd_components(seed=0), requires_safety_checker=False).save_pretrained(path)
    return str(path)


def make_pairs(count: int, seed: int = 0, ties: int = 0) -> list[dict]:
    from diffpo.data.shapes import sample_shapes

    images = sample_shapes(2 * count, seed=seed)
    pairs = []
    for i in range(count):
        label = 0.5 if i < ties else float(i % 2)
        pairs.append({"image_0": images[2 * i][0], "image_1": images[2 * i + 1][0], "label_0": label,
                      "caption": images[2 * i][1]})
    return pairs


@pytest.fixture(scope="session")
def shapes_parquet(tmp_path_factory):
    """32 Pick-a-Pic-format pairs of shape images (labels alternate, no ties)."""
    from diffpo.data.writer import write_pairs_parquet

    return str(write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", make_pairs(32)))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A randomly initialised tiny StableDiffusionXLPipeline folder."""
    from diffusers import StableDiffusionXLPipeline

    from diffpo.models.tiny import build_tiny_sdxl_components

    path = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed=0)).save_pretrained(path)
    return str(path)


@contextmanager
def label_server_thread(run_dir, round_index=None, **options):
    """The labelling page's server for ``run_dir`` on a free port, served from a thread."""
    import threading

    from diffpo.labeling.server import make_server

    server = make_server(run_dir, round_index, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A randomly initialised tiny StableDiffusion3Pipeline folder (diffusers format)."""
    from diffusers import StableDiffusion3Pipeline

    from diffpo.models.tiny import build_tiny_sd3_components

    path = tmp_path_factory.mktemp("tiny-sd3")
    StableDiffusion3Pipeline(**build_tiny_sd3_components(seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A randomly initialised tiny FluxPipeline folder (guidance embedding, dynamic shift)."""
    from diffusers import FluxPipeline

    from diffpo.models.tiny import build_tiny_flux_components

    path = tmp_path_factory.mktemp("tiny-flux")
    FluxPipeline(**build_tiny_flux_components(seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_animatediff_dir(tmp_path_factory):
    """A randomly initialised tiny AnimateDiffPipeline (UNetMotionModel) in the diffusers folder format."""
    from diffusers import AnimateDiffPipeline

    from diffpo.models.tiny import build_tiny_animatediff_components

    path = tmp_path_factory.mktemp("tiny-animatediff")
    AnimateDiffPipeline(**build_tiny_animatediff_components(seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A randomly initialised tiny WanPipeline folder (Wan2.1 T2V layout: UMT5, WanTransformer3DModel,
    causal 3-D AutoencoderKLWan, the hub's UniPC flow scheduler config)."""
    from diffusers import WanPipeline

    from diffpo.models.tiny import build_tiny_wan_components

    path = tmp_path_factory.mktemp("tiny-wan")
    WanPipeline(**build_tiny_wan_components(seed=0)).save_pretrained(path)
    return str(path)
