"""What diffpo exports is the model it trained, read back by the consumer's own loader.

For every family and LoRA target set the exported ``pytorch_lora_weights.safetensors`` loads with
the pipeline's own ``load_lora_weights``: every adapted module is injected (counted), no library
warns of missing or extra modules, and the loaded denoiser gives the trained policy's output on
the same input (within 1e-5). A full fine-tuning export loads with ``from_pretrained`` and equals
the trained weights exactly."""

from __future__ import annotations

import json
import logging
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from diffpo.models.loading import load_stack, unet_denoiser
from diffpo.models.lora import LORA_WEIGHT_NAME, attach_lora, export_lora, lora_module_names

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# the quickstart's targets: attention, projections, feed-forward, resnet convs, time embedding
WIDE = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
FRAMES = 4


@contextmanager
def library_warnings():
    """Collect what peft (``warnings``) and diffusers / transformers (logging) warn inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    handler = Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for logger in loggers:
            logger.addHandler(handler)
        try:
            yield messages
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            messages.extend(str(w.message) for w in caught)


# diffpo trains the denoiser only: diffusers notes (as info, with "safe to ignore") that the file has
# no text-encoder LoRA. Every other warning fails the round trip.
NO_TEXT_ENCODER_LORA = "No LoRA keys associated to"


def denoiser_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if not m.startswith(NO_TEXT_ENCODER_LORA)]


def lora_layers(model) -> set[str]:
    """Names of the modules of ``model`` that carry a peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def denoiser_inputs(stack, seed: int = 0):
    """A fixed (x_t, t, conditioning) for the stack's UNet: images, or clips of FRAMES frames."""
    gen = torch.Generator().manual_seed(seed)
    size = stack.unet.config.sample_size
    channels = stack.unet.config.in_channels
    shape = (2, channels, FRAMES, size, size) if stack.is_video else (2, channels, size, size)
    x = torch.randn(*shape, generator=gen)
    t = torch.tensor([150, 700])
    text = stack.encode_prompts(["a red circle on a blue background", "a white square on a black background"])
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    return x, t, stack.family.unet_conditioning(text, time_ids)


def perturb(params, seed: int = 1) -> None:
    """Give every LoRA matrix (B included) non-zero values, as training does."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


CASES = [
    ("tiny_sd_dir", ATTENTION, "both"),
    ("tiny_sd_dir", WIDE, "both"),
    ("tiny_sdxl_dir", WIDE, "both"),
    ("tiny_animatediff_dir", ATTENTION, "motion"),
    ("tiny_animatediff_dir", WIDE, "both"),
]


@pytest.mark.parametrize("model_fixture,targets,part", CASES,
                         ids=["sd-attention", "sd-wide", "sdxl-wide", "animatediff-motion", "animatediff-wide"])
def test_exported_lora_loads_every_module_and_equals_the_trained_policy(request, tmp_path, model_fixture, targets, part):
    source = request.getfixturevalue(model_fixture)
    stack = load_stack(source)
    perturb(attach_lora(stack.unet, 4, 8.0, 0.0, targets, part, stack.family))  # alpha != rank: the scale must survive
    trained_modules = lora_layers(stack.unet)
    path = export_lora(stack.unet, stack.family.pipeline_class, tmp_path / "final")
    state = load_file(str(path))
    assert lora_module_names(state) == {f"unet.{name}" for name in trained_modules}
    assert all(".lora.down." not in key and ".lora.up." not in key for key in state)  # one naming only

    pipe = stack.family.pipeline_class.from_pretrained(source)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(tmp_path / "final"))
    assert denoiser_warnings(messages) == [], messages
    assert lora_layers(pipe.unet) == trained_modules  # every adapted module injected, none extra
    x, t, cond = denoiser_inputs(stack)
    with torch.no_grad():
        trained = unet_denoiser(stack.unet)(x, t, cond)
        loaded = unet_denoiser(pipe.unet)(x, t, cond)
        base = unet_denoiser(stack.unet.__class__.from_pretrained(source, subfolder="unet"))(x, t, cond)
    assert (loaded - trained).abs().max() < 1e-5
    assert (trained - base).abs().max() > 1e-3  # the LoRA changes the output: the equality above says something


def _train(tmp_path, source, parquet, *overrides):
    from diffpo.config import TrainConfig, load_config
    from diffpo.trainers import run_training

    config = load_config(TrainConfig, None, [f"output_dir={tmp_path / 'run'}", f"model.pretrained={source}",
                                             f"data.source={parquet}", "data.resolution=32", "train_batch_size=2",
                                             "max_steps=3", "checkpoint_every=3", "log_every=1", "optim.lr=1e-2",
                                             "data.num_workers=0", *overrides])
    return run_training(config)


def test_trained_run_exports_what_it_trained_with_the_quickstart_targets(tmp_path, tiny_sd_dir, shapes_parquet):
    """End to end: the run's exported LoRA, loaded by diffusers, equals the policy restored from the
    run's own last checkpoint (the weights the loop trained)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import set_peft_model_state_dict

    run_dir = _train(tmp_path, tiny_sd_dir, shapes_parquet, "lora.rank=4", f"lora.target_modules={json.dumps(WIDE)}")
    stack = load_stack(tiny_sd_dir)
    attach_lora(stack.unet, 4, None, 0.0, WIDE)
    set_peft_model_state_dict(stack.unet, load_file(str(run_dir / "checkpoints" / "step-3" / "lora_adapter.safetensors")))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(run_dir / "final"))
    assert denoiser_warnings(messages) == [], messages
    assert lora_layers(pipe.unet) == lora_layers(stack.unet) and len(lora_layers(pipe.unet)) > 40
    x, t, cond = denoiser_inputs(stack)
    with torch.no_grad():
        assert (unet_denoiser(pipe.unet)(x, t, cond) - unet_denoiser(stack.unet)(x, t, cond)).abs().max() < 1e-5


def test_full_finetuning_export_equals_the_trained_weights(tmp_path, tiny_sd_dir, shapes_parquet):
    from diffusers import UNet2DConditionModel

    run_dir = _train(tmp_path, tiny_sd_dir, shapes_parquet, "finetune=full", "optim.lr=1e-4")
    exported = UNet2DConditionModel.from_pretrained(run_dir / "final" / "unet")
    trained = load_file(str(run_dir / "checkpoints" / "step-3" / "model.safetensors"))
    state = exported.state_dict()
    assert trained and all(torch.equal(state[name], value) for name, value in trained.items() if name in state)
    assert sum(name in state for name in trained) == len(state)
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").state_dict()
    assert any(not torch.equal(state[name], base[name]) for name in state)
    assert math.isfinite(sum(v.float().sum().item() for v in state.values()))


def test_exported_folder_has_a_model_card_that_loads_the_lora(tmp_path, tiny_sd_dir, shapes_parquet):
    run_dir = _train(tmp_path, tiny_sd_dir, shapes_parquet)
    card = (run_dir / "final" / "README.md").read_text()
    assert "load_lora_weights" in card and LORA_WEIGHT_NAME in card
    for fact in ("diffusion_dpo", "beta", "3", tiny_sd_dir, "diffpo"):
        assert fact in card, fact
