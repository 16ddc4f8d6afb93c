"""Text-to-video models in the shared kernel: families, LoRA targets, video data, DPO / SFT / SePPO."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffpo.config import ConfigError, TrainConfig, load_config

FRAMES = 3


@pytest.fixture(scope="module")
def tiny_t2v_dir(tmp_path_factory):
    """A randomly initialised tiny TextToVideoSDPipeline (UNet3DConditionModel)."""
    from diffusers import TextToVideoSDPipeline

    from diffpo.models.tiny import build_tiny_text_to_video_components

    path = tmp_path_factory.mktemp("tiny-t2v")
    TextToVideoSDPipeline(**build_tiny_text_to_video_components(seed=0)).save_pretrained(path)
    return str(path)


def _clips(count: int, frames: int = FRAMES, seed: int = 0):
    from diffpo.data.moving_shapes import sample_moving_shapes

    return sample_moving_shapes(count, size=32, frames=frames, seed=seed)


def _as_tensor(frames) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(f, dtype=np.float32) / 255).permute(2, 0, 1) for f in frames])


@pytest.fixture(scope="module")
def video_pairs_parquet(tmp_path_factory):
    """16 pairs of moving-shape clips as a parquet of encoded videos (lists of PNG frames)."""
    from diffpo.data.writer import write_pairs_parquet

    clips = _clips(32, seed=1)
    pairs = [{"image_0": clips[2 * i][0], "image_1": clips[2 * i + 1][0], "label_0": float(i % 2),
              "caption": clips[2 * i][1]} for i in range(16)]
    return str(write_pairs_parquet(tmp_path_factory.mktemp("video-pairs") / "pairs.parquet", pairs))


def _train_config(tmp_path, model_dir, data, name, *overrides):
    return load_config(TrainConfig, None, [
        f"model.pretrained={model_dir}", f"data.source={data}", f"output_dir={tmp_path / name}",
        f"data.num_frames={FRAMES}", "max_steps=2", "train_batch_size=2", "optim.lr=1e-3", "objective.beta=2000",
        "progress_bar=false", f"cache.dir={tmp_path / 'cache'}", *overrides])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- kernel ----------------------------------------------------------------------------------------


def test_kernel_on_5d_latents_shares_noise_and_timestep_across_the_pair_and_the_frames():
    from diffusers import DDPMScheduler

    from diffpo.kernel.denoising import noise_pairs, pair_noise, per_sample_error
    from diffpo.kernel.noise_process import DDPMProcess

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    w, lo = torch.randn(3, 4, 5, 2, 2, generator=g), torch.randn(3, 4, 5, 2, 2, generator=g)  # (B, C, F, H, W)
    noise, t = pair_noise(w, 1000, torch.Generator().manual_seed(1))
    assert noise.shape == w.shape and t.shape == (3,)
    noised = noise_pairs(DDPMProcess(scheduler, "epsilon"), w, lo, noise, t)
    assert torch.equal(noised.noise[:3], noised.noise[3:]) and torch.equal(noised.timesteps[:3], noised.timesteps[3:])
    a = scheduler.alphas_cumprod[t]
    for b in range(3):
        for f in range(5):  # every frame of a clip at the clip's one timestep, winner and loser alike
            for x, row in ((w, b), (lo, b + 3)):
                expected = a[b].sqrt() * x[b, :, f] + (1 - a[b]).sqrt() * noise[b, :, f]
                assert torch.allclose(noised.noisy[row, :, f], expected, atol=1e-6)
    prediction = torch.zeros_like(noised.noisy)
    errors = per_sample_error(prediction, noised.noise)
    hand = [float((noised.noise[i] ** 2).sum()) / noised.noise[i].numel() for i in range(6)]
    assert errors.tolist() == pytest.approx(hand, rel=1e-6)


# ---- families, loading, LoRA -------------------------------------------------------------------------


def test_animatediff_stack_loads_and_denoises_video_latents_like_its_pipeline(tiny_animatediff_dir):
    from diffpo.models.loading import load_stack, unet_denoiser

    stack = load_stack(tiny_animatediff_dir)
    assert stack.family.name == "animatediff" and stack.is_video
    assert type(stack.unet).__name__ == "UNetMotionModel"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, FRAMES, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    text = stack.encode_prompts(["a red circle moving left on a blue background", ""])
    out = unet_denoiser(stack.unet)(x, t, stack.family.unet_conditioning(text))
    # the pipeline's own convention: text repeated per frame, clip-major
    direct = stack.unet(x, t, encoder_hidden_states=text.hidden.repeat_interleave(FRAMES, 0)).sample
    assert out.shape == x.shape and torch.equal(out, direct)
    pixels = torch.rand(2, FRAMES, 3, 32, 32) * 2 - 1
    mean, std = stack.encode_images(pixels)
    assert mean.shape == (2, 4, FRAMES, 16, 16)
    frame_mean, _ = stack.encode_images(pixels[:, 1])
    assert torch.allclose(mean[:, :, 1], frame_mean, atol=1e-5)  # frame by frame
    assert stack.decode_latents(mean).shape == (2, FRAMES, 3, 32, 32)


def test_new_motion_modules_start_as_the_identity_so_frames_denoise_as_the_image_model():
    from diffusers import UNet2DConditionModel

    from diffpo.models.tiny import motion_unet_from_image_unet, tiny_unet_config

    torch.manual_seed(0)
    image_unet = UNet2DConditionModel(**tiny_unet_config())
    motion = motion_unet_from_image_unet(image_unet)
    x, t, h = torch.randn(2, 4, FRAMES, 16, 16), torch.tensor([5, 900]), torch.randn(2, 77, 64)
    with torch.no_grad():
        video = motion(x, t, encoder_hidden_states=h.repeat_interleave(FRAMES, 0)).sample
        frames = image_unet(x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(FRAMES), h.repeat_interleave(FRAMES, 0)).sample
    assert torch.allclose(video.transpose(1, 2).flatten(0, 1), frames, atol=1e-5)


@pytest.mark.parametrize("part", ["motion", "spatial"])
def test_lora_on_one_part_trains_only_that_part(tiny_animatediff_dir, part):
    from diffpo.models.families import is_motion_module
    from diffpo.models.loading import load_stack, unet_denoiser
    from diffpo.models.lora import attach_lora

    stack = load_stack(tiny_animatediff_dir)
    params = attach_lora(stack.unet, 4, None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], part, stack.family)
    trainable = {n for n, p in stack.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert all(is_motion_module(stack.family, n) == (part == "motion") for n in trainable)
    assert len(params) == len(trainable)
    lora_modules = {n.split(".lora_")[0] for n in trainable}
    assert any(n.endswith("attn1.to_q") for n in lora_modules)
    optimizer = torch.optim.SGD(params, lr=1.0)
    with torch.no_grad():  # B = 0 at init: give the gradient something to flow through
        for n, p in stack.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    before = {n: p.detach().clone() for n, p in stack.unet.named_parameters()}
    text = stack.encode_prompts(["a blue square moving up on a white background"])
    out = unet_denoiser(stack.unet)(torch.randn(1, 4, FRAMES, 16, 16), torch.tensor([300]),
                                    stack.family.unet_conditioning(text))
    out.pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in stack.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_lora_part_on_an_image_model_is_refused(tiny_sd_dir):
    from diffpo.models.loading import load_stack
    from diffpo.models.lora import attach_lora

    stack = load_stack(tiny_sd_dir)
    with pytest.raises(ValueError, match="no motion modules: set lora.part=both"):
        attach_lora(stack.unet, 4, None, 0.0, ["to_q"], "motion", stack.family)


def test_text_to_video_unet3d_trains_full_and_refuses_lora(tmp_path, tiny_t2v_dir, video_pairs_parquet):
    from diffpo.trainers import run_training

    with pytest.raises(ConfigError, match="no peft adapter support.*set finetune=full"):
        run_training(_train_config(tmp_path, tiny_t2v_dir, video_pairs_parquet, "lora"))
    run_dir = run_training(_train_config(tmp_path, tiny_t2v_dir, video_pairs_parquet, "full", "finetune=full",
                                         "max_steps=1", "optim.lr=1e-5"))
    first = _metrics(run_dir)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the frozen copy equals the policy at step 1
    from diffusers import UNet3DConditionModel

    assert isinstance(UNet3DConditionModel.from_pretrained(run_dir / "final" / "unet"), UNet3DConditionModel)


# ---- data --------------------------------------------------------------------------------------------


def _write_gif(path, frames):
    from diffpo.data.videos import encode_gif

    path.write_bytes(encode_gif(frames))
    return path


def test_video_manifest_reads_gifs_and_frame_folders_with_stride(tmp_path):
    from diffpo.data.pairs import build_pairs
    from diffpo.config import DataConfig

    clips = _clips(2, frames=6)
    _write_gif(tmp_path / "a.gif", clips[0][0])
    folder = tmp_path / "b_frames"
    folder.mkdir()
    for i, frame in enumerate(clips[1][0]):
        frame.save(folder / f"{i:03d}.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(
        {"caption": clips[0][1], "video_0": "a.gif", "video_1": "b_frames", "label_0": 0}) + "\n")
    data = DataConfig(source=str(tmp_path / "pairs.jsonl"), image_0_column="video_0", image_1_column="video_1",
                      num_frames=3, frame_stride=2)
    item = build_pairs(data, 32, seed=0)[0]
    assert item["pixels_w"].shape == (3, 3, 32, 32) and item["pixels_l"].shape == (3, 3, 32, 32)
    # label 0: video_1 (the PNG frame folder, lossless) is the winner; frames 0, 2, 4
    expected = torch.stack([_as_tensor([clips[1][0][i]])[0] for i in (0, 2, 4)]) * 2 - 1
    assert torch.allclose(item["pixels_w"], expected, atol=1e-6)


def test_video_manifest_rejects_a_clip_with_too_few_frames(tmp_path):
    from diffpo.config import DataConfig
    from diffpo.data.images import BadSampleError
    from diffpo.data.pairs import DataError, build_pairs

    clips = _clips(2, frames=3)
    _write_gif(tmp_path / "short.gif", clips[0][0])
    _write_gif(tmp_path / "other.gif", clips[1][0])
    (tmp_path / "pairs.jsonl").write_text(json.dumps(
        {"caption": clips[0][1], "video_0": "short.gif", "video_1": "other.gif", "label_0": 1}) + "\n")
    data = DataConfig(source=str(tmp_path / "pairs.jsonl"), image_0_column="video_0", image_1_column="video_1",
                      num_frames=4, skip_bad_samples=False)
    with pytest.raises(BadSampleError, match=r"row 0 column video_0: the clip has 3 frames.*data.num_frames=4"):
        build_pairs(data, 32, seed=0)[0]
    # skipped as a bad sample by default; a dataset of nothing but short clips stops, naming the first
    data.skip_bad_samples = True
    with pytest.raises(DataError, match=r"every one of the 1 pairs is bad.*the clip has 3 frames.*data.num_frames=4"):
        build_pairs(data, 32, seed=0)[0]


def test_video_model_without_num_frames_and_image_model_with_it_are_refused(tmp_path, tiny_animatediff_dir,
                                                                             tiny_sd_dir, video_pairs_parquet):
    from diffpo.trainers import run_training

    with pytest.raises(ConfigError, match="is a video model.*set data.num_frames"):
        run_training(_train_config(tmp_path, tiny_animatediff_dir, video_pairs_parquet, "a", "data.num_frames=null"))
    with pytest.raises(ConfigError, match="is an image model"):
        run_training(_train_config(tmp_path, tiny_sd_dir, video_pairs_parquet, "b"))


def test_latent_cache_holds_video_latents_equal_to_encoding_the_clips(tmp_path, tiny_animatediff_dir,
                                                                       video_pairs_parquet):
    from diffpo.config import DataConfig
    from diffpo.data.cache import CachedPairs, build_cache, cache_key
    from diffpo.data.pairs import DataError, build_pairs
    from diffpo.models.loading import load_stack

    stack = load_stack(tiny_animatediff_dir)
    pairs = build_pairs(DataConfig(source=video_pairs_parquet, num_frames=FRAMES, max_pairs=3), 32, seed=0)
    folder = build_cache(stack, pairs, tmp_path / "cache", progress=False)
    cached = CachedPairs(folder, [pairs.caption(i) for i in range(len(pairs))])[1]
    mean, std = stack.encode_images(pairs[1]["pixels_w"][None])
    assert cached["mean_w"].shape == (4, FRAMES, 16, 16)
    assert torch.allclose(cached["mean_w"], mean[0], atol=1e-6) and torch.allclose(cached["std_w"], std[0], atol=1e-6)
    fewer = build_pairs(DataConfig(source=video_pairs_parquet, num_frames=FRAMES - 1, max_pairs=3), 32, seed=0)
    assert cache_key(stack, fewer, "fp32") != cache_key(stack, pairs, "fp32")
    # the complete folder given as cache.dir for other clips is refused, naming the frame settings
    assert json.loads((folder / "meta.json").read_text())["built_for"]["frames"] == {"num_frames": FRAMES, "stride": 1}
    with pytest.raises(DataError, match=rf"is stale.*frames \{{'num_frames': {FRAMES}, 'stride': 1\}} != "
                                         rf"\{{'num_frames': {FRAMES - 1}, 'stride': 1\}}"):
        build_cache(stack, fewer, folder, progress=False)


# ---- trainers ----------------------------------------------------------------------------------------


def test_video_dpo_loss_is_log2_at_init_and_the_lora_loads_into_animatediff_pipeline(tmp_path, tiny_animatediff_dir,
                                                                                     video_pairs_parquet):
    from diffusers import AnimateDiffPipeline

    from diffpo.trainers import run_training

    run_dir = run_training(_train_config(tmp_path, tiny_animatediff_dir, video_pairs_parquet, "dpo", "lora.part=motion"))
    metrics = _metrics(run_dir)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics[0]["implicit_acc"] == 0.5
    assert metrics[1]["loss"] != pytest.approx(math.log(2), abs=1e-7)
    meta = json.loads((run_dir / "final" / "diffpo.json").read_text())
    assert meta["pipeline_class"] == "AnimateDiffPipeline"

    def output(pipe):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 4, FRAMES, 16, 16, generator=g)
        hidden = pipe.encode_prompt(["a red circle moving left on a blue background"], "cpu", 1, False)[0]
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([400]), encoder_hidden_states=hidden.repeat_interleave(FRAMES, 0)).sample

    pipe = AnimateDiffPipeline.from_pretrained(tiny_animatediff_dir)
    base = output(pipe)
    pipe.load_lora_weights(str(run_dir / "final"))
    loaded = output(pipe)
    assert not torch.allclose(loaded, base, atol=1e-6)
    # the trained policy itself (LoRA weights from the run's last checkpoint) gives the same output
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from diffpo.models.loading import load_stack
    from diffpo.models.lora import attach_lora

    stack = load_stack(tiny_animatediff_dir)
    attach_lora(stack.unet, 8, None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], "motion", stack.family)
    set_peft_model_state_dict(stack.unet, load_file(run_dir / "checkpoints" / "step-2" / "lora_adapter.safetensors"))
    pipe_trained = AnimateDiffPipeline.from_pretrained(tiny_animatediff_dir, unet=stack.unet)
    assert torch.allclose(output(pipe_trained), loaded, atol=1e-5)
    frames = pipe(["a red circle moving left on a blue background"], num_frames=FRAMES, num_inference_steps=2,
                  output_type="pt").frames
    assert frames.shape == (1, FRAMES, 3, 32, 32)


def test_video_sft_and_seppo_run_through_the_same_loops(tmp_path, tiny_animatediff_dir, video_pairs_parquet):
    from diffpo.trainers import run_training

    sft = run_training(_train_config(tmp_path, tiny_animatediff_dir, video_pairs_parquet, "sft", "method=sft"))
    assert math.isfinite(_metrics(sft)[-1]["loss"])
    seppo = run_training(_train_config(tmp_path, tiny_animatediff_dir, video_pairs_parquet, "seppo", "method=seppo",
                                       "online.num_inference_steps=2", "online.pool_every=1"))
    metrics = _metrics(seppo)
    assert metrics[0]["pool_size"] == 1 and metrics[1]["pool_size"] == 2  # the policy joined the pool after step 1
    assert (seppo / "pool" / "entry-0001.safetensors").is_file()
    assert all(math.isfinite(m["loss"]) for m in metrics)


# ---- rewards -----------------------------------------------------------------------------------------


def test_motion_match_scores_travel_along_the_caption_direction():
    from diffpo.data.moving_shapes import DIRECTIONS, MotionSpec, draw_moving_shape
    from diffpo.rewards import load

    head = load("motion-match")
    videos, prompts = [], []
    for direction in DIRECTIONS:
        spec = MotionSpec("square", "red", "blue", direction)
        videos.append(_as_tensor(draw_moving_shape(spec, 32, 4, np.random.default_rng(0))))
        prompts.append(spec.caption)
    videos = torch.stack(videos)
    scores = head(videos, prompts)
    assert (scores > 0.2).all() and (scores < 0.4).all()  # clips travel 25-35% of the side
    assert torch.allclose(head(videos.flip(1), prompts), -scores, atol=1e-5)  # played backwards
    still = videos[:, :1].expand(-1, 4, -1, -1, -1)
    assert torch.allclose(head(still, prompts), torch.zeros(4), atol=1e-6)
    assert head(videos[:1], ["a red square on a blue background"]).isnan().all()
    with pytest.raises(ValueError, match="scores videos"):
        head(videos[:, 0], prompts)


def test_long_paths_travel_most_of_the_room_and_the_default_draws_are_unchanged():
    from diffpo.data.moving_shapes import MotionSpec, draw_moving_shape
    from diffpo.rewards import load

    spec = MotionSpec("circle", "white", "black", "right")
    default = draw_moving_shape(spec, 32, 4, np.random.default_rng(3))
    explicit = draw_moving_shape(spec, 32, 4, np.random.default_rng(3), None)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(default, explicit))
    # the whole room: the shape ends where the image leaves it no further to go
    full = _as_tensor(draw_moving_shape(spec, 32, 4, np.random.default_rng(3), (1.0, 1.0)))
    rng = np.random.default_rng(3)
    half = rng.uniform(0.30, 0.45) * 16
    score = float(load("motion-match")(full[None], [spec.caption])[0])
    assert score == pytest.approx((32 - 2 * half - 2) / 32, abs=0.04)


def test_mp4_clips_decode_through_imageio_ffmpeg(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from diffpo.data.videos import decode_video
    from diffpo.eval.video import save_mp4

    frames = _as_tensor(_clips(1, frames=5)[0][0])
    path = save_mp4(frames, tmp_path / "clip.mp4", fps=4)
    decoded = decode_video(str(path), num_frames=5)
    assert len(decoded) == 5 and decoded[0].size == (32, 32)
    assert (_as_tensor(decoded) - frames).abs().mean() < 0.1  # lossy H.264, same picture
    assert len(decode_video(path.read_bytes(), num_frames=2, stride=2)) == 2


def test_sd_model_plus_motion_adapter_is_an_animatediff_stack(tmp_path, tiny_sd_dir, tiny_sdxl_dir):
    from diffusers import MotionAdapter

    from diffpo.models.loading import load_stack
    from diffpo.models.tiny import tiny_motion_adapter_config

    torch.manual_seed(0)
    MotionAdapter(**tiny_motion_adapter_config()).save_pretrained(tmp_path / "adapter")
    stack = load_stack(tiny_sd_dir, motion_adapter=str(tmp_path / "adapter"))
    assert stack.family.name == "animatediff" and type(stack.unet).__name__ == "UNetMotionModel"
    copy = stack.load_unet()  # the frozen reference of full fine-tuning: the same composition again
    state, again = stack.unet.state_dict(), copy.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline: drop model.motion_adapter"):
        load_stack(tiny_sdxl_dir, motion_adapter=str(tmp_path / "adapter"))


def test_video_quickstart_end_to_end_writes_the_video_report(tmp_path, tiny_animatediff_dir):
    from diffpo.quickstart import QuickstartConfig, default_config_path, run_quickstart

    path = default_config_path("diffusion_dpo", "video")
    assert path.name == "quickstart_video.yaml"
    config = load_config(QuickstartConfig, path, [
        f"model={tiny_animatediff_dir}", f"output_dir={tmp_path / 'qs'}", f"num_frames={FRAMES}", "num_prompts=2",
        "samples_per_prompt=2", "heldout_prompts=3", "eval_seeds_per_prompt=1", "sample_steps=2", "eval_steps=2",
        "train.max_steps=2", "train.train_batch_size=1", "train.log_every=1", "grid_prompts=2"])
    result = run_quickstart(config)
    out = tmp_path / "qs"
    assert json.loads((out / "quickstart.json").read_text())["win_rate"] == result["win_rate"]
    assert len(result["per_frame_reward"]["base"]) == FRAMES
    assert set(result["temporal_consistency"]) == {"base", "aligned"}
    assert {"colour-match", "motion-match"} <= set(result["checks"])
    assert (out / "before_after.gif").is_file() and (out / "before_after.png").is_file()
    report = (out / "report" / "index.html").read_text()
    assert ".gif" in report and "Temporal consistency" in report
    rows = [json.loads(line) for line in (out / "report" / "scores.jsonl").read_text().splitlines()]
    assert rows and all(r["frames"] == FRAMES and "temporal_consistency" in r for r in rows)


def test_diffpo_eval_generates_scores_and_reports_clips_of_a_video_model(tmp_path, tiny_animatediff_dir):
    from diffpo.eval.config import load_eval_config
    from diffpo.eval.generate import load_sample
    from diffpo.eval.runner import run_eval

    (tmp_path / "prompts.txt").write_text("a red circle moving left on a blue background\n"
                                          "a white square moving up on a black background\n")
    (tmp_path / "eval.yaml").write_text(
        f"output_dir: {tmp_path / 'out'}\nmodels: [{{name: base, pretrained: {tiny_animatediff_dir}}}]\n"
        f"prompts: {{source: {tmp_path / 'prompts.txt'}}}\nrewards: [{{name: motion-match}}, {{name: jpeg-compressibility}}]\n"
        f"sampling: {{steps: 2, images_per_prompt: 1, num_frames: {FRAMES}, batch_size: 2}}\nprogress_bar: false\n")
    result = run_eval(load_eval_config(tmp_path / "eval.yaml"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["frames"] == FRAMES for r in rows)
    clip = load_sample(tmp_path / "out" / rows[0]["file"])
    assert clip.shape == (FRAMES, 3, 32, 32)
    from diffpo.rewards import load

    assert rows[0]["motion-match"] == pytest.approx(float(load("motion-match")(clip[None], [rows[0]["prompt"]])[0]), abs=1e-6)
    assert ".gif" in (tmp_path / "out" / "index.html").read_text() and result["report"]


def test_bundled_video_model_loads_with_its_pipeline_and_is_small():
    from diffusers import AnimateDiffPipeline

    from diffpo.models.loading import load_stack
    from diffpo.resources import assets_dir

    folder = assets_dir() / "tiny-video-shapes"
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights < 20e6 and sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 20e6
    card = json.loads((folder / "training.json").read_text())
    for key in ("seed", "steps", "wall_seconds", "frames"):
        assert key in card
    assert (folder / "README.md").is_file() and (folder / "samples.gif").is_file()
    stack = load_stack("tiny-video")
    assert stack.family.name == "animatediff" and stack.source == str(folder)
    pipe = AnimateDiffPipeline.from_pretrained(folder)
    clip = pipe("a red circle moving left on a blue background", num_frames=card["frames"], num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert clip.shape == (1, card["frames"], 3, 32, 32)
