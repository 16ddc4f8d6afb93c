"""Wan2.1 / Wan2.2 text-to-video (a flow-matching video transformer) on the shared kernel: a tiny
``WanPipeline`` built in code and saved in the diffusers folder format, loaded by ``load_stack`` as a
hub model would be; UMT5 conditioning and the VAE's per-channel latent normalisation equal to the
pipeline's; 5-D flow noising; every objective at its value at initialisation; training end to end
through ``diffpo train``; a LoRA that ``WanPipeline.load_lora_weights`` loads completely and exactly;
frame-count errors; the cache; ``diffpo eval`` on the Wan pipeline."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch

from diffpo.config import ConfigError, TrainConfig, load_config
from diffpo.kernel.denoising import PairStreams, noise_pairs
from diffpo.models.loading import load_stack

LOG2 = math.log(2)
FRAMES = 5  # 4k + 1: two latent frames
PROMPTS = ["a red circle moving left on a blue background", "a yellow square moving up on a black background"]


@pytest.fixture(scope="module")
def wan_pairs(tmp_path_factory):
    """8 pairs of 5-frame 32 px moving-shape clips (lists of PNG frames in a parquet)."""
    from diffpo.data.moving_shapes import sample_moving_shapes
    from diffpo.data.writer import write_pairs_parquet

    clips = sample_moving_shapes(16, size=32, frames=FRAMES, seed=3)
    pairs = [{"image_0": clips[2 * i][0], "image_1": clips[2 * i + 1][0], "label_0": float(i % 2),
              "caption": clips[2 * i][1]} for i in range(8)]
    return str(write_pairs_parquet(tmp_path_factory.mktemp("wan-pairs") / "pairs.parquet", pairs))


def _config(tmp_path, model_dir, data, name, *overrides):
    return load_config(TrainConfig, None, [
        f"model.pretrained={model_dir}", f"data.source={data}", f"output_dir={tmp_path / name}", "data.resolution=32",
        f"data.num_frames={FRAMES}", "max_steps=2", "train_batch_size=2", "optim.lr=1e-2", "objective.beta=500",
        "progress_bar=false", "checkpoint_every=0", f"cache.dir={tmp_path / 'cache'}", *overrides])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 16, 2, 4, 4, generator=torch.Generator().manual_seed(seed))  # (B, C, F', h, w)


# ---- loading and conditioning -------------------------------------------------------------------


def test_tiny_wan_folder_loads_through_load_stack_and_encodes_prompts_as_the_pipeline(tiny_wan_dir):
    from pathlib import Path

    from diffusers import WanPipeline

    from diffpo.kernel.noise_process import RectifiedFlowProcess

    index = json.loads((Path(tiny_wan_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer"][1] == "WanTransformer3DModel"
    scheduler = json.loads((Path(tiny_wan_dir) / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler" and scheduler["flow_shift"] == 3.0  # the hub format

    stack = load_stack(tiny_wan_dir)
    assert stack.family.name == "wan" and stack.prediction_type == "flow" and stack.is_video
    assert (type(stack.unet).__name__, type(stack.vae).__name__, type(stack.text_encoders[0]).__name__) == (
        "WanTransformer3DModel", "AutoencoderKLWan", "UMT5EncoderModel")
    process = stack.noise_process
    assert isinstance(process, RectifiedFlowProcess) and process.shift == 3.0 and process.dynamic is None
    assert stack.vae_scale_factor == 8 and stack.latent_channels == 16

    text = stack.encode_prompts(PROMPTS)
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    hidden, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)
    assert text.hidden.shape == (2, 512, 32) and text.pooled is None
    torch.testing.assert_close(text.hidden, hidden, atol=1e-6, rtol=0)
    tokens = stack.tokenizers[0](PROMPTS[0]).input_ids
    assert text.hidden[0, len(tokens) - 1].abs().sum() > 0 and not text.hidden[0, len(tokens):].any()
    assert load_stack(tiny_wan_dir, max_sequence_length=64).encode_prompts(PROMPTS).hidden.shape == (2, 64, 32)


def test_wan_latents_are_normalised_by_the_vae_per_channel_mean_and_std(tiny_wan_dir):
    stack = load_stack(tiny_wan_dir)
    pixels = torch.rand(2, FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = stack.encode_images(pixels)
    assert mean.shape == std.shape == (2, 16, 2, 4, 4)  # (F - 1) / 4 + 1 latent frames, 32 / 8 sides
    dist = stack.vae.encode(pixels.transpose(1, 2)).latent_dist  # the whole clip at once (a causal 3-D VAE)
    assert torch.equal(mean, dist.mean) and torch.equal(std, dist.std)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
    latents = stack.latents_from_distribution(mean, std, eps)
    config = stack.vae.config
    # channel 7 by hand: Wan2.1's latents_mean[7] = 1.5508, latents_std[7] = 2.0743
    assert (config.latents_mean[7], config.latents_std[7]) == (1.5508, 2.0743)
    torch.testing.assert_close(latents[:, 7], (mean[:, 7] + std[:, 7] * eps[:, 7] - 1.5508) / 2.0743)
    # decoding inverts it as WanPipeline does: latents / (1 / std) + mean, then the VAE decoder
    video = stack.decode_latents(latents)
    assert video.shape == (2, FRAMES, 3, 32, 32) and 0 <= video.min() and video.max() <= 1
    mu = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        decoded = stack.vae.decode(latents / inv_std + mu).sample
    torch.testing.assert_close(video, ((decoded + 1) / 2).clamp(0, 1).transpose(1, 2), atol=1e-6, rtol=0)


def test_wan_denoiser_is_the_pipelines_transformer_call(tiny_wan_dir):
    from diffpo.models.families import WAN_EXPANDED

    stack = load_stack(tiny_wan_dir)
    text = stack.encode_prompts(PROMPTS)
    x, t = _latents(), torch.tensor([250.0, 800.0])
    cond = stack.family.unet_conditioning(text)
    with torch.no_grad():
        direct = stack.unet(hidden_states=x, timestep=t, encoder_hidden_states=text.hidden).sample
        ours = stack.denoiser()(x, t, cond)
        # Wan2.2 TI2V (expand_timesteps): the same timestep for each of the 2 x 2 x 2 latent tokens
        expanded = WAN_EXPANDED.denoiser(stack.unet)(x, t, cond)
    assert torch.equal(ours, direct) and ours.shape == x.shape
    torch.testing.assert_close(expanded, direct, atol=1e-5, rtol=1e-5)


def test_wan22_two_expert_pipelines_are_refused_and_ti2v_gets_per_token_timesteps(tmp_path):
    from diffpo.models.families import family_for

    wan = family_for("WanPipeline")
    assert wan.resolve({"_class_name": "WanPipeline", "transformer_2": [None, None]}) is wan
    assert wan.resolve({"_class_name": "WanPipeline", "expand_timesteps": True}).expand_timesteps
    with pytest.raises(ValueError, match="two experts .* diffpo trains one denoiser per run") as error:
        wan.resolve({"_class_name": "WanPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"],
                     "boundary_ratio": 0.875})
    assert "\n" not in str(error.value)


# ---- the kernel on 5-D flow latents ---------------------------------------------------------------


def test_5d_flow_noising_shares_noise_and_sigma_per_pair_across_frames(tiny_wan_dir):
    from diffpo.kernel.noise_process import FlowSampling, RectifiedFlowProcess, static_shift

    process = load_stack(tiny_wan_dir).noise_process
    w, lo = _latents(3, 0), _latents(3, 1)
    noise, t = process.draw(w, PairStreams(0, 0, [0, 1, 2]))
    assert noise.shape == w.shape and t.shape == (3,)
    noised = noise_pairs(process, w, lo, noise, t)
    assert torch.equal(noised.noise[:3], noised.noise[3:]) and torch.equal(noised.timesteps[:3], noised.timesteps[3:])
    sigma = t / 1000
    for b in range(3):
        for f in range(w.shape[2]):  # every latent frame of a clip at the pair's one sigma, winner and loser alike
            for x, row in ((w, b), (lo, b + 3)):
                expected = (1 - sigma[b]) * x[b, :, f] + sigma[b] * noise[b, :, f]
                torch.testing.assert_close(noised.noisy[row, :, f], expected)
    target = process.target(noised.latents, noised.noise, noised.timesteps)
    torch.testing.assert_close(target, noised.noise - noised.latents)
    # sigma is the logit-normal draw under Wan's static shift 3: sigma = 3u / (1 + 2u)
    plain = RectifiedFlowProcess(FlowSampling(), shift=1.0)
    _, t_plain = plain.draw(w, PairStreams(0, 0, [0, 1, 2]))
    torch.testing.assert_close(sigma, static_shift(t_plain / 1000, 3.0))


def test_every_objective_starts_at_its_initial_value_on_wan(tiny_wan_dir):
    from test_flow_models import assert_objectives_start_at_their_initial_values

    assert_objectives_start_at_their_initial_values(load_stack(tiny_wan_dir), _latents(2, 0), _latents(2, 1), PROMPTS,
                                                    beta=500.0)


# ---- sizes the VAE and transformer cannot take -----------------------------------------------------


def test_frame_counts_and_sides_the_wan_vae_cannot_take_fail_in_one_line(tmp_path, tiny_wan_dir, wan_pairs):
    from diffpo.trainers import run_training

    for overrides, message in [
        (["data.num_frames=4"], r"data.num_frames=4: the Wan VAE takes 4k\+1 frames \(1, 5, 9, 13, \.\.\.\): use 5"),
        (["data.num_frames=8"], r"data.num_frames=8: .* use 9"),
        (["data.resolution=40"], r"data.resolution=40 is not a multiple of 16 .* use 32"),
        (["data.num_frames=null"], r"is a video model \(WanPipeline\): set data.num_frames"),
    ]:
        with pytest.raises(ConfigError, match=message) as error:
            run_training(_config(tmp_path, tiny_wan_dir, wan_pairs, "bad", *overrides))
        assert "\n" not in str(error.value)
    stack = load_stack(tiny_wan_dir)
    with pytest.raises(ValueError, match=r"lora.part=motion selects .* no separate motion layers: set lora.part=both"):
        run_training(_config(tmp_path, tiny_wan_dir, wan_pairs, "bad", "lora.part=motion"))
    with pytest.raises(ValueError, match=r"frames per clip=4: .* use 5"):
        stack.encode_images(torch.zeros(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"encodes clips \(N, F, 3, H, W\)"):
        stack.encode_images(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"sampling.num_frames=7: .* use 9"):
        stack.family.pipeline_latent_shape(stack.pipeline(), 4, 7)
    assert stack.family.pipeline_latent_shape(stack.pipeline(), 4, 9) == (16, 3, 4, 4)


# ---- training end to end, export ------------------------------------------------------------------


def _trained_lora_transformer(model_dir, run_dir, rank=8):
    """The policy as training left it: the base transformer with the run's last LoRA checkpoint."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from diffpo.models.lora import attach_lora

    stack = load_stack(model_dir)
    attach_lora(stack.unet, rank, None, 0.0, None, family=stack.family)
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    set_peft_model_state_dict(stack.unet, load_file(checkpoint / "lora_adapter.safetensors"))
    return stack


