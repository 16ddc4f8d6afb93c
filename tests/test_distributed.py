"""Data parallelism: two real processes (torchrun, gloo on the CPU) against one process.

Every pair draws its latent sample, prompt dropout, noise and timestep from its own stream
(seed, epoch, dataset index), and DDP averages the two processes' gradients, so 2 processes x
batch b must make the update of 1 process x batch 2b, as must 1 process x batch b x 2
accumulation steps (the invariants TRL checks between gradient-accumulation settings).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffpo.config import TrainConfig, load_config
from diffpo.trainers import run_training

LORA = "final/pytorch_lora_weights.safetensors"
TORCHRUN = Path(sys.executable).with_name("torchrun")
# 16 pairs, 4 pairs per micro-step over all processes: 4 steps per epoch; 5 steps cross into epoch 1
COMMON = ["max_steps=5", "log_every=1", "optim.lr=1e-3", "objective.beta=2000", "progress_bar=false", "data.prompt_dropout=0.25",
          "data.flip=independent", "optim.lr_scheduler=constant_with_warmup", "optim.warmup_steps=8"]


def _overrides(model_dir, data, run_dir, *extra):
    return [f"model.pretrained={model_dir}", f"data.source={data}", f"output_dir={run_dir}", *COMMON, *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_weights(a_dir, b_dir):
    """Equal up to fp32 summation order. AdamW divides by sqrt(v), so an element whose gradient is
    ~0 can turn a last-bit difference into a visible one: its worst case is held to a tenth of one
    step (lr 1e-3), the mean difference to 1e-6 (it is ~3e-8 here)."""
    a, b = load_file(Path(a_dir) / LORA), load_file(Path(b_dir) / LORA)
    assert a.keys() == b.keys()
    differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(differences.max()) < 1e-4, f"LoRA weights differ by up to {float(differences.max())}"
    assert float(differences.mean()) < 1e-6
    ups = [v for k, v in a.items() if "lora.up" in k or "lora_B" in k]  # zero at the start: they show the movement
    assert ups and max(float(v.abs().max()) for v in ups) > 1e-3


@pytest.fixture(scope="module")
def pairs16(tmp_path_factory):
    from conftest import make_pairs

    from diffpo.data.writer import write_pairs_parquet

    return str(write_pairs_parquet(tmp_path_factory.mktemp("pairs16") / "pairs.parquet", make_pairs(16)))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_sd_dir, pairs16):
    """``torchrun --nproc_per_node 2 -m diffpo train``, batch 2 per process, a checkpoint at step 3."""
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun is not installed next to {sys.executable}")
    run_dir = tmp_path_factory.mktemp("ddp") / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "diffpo", "train", "configs/diffusion_dpo/tiny.yaml",
               *_overrides(tiny_sd_dir, pairs16, run_dir, "train_batch_size=2", "checkpoint_every=3",
                           "checkpoints_total_limit=null")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_sd_dir, pairs16):
    run_dir = tmp_path_factory.mktemp("single") / "one"
    return run_training(load_config(TrainConfig, "configs/diffusion_dpo/tiny.yaml",
                                    _overrides(tiny_sd_dir, pairs16, run_dir, "train_batch_size=4")))


def test_two_processes_make_the_update_of_one_process_with_twice_the_batch(two_process_run, one_process_run):
    two, result = two_process_run
    _assert_same_weights(two, one_process_run)
    two_metrics, one_metrics = _metrics(two), _metrics(one_process_run)
    # one writer: one line per step; the logged loss is the mean over both processes' pairs
    assert [m["step"] for m in two_metrics] == [1, 2, 3, 4, 5]
    for a, b in zip(two_metrics, one_metrics):  # (implicit_acc is a step function of logits that are ~0 here)
        for key in ("loss", "margin", "policy_gap", "ref_gap", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert two_metrics[-1]["epoch"] == 1.0
    checkpoint = two / "checkpoints" / "step-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    assert {p.name for p in checkpoint.glob("random_states_*")} == {"random_states_0.safetensors", "random_states_1.safetensors"}
    assert result.stdout.count("run written to") == 1  # only the main process reports


def test_a_two_process_checkpoint_resumes_on_one_process(two_process_run, one_process_run, tmp_path):
    """Saved by 2 processes x batch 2 at step 3 (12 pairs into epoch 0), resumed by 1 process x
    batch 4: the same pairs with the same draws follow, and the warm-up schedule continues at step 3."""
    two, _ = two_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-5")
    shutil.rmtree(resumed / "final")
    overrides = [f"output_dir={resumed}", "train_batch_size=4", "resume_from=latest"]
    run_training(load_config(TrainConfig, resumed / "config.yaml", overrides))
    _assert_same_weights(resumed, one_process_run)
    assert [m["lr"] for m in _metrics(resumed)][-2:] == pytest.approx([m["lr"] for m in _metrics(one_process_run)][-2:])


def test_gradient_accumulation_makes_the_update_of_the_larger_batch(tmp_path, tiny_sd_dir, pairs16, one_process_run):
    accumulated = run_training(load_config(TrainConfig, "configs/diffusion_dpo/tiny.yaml", _overrides(
        tiny_sd_dir, pairs16, tmp_path / "accumulated", "train_batch_size=2", "gradient_accumulation_steps=2")))
    _assert_same_weights(accumulated, one_process_run)
    # the losses agree up to fp32 summation order, which beta (2000) scales: ~1e-8 in the errors
    # becomes up to ~1e-4 in the loss (seen: 7.5e-5 with 2 threads)
    assert [m["loss"] for m in _metrics(accumulated)] == pytest.approx([m["loss"] for m in _metrics(one_process_run)],
                                                                      rel=3e-4, abs=1e-6)


def test_a_resume_that_splits_a_batch_is_refused(two_process_run, tmp_path):
    two, _ = two_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-5")
    with pytest.raises(ValueError, match="12 pairs into epoch 0.*do not divide"):
        run_training(load_config(TrainConfig, resumed / "config.yaml",
                                 [f"output_dir={resumed}", "train_batch_size=8", "resume_from=latest"]))


def test_pair_streams_do_not_depend_on_the_batch():
    from diffpo.kernel.denoising import PairStreams, pair_noise

    whole = PairStreams(seed=3, epoch=1, indices=[5, 9, 2, 7])
    halves = [PairStreams(seed=3, epoch=1, indices=[5, 9]), PairStreams(seed=3, epoch=1, indices=[2, 7])]
    latents = torch.zeros(4, 4, 8, 8)
    noise, t = pair_noise(latents, 1000, whole)
    parts = [pair_noise(latents[:2], 1000, h) for h in halves]
    assert torch.equal(noise, torch.cat([p[0] for p in parts])) and torch.equal(t, torch.cat([p[1] for p in parts]))
    other_epoch, _ = pair_noise(latents, 1000, PairStreams(seed=3, epoch=2, indices=[5, 9, 2, 7]))
    assert not torch.equal(noise, other_epoch)
    assert not torch.equal(noise[0], noise[1])  # distinct pairs, distinct streams
    with pytest.raises(ValueError, match="3 pair streams for a batch of 4"):
        pair_noise(latents, 1000, PairStreams(0, 0, [1, 2, 3]))


def test_two_processes_share_the_cache_build(tmp_path, tiny_sd_dir, pairs16):
    """``torchrun -m diffpo cache``: the processes encode alternate shards into one complete cache
    holding what one process writes."""
    from safetensors.torch import load_file as load

    from diffpo.config import DataConfig
    from diffpo.data.cache import build_cache
    from diffpo.data.pairs import build_pairs
    from diffpo.models.loading import load_stack

    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun is not installed next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                             str(_free_port()), "-m", "diffpo", "cache", "configs/diffusion_dpo/tiny.yaml",
                             f"model.pretrained={tiny_sd_dir}", f"data.source={pairs16}", f"cache.dir={tmp_path / 'two'}",
                             "cache.shard_size=4"], capture_output=True, text=True, timeout=300, env=env,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cache of 16 pairs") == 1 and "(2 process(es))" in result.stdout
    stack = load_stack(tiny_sd_dir)
    one = build_cache(stack, build_pairs(DataConfig(source=pairs16), stack.native_resolution, 0), tmp_path / "one",
                      shard_size=4, progress=False)
    (two,) = (tmp_path / "two").iterdir()
    assert two.name == one.name and (two / "meta.json").read_text() == (one / "meta.json").read_text()
    for shard in sorted(one.glob("*.safetensors")):
        a, b = load(shard), load(two / shard.name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), shard.name


@pytest.mark.slow
def test_two_processes_equal_one_on_a_flow_transformer(tmp_path, tiny_sd3_dir, pairs16):
    """The same invariant on SD3 (rectified flow, joint-attention LoRA): sigma and noise come from the
    pairs' own streams, so 2 processes x batch 2 = 1 process x batch 4."""
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun is not installed next to {sys.executable}")
    flow = ["max_steps=3", "data.resolution=32", "objective.beta=500", "lora.target_modules=null", "optim.warmup_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    two = tmp_path / "two"
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "diffpo", "train", "configs/diffusion_dpo/tiny.yaml",
               *_overrides(tiny_sd3_dir, pairs16, two, "train_batch_size=2", *flow)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    one = run_training(load_config(TrainConfig, "configs/diffusion_dpo/tiny.yaml",
                                   _overrides(tiny_sd3_dir, pairs16, tmp_path / "one", "train_batch_size=4", *flow)))
    _assert_same_weights(two, one)
    assert any(".add_q_proj." in k for k in load_file(two / LORA))
    for a, b in zip(_metrics(two), _metrics(one)):
        for key in ("loss", "policy_gap", "ref_gap", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
