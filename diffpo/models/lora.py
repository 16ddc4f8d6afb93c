"""LoRA on the UNet through peft, and export in the format ``pipe.load_lora_weights`` reads."""

from __future__ import annotations

import re
from pathlib import Path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


LORA_PARTS = ("both", "spatial", "motion")


def attach_lora(unet, rank: int, alpha: float | None, dropout: float, target_modules: list[str],
                part: str = "both", family=None) -> list:
    """Freeze the UNet, add a LoRA adapter (A Gaussian, B = 0, so the policy starts equal to the
    base model), and return the trainable LoRA parameters.

    ``part`` picks where in a video UNet: ``spatial`` (the image layers), ``motion`` (``family``'s
    temporal layers) or ``both``. Layers the family's UNet calls with keyword arguments (which peft's
    LoRA layers do not take) are left out; otherwise, with ``both``, the adapter config holds
    ``target_modules`` as given."""
    from peft import LoraConfig

    if target_modules is None:  # lora.target_modules=null: the family's attention projections
        target_modules = list(family.lora_targets) if family is not None else ["to_q", "to_k", "to_v", "to_out.0"]
    targets = list(target_modules)
    if part != "both" or (family is not None and family.keyword_called):
        targets = lora_target_names(unet, targets, part, family)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"lora.target_modules={list(target_modules)} matched no UNet module: use names like to_q, to_k, to_v, to_out.0")
    return params


def lora_target_names(unet, target_modules: list[str], part: str, family) -> list[str]:
    """The full module paths matching ``target_modules`` (a name or a dotted suffix, as peft
    matches them) inside ``family``'s temporal layers (``motion``), outside them (``spatial``) or
    anywhere (``both``), less those ``family.keyword_called`` matches."""
    from diffpo.models.families import is_motion_module

    if part not in LORA_PARTS:
        raise ValueError(f"lora.part={part!r} is unknown: use one of {', '.join(LORA_PARTS)}")
    if part != "both" and (family is None or not family.video):
        raise ValueError(f"lora.part={part} selects spatial or motion layers of a video UNet; this model has no "
                         "motion modules: set lora.part=both")
    if part != "both" and not family.motion_markers:  # Wan: every attention is spatio-temporal
        raise ValueError(f"lora.part={part} selects spatial or motion layers; {family.unet_class_name} attends over "
                         "space and time jointly, with no separate motion layers: set lora.part=both")
    found = [name for name, _ in unet.named_modules()
             if any(name == t or name.endswith("." + t) for t in target_modules)
             and (part == "both" or is_motion_module(family, name) == (part == "motion"))
             and not (family is not None and family.keyword_called and re.search(family.keyword_called, name))]
    if not found:
        raise ValueError(f"lora.target_modules={target_modules} matched no {part} module of this "
                         f"{family.unet_class_name}: use names like to_q, to_k, to_v, to_out.0")
    return found


def export_lora(unet, pipeline_class, out_dir: str | Path, state_dict: dict | None = None,
                layers_argument: str = "unet_lora_layers") -> Path:
    """Write the UNet's LoRA as ``pytorch_lora_weights.safetensors`` (diffusers format, with the
    adapter config as metadata so alpha survives loading). ``state_dict``: the UNet's full state
    when its own parameters are shards (FSDP, ZeRO-3), gathered by ``accelerator.get_state_dict``.

    The keys stay in peft's one naming (``...to_q.lora_A.weight``): diffusers' old-format
    conversion renames only the attention processors' layers (``...to_q.lora.down.weight``), and a
    file that mixes the two namings is read with one of them, silently dropping the other's
    modules. ``load_lora_weights`` reads peft naming as it is, every module. ``layers_argument``: the
    pipeline's ``save_lora_weights`` keyword for the denoiser (the family's ``lora_layers_argument``:
    ``unet_lora_layers``, or ``transformer_lora_layers`` for SD3 / FLUX)."""
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet, state_dict=state_dict)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    metadata = unet.peft_config["default"].to_dict()
    component = layers_argument.removesuffix("_lora_layers")
    pipeline_class.save_lora_weights(
        out_dir, weight_name=LORA_WEIGHT_NAME, **{layers_argument: state, f"{component}_lora_adapter_metadata": metadata}
    )
    return out_dir / LORA_WEIGHT_NAME


def lora_module_names(state: dict) -> set[str]:
    """The adapted modules of a LoRA state dict in either naming (``x.lora_A.weight`` or
    ``x.lora.down.weight``), by module path: the count to check after a round trip."""
    names = set()
    for key in state:
        for marker in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer."):
            if marker in key:
                names.add(key.split(marker)[0])
                break
    return names


LORA_CHECKPOINT_NAME = "lora_adapter.safetensors"


def lora_checkpoint_state(model) -> dict:
    """The trained adapter of ``model`` (peft's state-dict format), on the CPU, ready for safetensors."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_checkpoint_state(model, state: dict, source) -> None:
    """Put ``lora_checkpoint_state`` output back into ``model``; weights this model lacks are an error."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint {source} holds LoRA weights this model lacks: {result.unexpected_keys[:3]}")


def register_lora_checkpointing(accelerator, unet) -> None:
    """Make ``accelerator.save_state`` store only the LoRA weights (MBs, not the whole UNet's GBs)
    and ``load_state`` put them back into ``unet``. (diffpo's own checkpoints, trainers.training_state,
    do the same without these hooks; accelerate's format is used for FSDP / DeepSpeed.)"""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models if accelerator.is_main_process else []:  # one writer: every process holds the same weights
            save_file(lora_checkpoint_state(accelerator.unwrap_model(model)), str(Path(output_dir) / LORA_CHECKPOINT_NAME))
        weights.clear()  # the base weights never change: do not write them

    def load_hook(models, input_dir):
        state = load_file(str(Path(input_dir) / LORA_CHECKPOINT_NAME))
        while models:
            load_lora_checkpoint_state(accelerator.unwrap_model(models.pop()), state, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