def _load_lora_quietly(pipe, folder, caplog):
    """``pipe.load_lora_weights(folder)``; returns the warnings and log records that name dropped keys."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pipe.load_lora_weights(folder)
    complaints = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return [c for c in complaints if any(word in c.lower() for word in ("missing key", "unexpected key",
                                                                         "additional target", "not found"))]


def test_wan_flow_dpo_through_diffpo_train_exports_a_lora_wan_pipeline_loads_exactly(tmp_path, tiny_wan_dir, wan_pairs,
                                                                                     caplog):
    import yaml
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    from diffpo.cli import main
    from diffpo.models.lora import lora_module_names

    config = tmp_path / "wan_tiny.yaml"
    config.write_text(yaml.safe_dump({
        "method": "diffusion_dpo", "output_dir": str(tmp_path / "run"), "finetune": "lora", "max_steps": 2,
        "train_batch_size": 2, "progress_bar": False, "checkpoint_every": 0,
        "model": {"pretrained": tiny_wan_dir}, "lora": {"rank": 8},
        "data": {"source": wan_pairs, "resolution": 32, "num_frames": FRAMES},
        "objective": {"beta": 500.0}, "optim": {"lr": 1.0e-2}}))
    assert main(["train", str(config)]) == 0
    run_dir = tmp_path / "run"
    metrics = _metrics(run_dir)
    assert metrics[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and metrics[0]["implicit_acc"] == 0.5
    assert math.isfinite(metrics[1]["loss"]) and metrics[1]["loss"] != metrics[0]["loss"]
    assert json.loads((run_dir / "final" / "diffpo.json").read_text())["pipeline_class"] == "WanPipeline"

    exported = load_file(run_dir / "final" / "pytorch_lora_weights.safetensors")
    modules = lora_module_names(exported)
    assert all(k.startswith("transformer.") for k in exported)
    # the self- and cross-attention projections of both blocks: 2 blocks x 2 attentions x 4 projections
    assert len(modules) == 16 and {m.split(".")[-2] if m.endswith(".0") else m.split(".")[-1] for m in modules} == {
        "to_q", "to_k", "to_v", "to_out"}
    assert {m.split(".")[3] for m in modules} == {"attn1", "attn2"}  # transformer.blocks.N.attnK.*

    stack = _trained_lora_transformer(tiny_wan_dir, run_dir)
    adapted = {n for n, m in stack.unet.named_modules() if hasattr(m, "lora_A")}
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    assert not _load_lora_quietly(pipe, run_dir / "final", caplog)
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    assert loaded == adapted and len(loaded) == len(modules)
    text = stack.encode_prompts(PROMPTS)
    x, t = _latents(), torch.tensor([300.0, 600.0])
    cond = stack.family.unet_conditioning(text)
    with torch.no_grad():
        trained = stack.denoiser()(x, t, cond)
        from_pipeline = stack.family.denoiser(pipe.transformer)(x, t, cond)
        base = load_stack(tiny_wan_dir).denoiser()(x, t, cond)
    torch.testing.assert_close(from_pipeline, trained, atol=1e-5, rtol=0)
    assert (trained - base).abs().max() > 1e-3  # the LoRA did change the model


def test_wan_lora_may_cover_the_feed_forward_and_loads_completely(tmp_path, tiny_wan_dir, caplog):
    from diffusers import WanPipeline

    from diffpo.models.lora import attach_lora, export_lora

    stack = load_stack(tiny_wan_dir)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    params = attach_lora(stack.unet, 4, None, 0.0, targets, family=stack.family)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_lora(stack.unet, stack.family.pipeline_class, tmp_path / "lora", layers_argument=stack.family.lora_layers_argument)
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    assert not _load_lora_quietly(pipe, tmp_path / "lora", caplog)
    adapted = {n for n, m in stack.unet.named_modules() if hasattr(m, "lora_A")}
    assert {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")} == adapted
    assert sum(n.endswith("ffn.net.2") for n in adapted) == 2 and len(adapted) == 2 * (8 + 2)
    cond = stack.family.unet_conditioning(stack.encode_prompts(PROMPTS))
    x, t = _latents(), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(stack.family.denoiser(pipe.transformer)(x, t, cond), stack.denoiser()(x, t, cond),
                                   atol=1e-5, rtol=0)


def test_wan_full_fine_tuning_sft_and_variants_train_end_to_end(tmp_path, tiny_wan_dir, wan_pairs):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from diffpo.trainers import run_training

    run_dir = run_training(_config(tmp_path, tiny_wan_dir, wan_pairs, "full", "finetune=full", "optim.lr=1e-4"))
    assert _metrics(run_dir)[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    trained = WanTransformer3DModel.from_pretrained(run_dir / "final" / "transformer")
    saved = load_file(next(sorted((run_dir / "checkpoints").glob("step-*"))[-1].glob("model*.safetensors")))
    state = trained.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert any(not torch.equal(state[k], v) for k, v in load_stack(tiny_wan_dir).unet.state_dict().items())

    sft = _metrics(run_training(_config(tmp_path, tiny_wan_dir, wan_pairs, "sft", "method=sft")))
    assert all(math.isfinite(m["loss"]) for m in sft)
    for name, at_init in [("ipo", 1 / (4 * 500.0 ** 2)), ("hinge", 1.0), ("robust_dpo", LOG2)]:
        first = _metrics(run_training(_config(tmp_path, tiny_wan_dir, wan_pairs, name, f"objective.name={name}")))[0]
        assert first["loss"] == pytest.approx(at_init, rel=1e-5), name


def test_wan_training_from_the_cache_equals_encoding_every_step(tmp_path, tiny_wan_dir, wan_pairs):
    from safetensors import safe_open

    from diffpo.trainers import run_training

    extra = ["optim.lr=1e-3", "max_steps=3"]
    plain = _metrics(run_training(_config(tmp_path, tiny_wan_dir, wan_pairs, "plain", *extra)))
    cached = _metrics(run_training(_config(tmp_path, tiny_wan_dir, wan_pairs, "cached", *extra, "cache.enabled=true",
                                           "cache.text_dtype=fp32")))
    assert cached[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in plain], rel=1e-4)
    (folder,) = (tmp_path / "cache").iterdir()
    with safe_open(str(folder / "shard-00000.safetensors"), framework="pt") as shard:
        assert shard.get_slice("mean_w").get_shape() == [8, 16, 2, 4, 4]  # video latents (C, F', h, w) per clip
        assert shard.get_slice("hidden").get_shape() == [8, 512, 32]  # UMT5 states per caption
    assert json.loads((folder / "meta.json").read_text())["built_for"]["frames"] == {"num_frames": FRAMES, "stride": 1}


# ---- evaluation on Wan pipelines --------------------------------------------------------------------


def _eval_config(out, models, **extra):
    from diffpo.eval.config import EvalConfig
    from diffpo.config import from_dict

    data = {"output_dir": str(out), "progress_bar": False, "models": models,
            "prompts": {"source": "shapes", "max_prompts": 3, "subsample_seed": 1},
            "sampling": {"steps": 2, "images_per_prompt": 1, "batch_size": 3, "resolution": 32, "num_frames": FRAMES},
            "rewards": [{"name": "brightness"}, {"name": "motion-match"}],
            "report": {"bootstrap_resamples": 200, "grid_prompts": 2, "top_k": 1, "consistency_embedding": "pixels"}}
    data.update(extra)
    return from_dict(EvalConfig, data)


def test_diffpo_eval_samples_wan_clips_on_fixed_seeds_with_per_frame_and_clip_rewards(tmp_path, tiny_wan_dir):
    from diffpo.eval.backends import DiffusersBackend
    from diffpo.eval.config import EvalModelConfig, SamplingConfig
    from diffpo.eval.runner import run_eval
    from diffpo.eval.video import pixel_embedding, temporal_consistency
    from diffpo.models.lora import attach_lora, export_lora

    sampling = SamplingConfig(steps=2, guidance_scale=2.0, resolution=32, num_frames=FRAMES)
    backend = DiffusersBackend(EvalModelConfig(name="base", pretrained=tiny_wan_dir), sampling)
    assert backend.info["scheduler"] == "FlowMatchEulerDiscreteScheduler" and backend.pipe.scheduler.config.shift == 3.0
    assert backend.latent_shape == (16, 2, 4, 4)
    seeds = [3, 4]
    first = backend.generate(PROMPTS, seeds)
    assert first.shape == (2, FRAMES, 3, 32, 32) and torch.equal(first, backend.generate(PROMPTS, seeds))
    torch.testing.assert_close(backend.generate(PROMPTS[1:], seeds[1:])[0], first[1], atol=1e-5, rtol=0)
    for bad, message in [(dict(num_frames=4), r"sampling.num_frames=4: the Wan VAE takes 4k\+1 frames"),
                         (dict(resolution=40, num_frames=5), r"sampling.resolution=40 is not a multiple of 16")]:
        with pytest.raises(ValueError, match=message):
            DiffusersBackend(EvalModelConfig(name="x", pretrained=tiny_wan_dir), SamplingConfig(steps=1, **bad))

    # a run dir with a fresh LoRA (B = 0) samples exactly what the base model samples
    stack = load_stack(tiny_wan_dir)
    attach_lora(stack.unet, 4, None, 0.0, None, family=stack.family)
    export_lora(stack.unet, stack.family.pipeline_class, tmp_path / "run" / "final",
                layers_argument=stack.family.lora_layers_argument)
    (tmp_path / "run" / "final" / "diffpo.json").write_text(json.dumps({"base_model": stack.source}))
    result = run_eval(_eval_config(tmp_path / "eval", [{"name": "base", "pretrained": tiny_wan_dir},
                                                       {"name": "run", "run_dir": str(tmp_path / "run")}]))
    assert result["metrics"] == ["brightness", "motion-match", "temporal_consistency"]
    for metric in ("brightness", "temporal_consistency"):  # the same clips: equal means (motion-match: NaN, no shape
        # found in a random model's clips)
        assert result["summary"][metric]["run"]["mean"] == pytest.approx(result["summary"][metric]["base"]["mean"], abs=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    from diffpo.eval.generate import load_sample

    for row in rows:
        clip = load_sample(tmp_path / "eval" / row["file"])
        assert clip.shape == (FRAMES, 3, 32, 32) and len(row["brightness@frames"]) == FRAMES
        # whole clip = mean of the per-frame scores; the motion reward scores clips only (no per-frame list)
        assert row["brightness"] == pytest.approx(sum(row["brightness@frames"]) / FRAMES, abs=1e-6)
        assert "motion-match@frames" not in row
        # brightness by hand: the mean pixel of each frame
        assert row["brightness@frames"] == pytest.approx(clip.mean(dim=(1, 2, 3)).tolist(), abs=1e-5)
        assert row["temporal_consistency"] == pytest.approx(
            temporal_consistency(clip[None], pixel_embedding).item(), abs=1e-5)
    assert set(result["per_frame"]) == {"brightness"} and len(result["per_frame"]["brightness"]["base"]) == FRAMES
    assert (tmp_path / "eval" / "figures" / "per_frame.png").is_file()
    assert "pixels (centred)" in (tmp_path / "eval" / "index.html").read_text()


def test_temporal_consistency_with_a_clip_encoder_of_its_own(tmp_path):
    """``report.consistency_embedding=clip`` with no open_clip reward head: a CLIP image encoder
    (here a tiny random open_clip architecture) embeds the frames; a still clip scores exactly 1."""
    import open_clip

    from diffpo.eval.runner import run_eval

    arch = "diffpo-wan-tiny-vit"
    spec = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{arch}.json").write_text(json.dumps(spec))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(arch).state_dict(), tmp_path / "clip.pt")

    class Square:
        """A light square on a background of a seed-drawn colour, moving ``speed`` pixels per frame."""

        def __init__(self, speed):
            self.speed, self.info = speed, {"backend": "moving square"}

        def generate(self, prompts, seeds):
            videos = torch.zeros(len(seeds), FRAMES, 3, 32, 32)
            for b, seed in enumerate(seeds):
                g = torch.Generator().manual_seed(seed)
                videos[b] = torch.rand(3, generator=g).view(1, 3, 1, 1)
                for f in range(FRAMES):
                    videos[b, f, :, 8:20, 2 + f * self.speed: 14 + f * self.speed] = 0.9
            return videos

    speeds = {"still": 0, "moving": 4}
    config = _eval_config(tmp_path / "eval", [{"name": "still", "pretrained": "tiny"}, {"name": "moving", "pretrained": "tiny"}],
                          rewards=[{"name": "brightness"}],
                          report={"bootstrap_resamples": 200, "consistency_embedding": "clip",
                                  "consistency_clip_arch": arch, "consistency_clip_path": str(tmp_path / "clip.pt")})
    result = run_eval(config, build_backend=lambda entry, sampling, device, dtype: Square(speeds[entry.name]))
    summary = result["summary"]["temporal_consistency"]
    assert summary["still"]["mean"] == pytest.approx(1.0, abs=1e-5) and summary["moving"]["mean"] < 0.9999
    assert f"CLIP {arch}" in (tmp_path / "eval" / "index.html").read_text()
    from diffpo.config import ConfigError as Error

    with pytest.raises(Error, match="report.consistency_reward='brightness' .* report.consistency_embedding=pixels: drop one"):
        _eval_config(tmp_path / "x", [{"name": "a", "pretrained": "tiny"}],
                     report={"consistency_embedding": "pixels", "consistency_reward": "brightness"})


def test_the_wan_fsdp_config_wraps_every_transformer_block(tiny_wan_dir):
    """configs/accelerate/fsdp_wan.yaml names the block class accelerate wraps: it must be the class of
    every one of the transformer's blocks (a misspelt name would leave the 14 B model unsharded)."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.dataclasses import get_module_class_from_name

    config = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp_wan.yaml"))
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    names = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    transformer = load_stack(tiny_wan_dir).unet
    classes = {get_module_class_from_name(transformer, name) for name in names}
    assert None not in classes
    wrapped = [m for m in transformer.modules() if type(m) in classes]
    assert wrapped == list(transformer.blocks) and len(wrapped) == transformer.config.num_layers
    assert set(names) <= set(transformer._no_split_modules)


