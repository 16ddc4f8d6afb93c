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

    def __init__(self, unet, make_denoiser=unet_denoiser):
        self.unet = unet
        self._denoise = make_denoiser(unet)  # the family's denoiser (``stack.denoiser``): UNets and transformers

    def __call__(self, noisy, timesteps, conditioning):
        with torch.no_grad(), adapters_disabled(self.unet):
            return self._denoise(noisy, timesteps, conditioning)


class FrozenCopyReference:
    """Reference = a separately loaded, frozen base UNet (full fine-tuning)."""

    kind = "frozen_copy"

    def __init__(self, unet, device, dtype: torch.dtype, offload: bool = False, make_denoiser=unet_denoiser):
        unet.requires_grad_(False).eval()
        if offload:
            from accelerate import cpu_offload

            unet.to("cpu", dtype)
            cpu_offload(unet, execution_device=torch.device(device))
        else:
            unet.to(device, dtype)
        self.unet, self.dtype = unet, dtype
        self._denoise = make_denoiser(unet)

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


REFERENCE_ADAPTER = "reference"


class LoraSnapshotReference:
    """Reference = a past state of a LoRA policy (a SePPO pool draw, D3PO's previous round), held
    in a second, frozen peft adapter of the same UNet; ``load(None)`` means the base model.

    Create it before ``accelerator.prepare`` so that data-parallel wrapping sees only the
    policy adapter as trainable."""

    kind = "lora_snapshot"

    def __init__(self, unet, make_denoiser=unet_denoiser):
        import copy
        import warnings

        self.unet = unet
        with warnings.catch_warnings():  # peft warns about a second adapter: here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(copy.deepcopy(unet.peft_config["default"]), adapter_name=REFERENCE_ADAPTER)
        unet.set_adapter("default")  # add_adapter activated the new one
        self.snapshot_id = None  # what is loaded: None (base) or the snapshot's id
        self.base = True
        self._denoise = make_denoiser(unet)

    def load(self, snapshot: dict | None, snapshot_id=None) -> None:
        """Make ``snapshot`` (a LoRA state dict from ``policy_snapshot``; None: the base) the reference."""
        from peft.utils import set_peft_model_state_dict

        if snapshot is not None and (snapshot_id is None or snapshot_id != self.snapshot_id):
            result = set_peft_model_state_dict(self.unet, snapshot, adapter_name=REFERENCE_ADAPTER)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"reference snapshot holds LoRA weights this model lacks: {result.unexpected_keys[:3]}")
        self.snapshot_id = snapshot_id if snapshot is not None else None
        self.base = snapshot is None

    def __call__(self, noisy, timesteps, conditioning):
        with torch.no_grad():
            if self.base:
                with adapters_disabled(self.unet):
                    return self._denoise(noisy, timesteps, conditioning)
            self.unet.set_adapter(REFERENCE_ADAPTER)
            try:
                return self._denoise(noisy, timesteps, conditioning)
            finally:
                self.unet.set_adapter("default")  # also restores requires_grad on the policy adapter


class FullSnapshotReference(FrozenCopyReference):
    """Reference = a past state of a fully fine-tuned policy, in a frozen copy; ``load(None)`` puts
    the base weights back (kept on the CPU once)."""

    kind = "full_snapshot"

    def __init__(self, unet, device, dtype: torch.dtype, offload: bool = False, make_denoiser=unet_denoiser):
        self.base_state = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
        super().__init__(unet, device, dtype, offload, make_denoiser)
        self.snapshot_id = None

    def load(self, snapshot: dict | None, snapshot_id=None) -> None:
        if snapshot_id is not None and snapshot_id == self.snapshot_id and snapshot is not None:
            return
        self.unet.load_state_dict(self.base_state if snapshot is None else snapshot)
        self.snapshot_id = snapshot_id if snapshot is not None else None


def policy_snapshot(unet, finetune: str) -> dict:
    """The trainable state of the policy on the CPU: the LoRA weights, or the whole UNet."""
    if finetune == "lora":
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet, adapter_name="default")
    else:
        state = unet.state_dict()
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
