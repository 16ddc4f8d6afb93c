"""The offline-pairs trainer end to end on tiny models."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffpo.config import ConfigError, TrainConfig, load_config
from diffpo.trainers import run_training

LORA = "final/pytorch_lora_weights.safetensors"


def _config(tmp_path, model_dir, data, name="run", *overrides):
    return load_config(TrainConfig, None, [
        f"model.pretrained={model_dir}", f"data.source={data}", f"output_dir={tmp_path / name}",
        "max_steps=4", "train_batch_size=4", "optim.lr=1e-3", "objective.beta=2000", "progress_bar=false",
        f"cache.dir={tmp_path / 'cache'}", *overrides])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_writes_config_metrics_and_a_loadable_lora(tmp_path, tiny_sd_dir, shapes_parquet):
    run_dir = run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet))
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert metrics[0]["implicit_acc"] == 0.5
    assert any(abs(m["loss"] - math.log(2)) > 1e-4 for m in metrics[1:])
    for key in ("grad_norm", "lr", "pairs_per_s", "policy_gap", "ref_gap"):
        assert key in metrics[0]
    assert load_config(TrainConfig, run_dir / "config.yaml") == _config(tmp_path, tiny_sd_dir, shapes_parquet)
    weights = load_file(run_dir / LORA)
    assert weights and all("lora" in k for k in weights)
    assert any(k.endswith(("lora.up.weight", "lora_B.weight")) and v.abs().max() > 0 for k, v in weights.items())
    checkpoint = run_dir / "checkpoints" / "step-4"
    assert (checkpoint / "trainer_state.json").is_file()
    # LoRA checkpoints hold the adapter only, not the frozen base UNet
    assert (checkpoint / "lora_adapter.safetensors").is_file() and not list(checkpoint.glob("model*.safetensors"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_sd_dir, shapes_parquet):
    # 4 pairs per step over 32 pairs: 8 steps per epoch. The run dies after the step-10 checkpoint
    # (epoch 1, 2 batches in) and resumes; steps 17-18 then cross into epoch 2.
    extra = ["max_steps=18", "data.flip=independent"]
    straight = run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "straight", *extra))
    run_dir = run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "resumed", *extra, "checkpoint_every=5",
                                   "checkpoints_total_limit=null"))
    for step in (15, 18):
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    shutil.rmtree(run_dir / "final")
    run_training(load_config(TrainConfig, run_dir / "config.yaml", ["resume_from=latest"]))
    a, b = load_file(straight / LORA), load_file(run_dir / LORA)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_losses = [m["loss"] for m in _metrics(run_dir)][-8:]
    assert resumed_losses == [m["loss"] for m in _metrics(straight)][-8:]
    assert [m["step"] for m in _metrics(run_dir)][-8:] == list(range(11, 19))


def test_training_from_the_cache_gives_the_same_losses(tmp_path, tiny_sd_dir, shapes_parquet):
    plain = _metrics(run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "plain", "data.flip=joint")))
    cached_dir = run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "cached", "data.flip=joint", "cache.enabled=true"))
    cached = _metrics(cached_dir)
    # the VAE runs on other batch compositions when caching (oneDNN differs in the last bits, ~1e-7),
    # which lr 1e-3 amplifies a little over the steps
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in plain], rel=1e-3)
    assert cached[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()


def test_cached_items_equal_freshly_encoded_ones(tmp_path, tiny_sd_dir, shapes_parquet):
    from diffpo.config import DataConfig
    from diffpo.data.cache import CachedPairs, build_cache
    from diffpo.data.pairs import build_pairs
    from diffpo.models.loading import load_stack

    stack = load_stack(tiny_sd_dir)
    pairs = build_pairs(DataConfig(source=shapes_parquet, flip="independent"), 32, seed=3)
    folder = build_cache(stack, pairs, tmp_path / "c", progress=False, shard_size=10)
    cached = CachedPairs(folder, [pairs.caption(i) for i in range(len(pairs))], "independent", seed=3)
    assert len(cached) == len(pairs) == 32 and len(cached.meta["shards"]) == 4
    for epoch in (0, 1):
        pairs.start_epoch(epoch)
        cached.start_epoch(epoch)
        for i in (0, 13, 31):
            fresh, item = pairs[i], cached[i]
            mean, std = stack.encode_images(torch.stack([fresh["pixels_w"], fresh["pixels_l"]]))
            assert torch.allclose(item["mean_w"], mean[0], atol=1e-5) and torch.allclose(item["mean_l"], mean[1], atol=1e-5)
            assert torch.allclose(item["std_w"], std[0], atol=1e-5)
            text = stack.encode_prompts([fresh["caption"]]).hidden[0]
            assert torch.allclose(item["hidden"], text, atol=1e-5)


def test_cache_skips_the_encoders(tmp_path, tiny_sd_dir, shapes_parquet, monkeypatch):
    from diffpo.data.cache import build_cache
    from diffpo.data.pairs import build_pairs
    from diffpo.models import loading

    config = _config(tmp_path, tiny_sd_dir, shapes_parquet, "enc", "cache.enabled=true")
    stack = loading.load_stack(tiny_sd_dir)
    build_cache(stack, build_pairs(config.data, 32, config.seed), config.cache.dir, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("the trainer ran an encoder although the cache was complete")

    monkeypatch.setattr(loading.DiffusionStack, "encode_images", forbidden)
    monkeypatch.setattr(loading.DiffusionStack, "encode_prompts", forbidden)
    run_training(config)


def test_cache_key_changes_with_resolution(tmp_path, tiny_sd_dir, shapes_parquet):
    from diffpo.config import DataConfig
    from diffpo.data.cache import cache_key
    from diffpo.data.pairs import build_pairs
    from diffpo.models.loading import load_stack

    stack = load_stack(tiny_sd_dir)
    a = cache_key(stack, build_pairs(DataConfig(source=shapes_parquet), 32, 0), "fp32")
    b = cache_key(stack, build_pairs(DataConfig(source=shapes_parquet), 64, 0), "fp32")
    c = cache_key(stack, build_pairs(DataConfig(source=shapes_parquet, max_pairs=8), 32, 0), "fp32")
    assert len({a, b, c}) == 3


def test_full_finetune_with_frozen_reference_and_accumulation(tmp_path, tiny_sd_dir, shapes_parquet):
    run_dir = run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "full", "finetune=full", "optim.lr=1e-4",
                                   "gradient_accumulation_steps=2", "max_steps=2", "ema.enabled=true", "ema.decay=0.5"))
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    # The first optimizer step averages two micro-steps, both before any update: log 2 up to fp32
    # rounding (the frozen copy runs oneDNN's inference kernels, the policy its training kernels;
    # they differ in the last bit, ~1e-7 in e, which beta = 2000 scales to ~1e-5 in the loss).
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(run_dir / "final" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    diffs = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
    assert any(diffs)


def test_sft_trains_on_winners_without_a_reference(tmp_path, tiny_sd_dir, shapes_parquet):
    metrics = _metrics(run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "sft", "method=sft", "max_steps=2")))
    assert "ref_gap" not in metrics[0] and metrics[0]["loss"] == pytest.approx(metrics[0]["policy_err_w"])


def test_sdxl_trains_with_two_text_encoders_and_time_ids(tmp_path, tiny_sdxl_dir, shapes_parquet):
    from diffusers import StableDiffusionXLPipeline

    run_dir = run_training(_config(tmp_path, tiny_sdxl_dir, shapes_parquet, "sdxl", "max_steps=2", "data.crop=random"))
    assert _metrics(run_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(run_dir / "final"))


def test_sdxl_time_ids_are_the_real_micro_conditioning():
    from diffpo.models.families import sdxl_time_ids

    ids = sdxl_time_ids(torch.tensor([[480, 640], [1024, 768]]), torch.tensor([[0, 80], [128, 0]]), 512)
    assert ids.tolist() == [[480, 640, 0, 80, 512, 512], [1024, 768, 128, 0, 512, 512]]


def test_bad_resume_path_and_resolution_are_errors(tmp_path, tiny_sd_dir, shapes_parquet):
    with pytest.raises(ConfigError, match="not a diffpo checkpoint"):
        run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "r", f"resume_from={tmp_path}"))
    with pytest.raises(ValueError, match="divisible by the VAE factor"):
        run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "res", "data.resolution=33"))


def test_prompt_dropout_one_equals_training_on_empty_captions(tmp_path, tiny_sd_dir):
    from conftest import make_pairs
    from diffpo.data.writer import write_pairs_parquet

    rows = make_pairs(8, seed=5)
    captioned = write_pairs_parquet(tmp_path / "captioned.parquet", rows)
    empty = write_pairs_parquet(tmp_path / "empty.parquet", [{**r, "caption": ""} for r in rows])
    dropped = _metrics(run_training(_config(tmp_path, tiny_sd_dir, captioned, "drop", "data.prompt_dropout=1.0", "max_steps=3")))
    blank = _metrics(run_training(_config(tmp_path, tiny_sd_dir, empty, "blank", "max_steps=3",
                                          "data.allow_empty_captions=true")))
    kept = _metrics(run_training(_config(tmp_path, tiny_sd_dir, captioned, "kept", "max_steps=3")))
    assert [m["loss"] for m in dropped] == pytest.approx([m["loss"] for m in blank], rel=1e-6)
    assert [m["loss"] for m in kept] != pytest.approx([m["loss"] for m in blank], rel=1e-6)


def test_scale_lr_multiplies_by_the_total_batch(tmp_path, tiny_sd_dir, shapes_parquet):
    metrics = _metrics(run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "scaled", "optim.scale_lr=true",
                                            "optim.lr=1e-5", "gradient_accumulation_steps=2", "max_steps=1")))
    assert metrics[0]["lr"] == pytest.approx(1e-5 * 4 * 2)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_sd_dir, shapes_parquet):
    plain = _metrics(run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "gc0", "max_steps=2")))
    checkpointed = _metrics(run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "gc1", "max_steps=2",
                                                 "gradient_checkpointing=true")))
    assert [m["loss"] for m in checkpointed] == pytest.approx([m["loss"] for m in plain], rel=1e-5)


@pytest.mark.parametrize("overrides,init_tolerance", [
    (["optim.optimizer=adafactor"], 1e-6),
    (["mixed_precision=bf16"], 1e-6),  # LoRA: policy and reference are one module under the same autocast
    # a bf16 copy against the fp32 policy differs by ~1e-4 in e, which beta = 2000 makes visible
    (["finetune=full", "reference.offload=true", "reference.dtype=bf16", "optim.lr=1e-5"], None),
], ids=["adafactor", "bf16", "full-offloaded-bf16-reference"])
def test_optimizer_precision_and_reference_placement_options_train(tmp_path, tiny_sd_dir, shapes_parquet, overrides,
                                                                   init_tolerance):
    metrics = _metrics(run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "opt", "max_steps=2", *overrides)))
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    if init_tolerance is not None:
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=init_tolerance)
