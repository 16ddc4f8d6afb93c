"""Reference policies: what the DPO family compares the trained policy against.

* LoRA training: the same UNet with its adapters disabled, inside ``try/finally`` so an exception
  never leaves the adapters off.
* Full fine-tuning: a frozen copy read afresh from the model source (never a silent deepcopy),
  optionally in another dtype or with its weights offloaded to the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from diffpo.models.loading import unet_denoiser


@contextmanager
def adapters_disabled(unet):
    """Run the block with the UNet's LoRA adapters off; they are switched back on whatever happens."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class AdaptersDisabledReference:
    """Reference = base UNet, obtained by disabling the adapters of the (unwrapped) policy UNet."""

    kind = "adapters_disabled"

    def __init__(self, unet):
        self.unet = unet
        self._denoise = unet_denoiser(unet)

    def __call__(self, noisy, timesteps, conditioning):
        with torch.no_grad(), adapters_disabled(self.unet):
            return self._denoise(noisy, timesteps, conditioning)


class FrozenCopyReference:
    """Reference = a separately loaded, frozen base UNet (full fine-tuning)."""

    kind = "frozen_copy"

    def __init__(self, unet, device, dtype: torch.dtype, offload: bool = False):
        unet.requires_grad_(False).eval()
        if offload:
            from accelerate import cpu_offload

            unet.to("cpu", dtype)
            cpu_offload(unet, execution_device=torch.device(device))
        else:
            unet.to(device, dtype)
        self.unet, self.dtype = unet, dtype
        self._denoise = unet_denoiser(unet)

    def __call__(self, noisy, timesteps, conditioning):
        cast = {k: _cast(v, self.dtype) for k, v in conditioning.items()}
        with torch.no_grad():
            return self._denoise(noisy.to(dtype=self.dtype), timesteps, cast)


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype=dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