def test_score_weighted_reference_free_and_inversion_objectives_train_on_wan(tmp_path, tiny_wan_dir):
    """The variants that read reward scores start where they should (MADPO: its weight times log 2;
    SmPO, with flow-ODE inversion of the 5-D latents: log 2); SimPO runs without a reference (one
    transformer forward per step)."""
    from diffusers import WanTransformer3DModel

    from diffpo.data.moving_shapes import sample_moving_shapes
    from diffpo.data.writer import write_pairs_parquet
    from diffpo.trainers import run_training

    clips = sample_moving_shapes(8, size=32, frames=FRAMES, seed=5)
    pairs = [{"image_0": clips[2 * i][0], "image_1": clips[2 * i + 1][0], "label_0": 1.0, "caption": clips[2 * i][1],
              "reward_0": 0.2, "reward_1": 0.18} for i in range(4)]
    scored = str(write_pairs_parquet(tmp_path / "scored.parquet", pairs))
    scores = "data.score_columns=[reward_0,reward_1]"
    madpo = _metrics(run_training(_config(tmp_path, tiny_wan_dir, scored, "madpo", "objective.name=madpo", scores)))
    # every pair's winner leads by m = 0.02: MADPO's weight 2 sigma(-m) times log 2 (docs/objective_variants.md)
    weight = 2 * torch.sigmoid(torch.tensor(-0.02, dtype=torch.float64)).item()
    assert madpo[0]["loss"] == pytest.approx(weight * LOG2, rel=1e-5) and madpo[0]["implicit_acc"] == 0.5
    smpo = _metrics(run_training(_config(tmp_path, tiny_wan_dir, scored, "smpo", "method=smpo", scores,
                                         "objective.inversion_steps=2")))
    assert smpo[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and 0.5 < smpo[0]["soft_label"] < 1.0
    assert math.isfinite(smpo[1]["loss"]) and smpo[1]["loss"] != smpo[0]["loss"]

    calls = []
    forward = WanTransformer3DModel.forward

    def counted(self, *args, **kwargs):
        calls.append(kwargs["hidden_states"].shape[0])
        return forward(self, *args, **kwargs)

    WanTransformer3DModel.forward = counted
    try:
        simpo = _metrics(run_training(_config(tmp_path, tiny_wan_dir, scored, "simpo", "objective.name=simpo",
                                              "objective.beta=50")))
    finally:
        WanTransformer3DModel.forward = forward
    assert calls == [4, 4] and all(math.isfinite(m["loss"]) for m in simpo)  # 2 pairs = 4 clips, no reference


@pytest.mark.slow
def test_fsdp_full_shard_by_wan_block_equals_one_process(tmp_path, tiny_wan_dir, wan_pairs):
    """Full fine-tuning under FSDP as configs/accelerate/fsdp_wan.yaml sets it up (full shard, each
    WanTransformerBlock a unit), on two CPU processes (torchrun, gloo), makes the update one process
    makes with the two processes' pairs in one batch, and exports a whole ``final/transformer``."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from diffusers import WanTransformer3DModel

    from diffpo.trainers import run_training

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip(f"torchrun is not installed next to {sys.executable}")
    root = Path(__file__).resolve().parents[1]
    fsdp = load_config_from_file(str(root / "configs" / "accelerate" / "fsdp_wan.yaml")).fsdp_config
    names = {"fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP"}  # as accelerate launch exports them
    env = {names.get(k, k.upper()): str(v).lower() if isinstance(v, bool) else str(v) for k, v in fsdp.items()
           if k not in ("fsdp_version", "fsdp_activation_checkpointing")}
    # parameter broadcast at wrapping (sync_module_states) needs a GPU; every process loads the same weights
    env.update(ACCELERATE_USE_FSDP="true", FSDP_SYNC_MODULE_STATES="false")
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "WanTransformerBlock" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    common = [f"model.pretrained={tiny_wan_dir}", f"data.source={wan_pairs}", "data.resolution=32", f"data.num_frames={FRAMES}",
              "max_steps=3", "finetune=full", "optim.lr=1e-5", "optim.warmup_steps=0", "objective.beta=500",
              "progress_bar=false", "log_every=1", "checkpoint_every=0"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "diffpo",
         "train", "configs/diffusion_dpo/tiny.yaml", *common, f"output_dir={tmp_path / 'two'}", "train_batch_size=1"],
        capture_output=True, text=True, timeout=400, cwd=root,
        env={**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    one = run_training(load_config(TrainConfig, str(root / "configs" / "diffusion_dpo" / "tiny.yaml"),
                                   [*common, f"output_dir={tmp_path / 'one'}", "train_batch_size=2"]))
    base = load_stack(tiny_wan_dir).unet.state_dict()
    sharded = WanTransformer3DModel.from_pretrained(tmp_path / "two" / "final" / "transformer").state_dict()
    single = WanTransformer3DModel.from_pretrained(one / "final" / "transformer").state_dict()
    assert sharded.keys() == single.keys() == base.keys()
    apart = torch.cat([(sharded[k] - single[k]).abs().flatten() for k in base])
    moved = torch.cat([(single[k] - base[k]).abs().flatten() for k in base])
    assert float(moved.max()) > 2e-5 and float(apart.max()) < 1e-6  # 3 Adam steps of lr 1e-5; fp32 summation order
    two, single_metrics = _metrics(tmp_path / "two"), _metrics(one)
    assert two[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in single_metrics], rel=1e-4)


def test_wan22_ti2v_layout_trains_with_per_token_timesteps_and_samples(tmp_path, wan_pairs):
    """A tiny Wan2.2-TI2V-5B-layout pipeline (48-channel residual VAE with a 2x2 patchify, 16x spatial;
    ``expand_timesteps``): the family passes one timestep per latent token as its pipeline does, sides
    must be multiples of 32, Flow-DPO starts at log 2, and eval samples its clips."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from diffpo.eval.backends import DiffusersBackend
    from diffpo.eval.config import EvalModelConfig, SamplingConfig
    from diffpo.models.tiny import build_tiny_wan22_ti2v_components
    from diffpo.trainers import run_training

    folder = tmp_path / "ti2v"
    WanPipeline(**build_tiny_wan22_ti2v_components(), expand_timesteps=True).save_pretrained(folder)
    stack = load_stack(str(folder))
    assert stack.family.name == "wan2.2-ti2v" and stack.vae_scale_factor == 16 and stack.latent_channels == 48
    pixels = torch.rand(1, FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = stack.encode_images(pixels)
    assert mean.shape == (1, 48, 2, 4, 4)
    with pytest.raises(ValueError, match="data.resolution=48 is not a multiple of 32"):
        stack.check_clip(FRAMES, 48)

    seen = []
    forward = WanTransformer3DModel.forward

    def recorded(self, *args, **kwargs):
        seen.append(tuple(kwargs["timestep"].shape))
        return forward(self, *args, **kwargs)

    WanTransformer3DModel.forward = recorded
    try:
        x = torch.randn(2, 48, 2, 4, 4)
        cond = stack.family.unet_conditioning(stack.encode_prompts(PROMPTS))
        with torch.no_grad():
            ours = stack.denoiser()(x, torch.tensor([300.0, 700.0]), cond)
            tokens = torch.tensor([300.0, 700.0])[:, None].expand(2, 2 * 2 * 2)  # F' x h/2 x w/2 tokens
            direct = stack.unet(hidden_states=x, timestep=tokens, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        assert seen == [(2, 8), (2, 8)] and torch.equal(ours, direct)
        seen.clear()
        backend = DiffusersBackend(EvalModelConfig(name="ti2v", pretrained=str(folder)),
                                   SamplingConfig(steps=2, resolution=64, num_frames=FRAMES))
        assert backend.generate(PROMPTS[:1], [0]).shape == (1, FRAMES, 3, 64, 64)
        assert seen and all(shape == (1, 8) for shape in seen)  # the pipeline's own per-token timesteps
    finally:
        WanTransformer3DModel.forward = forward
    metrics = _metrics(run_training(_config(tmp_path, str(folder), wan_pairs, "run", "data.resolution=64")))
    assert metrics[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and math.isfinite(metrics[1]["loss"])
