"""The resumable state of a training run as safetensors files, without pickle.

``save_training_state`` writes what ``accelerator.save_state`` would, for the objects prepared by
or registered with the accelerator, but every file is safetensors (``diffpo.serialization``):

* ``lora_adapter.safetensors`` (a model with a LoRA adapter: the adapter only, in peft's format;
  the base weights never change) or ``model.safetensors`` (its trainable parameters and buffers),
  ``_1``, ... for further models.
* ``optimizer.safetensors``, ``scheduler.safetensors`` (``_1``, ...): their state dicts.
* ``custom_checkpoint_N.safetensors``: objects given to ``register_for_checkpointing`` (EMA, ...).
* ``scaler.safetensors``: the fp16 gradient scaler.
* ``random_states_P.safetensors``: per process, the python, numpy and torch (CPU and device) RNG
  states and accelerate's micro-step counter (it decides which micro-steps sync gradients).

FSDP, DeepSpeed and Megatron-LM shard weights and optimizer states in their own formats: with
those, accelerate's own ``save_state`` / ``load_state`` are used.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from diffpo.config import ConfigError
from diffpo.serialization import load_state_file, save_state_file

SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate DistributedType names it checkpoints itself


def _name(stem: str, index: int) -> str:
    return f"{stem}.safetensors" if index == 0 else f"{stem}_{index}.safetensors"


def uses_accelerate_format(accelerator) -> bool:
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)) in SHARDED


def _is_lora(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def trained_weights(model) -> tuple[str, dict[str, torch.Tensor]]:
    """(file stem, tensors) of what training changes in ``model``: its LoRA adapter, or else its
    trainable parameters and buffers."""
    if _is_lora(model):
        from diffpo.models.lora import lora_checkpoint_state

        return "lora_adapter", lora_checkpoint_state(model)
    keep = {name for name, p in model.named_parameters() if p.requires_grad} | {name for name, _ in model.named_buffers()}
    return "model", {name: value for name, value in model.state_dict().items() if name in keep}


def _rng_state(accelerator) -> dict:
    state = {"step": int(accelerator.step), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        state["xpu"] = torch.xpu.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(accelerator, state: dict) -> None:
    accelerator.step = state["step"]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "xpu" in state and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.set_rng_state_all(state["xpu"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def save_training_state(accelerator, folder: Path) -> None:
    """Write the accelerator's models, optimizers, schedulers, registered objects, scaler and RNG
    states into ``folder`` (every process calls this; the main process writes the shared parts)."""
    if uses_accelerate_format(accelerator):
        accelerator.save_state(str(folder))
        return
    folder = Path(folder)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        for i, model in enumerate(accelerator._models):  # what accelerator.save_state iterates, too
            stem, weights = trained_weights(accelerator.unwrap_model(model))
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / _name(stem, i)))
        for i, optimizer in enumerate(accelerator._optimizers):
            save_state_file(optimizer.state_dict(), folder / _name("optimizer", i))
        for i, scheduler in enumerate(accelerator._schedulers):
            save_state_file(scheduler.state_dict(), folder / _name("scheduler", i))
        for i, obj in enumerate(accelerator._custom_objects):
            save_state_file(obj.state_dict(), folder / f"custom_checkpoint_{i}.safetensors")
        if accelerator.scaler is not None:
            save_state_file(accelerator.scaler.state_dict(), folder / "scaler.safetensors")
    save_state_file(_rng_state(accelerator), folder / f"random_states_{accelerator.process_index}.safetensors")


def load_training_state(accelerator, folder: Path) -> None:
    """Put the state ``save_training_state`` wrote into ``folder`` back into the accelerator's objects.
    A checkpoint of another configuration (other trained weights) is a ConfigError naming the keys."""
    if uses_accelerate_format(accelerator):
        accelerator.load_state(str(folder))
        return
    from safetensors.torch import load_file

    folder = Path(folder)
    models = [accelerator.unwrap_model(model) for model in accelerator._models]
    expected = [trained_weights(model) for model in models]
    required = [_name(stem, i) for i, (stem, _) in enumerate(expected)]
    required += [_name("optimizer", i) for i in range(len(accelerator._optimizers))]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        older = " (it holds pickle files from an older diffpo: start a new run)" if any(folder.glob("*.bin")) else ""
        other = [p.name for p in folder.glob("*.safetensors") if p.name.startswith(("model", "lora_adapter"))]
        setup = f" (it holds {', '.join(sorted(other))}: another finetune setting)" if other and not older else ""
        raise ConfigError(f"checkpoint {folder} lacks {', '.join(missing)}{older}{setup}: resume with the config of the "
                          "run that wrote it (its RUN_DIR/config.yaml) or start a new output_dir")
    for i, (model, (stem, current)) in enumerate(zip(models, expected)):
        saved = load_file(str(folder / _name(stem, i)))
        if saved.keys() != current.keys() or any(saved[k].shape != current[k].shape for k in saved):
            extra = sorted(saved.keys() - current.keys())[:2]
            absent = sorted(current.keys() - saved.keys())[:2]
            shapes = [k for k in saved.keys() & current.keys() if saved[k].shape != current[k].shape][:2]
            raise ConfigError(
                f"checkpoint {folder} was written by another model or fine-tuning setup (finetune, lora.rank, "
                f"lora.target_modules): unexpected {extra}, missing {absent}, other shapes {shapes}; resume with "
                "the config of that run (its RUN_DIR/config.yaml) or start a new output_dir")
        if stem == "lora_adapter":
            from diffpo.models.lora import load_lora_checkpoint_state

            load_lora_checkpoint_state(model, saved, folder)
        else:
            model.load_state_dict(saved, strict=False)
    for i, optimizer in enumerate(accelerator._optimizers):
        optimizer.load_state_dict(load_state_file(folder / _name("optimizer", i)))
    for i, scheduler in enumerate(accelerator._schedulers):
        scheduler.load_state_dict(load_state_file(folder / _name("scheduler", i)))
    for i, obj in enumerate(accelerator._custom_objects):
        obj.load_state_dict(load_state_file(folder / f"custom_checkpoint_{i}.safetensors", device=accelerator.device))
    if accelerator.scaler is not None and (folder / "scaler.safetensors").is_file():
        accelerator.scaler.load_state_dict(load_state_file(folder / "scaler.safetensors"))
    rng = folder / f"random_states_{accelerator.process_index}.safetensors"
    if rng.is_file():  # a run resumed on more processes than it was saved from starts their RNGs fresh
        _set_rng_state(accelerator, load_state_file(rng))
