"""Loading, LoRA, the adapters-disabled reference, and export to diffusers pipelines."""

import math

import pytest
import torch

from diffpo.kernel.denoising import noise_pairs, pair_errors, pair_noise, prediction_target
from diffpo.models.loading import load_stack, resolve_source, unet_denoiser
from diffpo.models.lora import attach_lora, export_lora
from diffpo.models.reference import AdaptersDisabledReference, adapters_disabled
from diffpo.objectives import diffusion_dpo_loss

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def stack(tiny_sd_dir):
    return load_stack(tiny_sd_dir)


def _inputs(stack, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = stack.unet.config.sample_size
    x = torch.randn(2 * batch, 4, size, size, generator=gen)
    t = torch.randint(0, 1000, (2 * batch,), generator=gen)
    text = stack.encode_prompts(["a red circle on a blue background"] * batch).repeat_pairs()
    return x, t, stack.family.unet_conditioning(text)


def test_load_stack_reads_family_and_components(stack, tiny_sd_dir):
    assert stack.family.name == "sd"
    assert stack.prediction_type == "epsilon"
    assert stack.vae_scale_factor == 2 and stack.native_resolution == 32
    assert not any(p.requires_grad for p in stack.unet.parameters())
    assert stack.encode_prompts(["a", "b"]).hidden.shape == (2, 77, 64)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        resolve_source(str(tmp_path))


def test_prediction_type_override(tiny_sd_dir):
    assert load_stack(tiny_sd_dir, prediction_type="v_prediction").prediction_type == "v_prediction"


def test_only_lora_parameters_train_and_reference_equals_base(stack, tiny_sd_dir):
    base = load_stack(tiny_sd_dir).unet
    params = attach_lora(stack.unet, 4, None, 0.0, TARGETS)
    names = [n for n, p in stack.unet.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert len(params) == len(names)
    # make the adapters non-trivial, then the disabled-adapter reference must equal the base UNet bit for bit
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    x, t, cond = _inputs(stack)
    reference = AdaptersDisabledReference(stack.unet)
    with torch.no_grad():
        expected = unet_denoiser(base)(x, t, cond)
        policy_out = unet_denoiser(stack.unet)(x, t, cond)
    assert torch.equal(reference(x, t, cond), expected)
    assert not torch.allclose(policy_out, expected)


def test_adapters_come_back_on_after_an_exception(stack):
    attach_lora(stack.unet, 4, None, 0.0, TARGETS)
    with pytest.raises(RuntimeError):
        with adapters_disabled(stack.unet):
            raise RuntimeError("boom")
    layer = next(m for n, m in stack.unet.named_modules() if n.endswith("to_q"))
    assert not layer.disable_adapters


def test_loss_is_log2_at_initialisation_through_the_real_kernel(stack):
    attach_lora(stack.unet, 4, None, 0.0, TARGETS)
    gen = torch.Generator().manual_seed(0)
    lw, ll = torch.randn(3, 4, 16, 16, generator=gen), torch.randn(3, 4, 16, 16, generator=gen)
    noise, t = pair_noise(lw, 1000, gen)
    noised = noise_pairs(stack.noise_process, lw, ll, noise, t)
    target = prediction_target("epsilon", stack.noise_scheduler, noised.latents, noised.noise, noised.timesteps)
    cond = stack.family.unet_conditioning(stack.encode_prompts(["a"] * 3).repeat_pairs())
    errors = pair_errors(unet_denoiser(stack.unet), AdaptersDisabledReference(stack.unet), noised, cond, target)
    loss, metrics = diffusion_dpo_loss(errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, beta=5000.0)
    assert torch.equal(loss, torch.full_like(loss, math.log(2.0)))
    assert metrics["implicit_acc"].item() == 0.5


def test_one_step_changes_lora_and_not_the_base(stack):
    params = attach_lora(stack.unet, 4, None, 0.0, TARGETS)
    frozen = {n: p.detach().clone() for n, p in stack.unet.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x, t, cond = _inputs(stack)
    out = unet_denoiser(stack.unet)(x, t, cond)
    out.pow(2).mean().backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(frozen[n], p) for n, p in stack.unet.named_parameters() if n in frozen)


def test_exported_lora_loads_into_pipeline_and_reproduces_the_policy(stack, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    params = attach_lora(stack.unet, 4, 8.0, 0.0, TARGETS)  # alpha != rank: the scale must survive export
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    path = export_lora(stack.unet, StableDiffusionPipeline, tmp_path / "final")
    assert path.name == "pytorch_lora_weights.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    x, t, cond = _inputs(stack)
    with torch.no_grad():
        base_out = pipe.unet(x, t, **cond).sample
        pipe.load_lora_weights(str(tmp_path / "final"))
        loaded_out = pipe.unet(x, t, **cond).sample
        policy_out = unet_denoiser(stack.unet)(x, t, cond)
    assert not torch.allclose(loaded_out, base_out)
    assert torch.allclose(loaded_out, policy_out, atol=1e-5)
