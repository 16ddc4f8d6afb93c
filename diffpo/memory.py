"""Will one training micro-step (or one eval batch) fit in memory? A lower bound, checked before
any data is read or any image generated.

``activation_estimate`` counts only memory a micro-step certainly holds at once, so a refusal is
never a false alarm (real use is several times higher: optimizer state, allocator slack, the
attention scores of the math kernel are not counted):

* the pixel batch: ``2 x train_batch_size`` images (winner and loser) x frames x 3 x R² in fp32;
* the VAE encoder's first feature map: the same images x its first block's channels x R², twice
  (the input and output of a convolution);
* the denoiser's stored activations for the backward pass: per resolution level ``i`` of its
  ``block_out_channels`` (channels C_i on (R / vae factor / 2^i)² latent pixels), 4 tensors per
  resnet layer on the way down and 4 on the way up (``layers_per_block`` each); with
  ``gradient_checkpointing`` only one tensor per level is kept;
* the weights of the denoiser, the VAE and the text encoders.

``check_memory`` refuses the run with the numbers when that bound exceeds the memory of the
training device: a CUDA device's total memory, or for the CPU the memory the machine has available
(``MemAvailable``, and a container's cgroup limit when lower). ``check_memory: false`` in the
config skips it (a device whose memory the estimate misjudges, e.g. unified memory).

``check_generation_memory`` does the same for ``diffpo eval``: a batch of ``sampling.batch_size``
decoded images at ``sampling.resolution`` (3 x R² fp32 values each, and as many in the VAE
decoder's output) must fit; ``check_memory: false`` in the eval config skips it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffpo.config import ConfigError


def _bytes(size: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size / 1e3:.3g} kB"


def _parameter_bytes(module) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def activation_estimate(stack, resolution: int, pairs: int, frames: int = 1, weight_bytes: int = 4,
                        checkpointing: bool = False) -> dict[str, int]:
    """Lower bounds, in bytes, of what one micro-step of ``pairs`` pairs at ``resolution`` holds
    (see the module docstring): ``pixels``, ``vae``, ``denoiser``, ``weights`` and their ``total``."""
    images = 2 * pairs * frames
    pixels_per_image = resolution * resolution
    vae_channels = list(getattr(stack.vae.config, "block_out_channels", None) or [3])
    estimate = {"pixels": images * 3 * pixels_per_image * 4,
                "vae": 2 * images * vae_channels[0] * pixels_per_image * weight_bytes}
    config = stack.unet.config
    latent = resolution // stack.vae_scale_factor
    channels = list(getattr(config, "block_out_channels", None) or [getattr(config, "in_channels", 4)])
    layers = getattr(config, "layers_per_block", 1)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    stored = 0
    for level, (width, count) in enumerate(zip(channels, layers)):
        side = max(latent // 2 ** level, 1)
        tensors = 1 if checkpointing else 8 * count
        stored += tensors * width * side * side
    estimate["denoiser"] = images * stored * weight_bytes
    estimate["weights"] = (_parameter_bytes(stack.unet) + _parameter_bytes(stack.vae)
                           + sum(_parameter_bytes(encoder) for encoder in stack.text_encoders or ()))
    estimate["total"] = sum(estimate.values())
    return estimate


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the memory a run on ``device`` can use."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return total, f"{torch.cuda.get_device_name(device)} has {_bytes(total)} in all"
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    if limit is not None and limit < available:
        return limit, f"this container may use {_bytes(limit)}"
    return available, f"this machine has {_bytes(available)} available"


def check_memory(config, stack, resolution: int, device: torch.device, weight_bytes: int = 4) -> None:
    """Refuse ``config`` when one micro-step at ``resolution`` cannot fit in ``device``'s memory."""
    if not config.check_memory:
        return
    frames = config.data.num_frames or 1
    estimate = activation_estimate(stack, resolution, config.train_batch_size, frames, weight_bytes,
                                   config.gradient_checkpointing)
    available, what = available_memory(device)
    if estimate["total"] <= available:
        return
    parts = ", ".join(f"{name} {_bytes(size)}" for name, size in estimate.items() if name != "total")
    video = f" x {frames} frames" if frames > 1 else ""
    raise ConfigError(
        f"data.resolution={resolution} with train_batch_size={config.train_batch_size}{video} needs at least "
        f"{_bytes(estimate['total'])} of memory for one step of this model ({parts}), but {what}: lower "
        "data.resolution or train_batch_size"
        + ("" if config.gradient_checkpointing else ", set gradient_checkpointing=true")
        + ", or set check_memory=false to try anyway")


def check_generation_memory(config) -> None:
    """Refuse an eval ``config`` whose models' decoded image batches cannot fit in memory."""
    if not config.check_memory:
        return
    from diffpo.eval.config import sampling_for

    available, what = available_memory(torch.device(config.device))
    for index, entry in enumerate(config.models):
        sampling = sampling_for(config, entry)
        if sampling.resolution is None:
            continue  # the model's native resolution: what it was made for
        needed = 2 * sampling.batch_size * 3 * sampling.resolution ** 2 * 4
        if needed > available:
            raise ConfigError(
                f"models[{index}] ({entry.name}): sampling.resolution={sampling.resolution} with sampling.batch_size="
                f"{sampling.batch_size} needs at least {_bytes(needed)} for the decoded images alone, but {what}: "
                "lower sampling.resolution or sampling.batch_size, or set check_memory=false to try anyway")
