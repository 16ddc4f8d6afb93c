"""Generation on fixed seeds: every (prompt, seed) gets the same initial noise in every model.

``generate`` runs a pipeline (UNet or flow transformer) from per-seed x_T; the evaluation side plans
samples, writes them as PNGs resumably and reads them back. A sample is one (model, prompt, image
index); its seed depends only on the prompt's row in the full prompt set and the image index, so
every model compared starts from the same initial noise. A generation backend turns prompts and
seeds into images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]; videos are stored losslessly as
one PNG film strip (frames side by side, the frame count in the PNG text chunk ``frames``) so that
scores can always be recomputed from the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from diffpo.eval.prompts import PromptRecord


def initial_latents(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """x_T for each seed, drawn on the CPU so that it does not depend on the device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int = 25, guidance_scale: float = 5.0,
             eta: float = 0.0, batch_size: int = 16, latents: torch.Tensor | None = None,
             eta_seeds: list[int] | None = None, progress: bool = False, desc: str = "generate",
             num_frames: int | None = None) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W), for ``prompts[i]`` with initial noise from ``seeds[i]``;
    with ``num_frames`` (a text-to-video pipeline) videos (N, F, 3, H, W) from (C, F, h, w) noise.

    With ``eta > 0`` the DDIM step noise is drawn from per-image generators seeded by
    ``eta_seeds`` (default: ``seeds``), so two samples may share x_T and still differ.
    """
    from diffpo.models.families import family_of_pipeline

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    family = family_of_pipeline(pipe)  # UNet or flow transformer: x_T's shape and how the pipeline takes it
    denoiser = getattr(pipe, family.denoiser_attr)
    shape = family.pipeline_latent_shape(pipe, None, num_frames)
    video = {} if num_frames is None else {"num_frames": num_frames}
    if latents is None:
        latents = initial_latents(seeds, shape)
    eta_seeds = eta_seeds or seeds
    device = pipe.device if hasattr(pipe, "device") else torch.device("cpu")
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        stop = min(start + batch_size, len(prompts))
        generators = [torch.Generator().manual_seed(s) for s in eta_seeds[start:stop]]
        inputs = family.pipeline_inputs(pipe, latents[start:stop].to(device, denoiser.dtype), guidance_scale, eta)
        out = pipe(prompt=prompts[start:stop], num_inference_steps=num_inference_steps, generator=generators,
                   output_type="pt", **inputs, **video)
        images.append((out.images if num_frames is None else out.frames).float().cpu())
    return torch.cat(images).clamp(0, 1)


def to_pil(images: torch.Tensor):
    """(N, 3, H, W) in [0, 1] -> N PIL images; videos (N, F, 3, H, W) -> N lists of F frames."""
    from PIL import Image

    if images.ndim == 5:
        return [to_pil(video) for video in images]
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


SEED_STRIDE_RUN, SEED_STRIDE_PROMPT = 10_000_000, 1000


def sample_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt row ``prompt_index`` (the same for every model)."""
    return seed * SEED_STRIDE_RUN + prompt_index * SEED_STRIDE_PROMPT + image_index


@dataclass(frozen=True)
class Sample:
    """One generated image or video, as a manifest line."""

    model: str
    prompt_index: int
    image_index: int
    seed: int
    prompt: str
    category: str | None
    file: str  # relative to the output dir
    frames: int | None = None  # None: an image


def plan_samples(model: str, folder: str, prompts: list[PromptRecord], images_per_prompt: int, seed: int) -> list[Sample]:
    """The samples of one model, prompt-major, with files under ``folder`` (relative)."""
    return [Sample(model, p.index, k, sample_seed(seed, p.index, k), p.prompt, p.category,
                   f"{folder}/p{p.index:05d}_i{k:03d}.png")
            for p in prompts for k in range(images_per_prompt)]


class GenerationBackend(Protocol):
    """Generates (B, 3, H, W) images or (B, F, 3, H, W) videos in [0, 1] for prompts and seeds."""

    info: dict  # what to record in the report (class names, resolution, ...)

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor: ...


BackendFactory = Callable[[], GenerationBackend]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (F, 3, H, W) in [0, 1] -> (H, W', 3) uint8; frames side by side."""
    if pixels.ndim == 4:
        pixels = torch.cat(list(pixels), dim=-1)
    return (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def save_sample(pixels: torch.Tensor, path: Path) -> None:
    """Write an image or a video film strip as PNG, atomically (a killed run leaves no half file)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if pixels.ndim == 4:
        info.add_text("frames", str(pixels.shape[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(_uint8(pixels)).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def sample_frames(path: Path) -> int | None:
    """The frame count stored in a sample PNG (None: an image)."""
    from PIL import Image

    with Image.open(path) as image:
        frames = image.text.get("frames")
    return int(frames) if frames else None


def load_sample(path: Path) -> torch.Tensor:
    """(3, H, W) image or (F, 3, H, W) video in [0, 1] from a sample PNG."""
    from PIL import Image

    with Image.open(path) as image:
        frames = image.text.get("frames")
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if not frames:
        return pixels
    return torch.stack(pixels.chunk(int(frames), dim=-1))


def write_manifest(samples: list[Sample], path: Path) -> None:
    """JSONL, one line per sample, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples), encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(path: Path) -> list[Sample]:
    return [Sample(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


SETTINGS_FILE = "settings.json"


def claim_sample_folder(folder: Path, model: str, settings: dict) -> None:
    """Record in ``folder/settings.json`` what its samples are generated with, or check that a
    resumed run uses the same: PNGs are reused by file name, so samples of other settings (steps,
    scheduler, weights, seed, prompt file, ...) must never be taken for this run's."""
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # as it reads back from disk (tuples -> lists)
    if path.is_file():
        stored, current = _flat(json.loads(path.read_text(encoding="utf-8"))), _flat(settings)
        changed = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
        if changed:
            key = changed[0]
            raise ValueError(f"{folder} holds samples of model {model!r} made with other settings ({key}: "
                             f"{stored.get(key)!r} then, {current.get(key)!r} now): use another output_dir, "
                             f"another model name, or delete {folder}")
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def generate_samples(make_backend: BackendFactory, samples: list[Sample], root: Path, batch_size: int,
                     progress: bool = True, desc: str = "generate") -> tuple[list[Sample], dict]:
    """Generate every sample whose PNG is missing (the backend is built only if one is), and return
    the samples with their frame counts and ``{"generated": n, "skipped": m, "backend": info}``."""
    root = Path(root)
    pending = [s for s in samples if not (root / s.file).is_file()]
    info: dict = {}
    if pending:
        backend = make_backend()
        info = dict(getattr(backend, "info", {}))
        with tqdm(total=len(samples), initial=len(samples) - len(pending), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                output = backend.generate([s.prompt for s in chunk], [s.seed for s in chunk])
                if output.ndim not in (4, 5) or output.shape[0] != len(chunk) or output.shape[-3] != 3:
                    raise ValueError(f"{desc}: the generation backend returned shape {tuple(output.shape)} for "
                                     f"{len(chunk)} prompts; expected (B, 3, H, W) or (B, F, 3, H, W)")
                for sample, pixels in zip(chunk, output):
                    save_sample(pixels, root / sample.file)
                bar.update(len(chunk))
        del backend
    done = [Sample(**{**asdict(s), "frames": sample_frames(root / s.file)}) for s in samples]
    return done, {"generated": len(pending), "skipped": len(samples) - len(pending), "backend": info}
