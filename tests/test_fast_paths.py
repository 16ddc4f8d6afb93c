"""Fast paths of the training step: no host reads of tensors between logging steps, and the
``torch.compile`` option."""

import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import diffpo
from diffpo.config import TrainConfig, load_config
from diffpo.trainers import run_training

PACKAGE = str(Path(diffpo.__file__).parent)
# the ways Python code reads a tensor's value on the host (a device sync on a GPU)
HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__")


def _config(tmp_path, model_dir, data, name, *overrides):
    return load_config(TrainConfig, None, [
        f"model.pretrained={model_dir}", f"data.source={data}", f"output_dir={tmp_path / name}", "train_batch_size=4",
        "optim.lr=1e-3", "objective.beta=2000", "progress_bar=false", "data.prompt_dropout=0.2", *overrides])


def _count_host_reads(monkeypatch) -> list[str]:
    """Record every host read of a tensor made directly by diffpo's own code (file:line)."""
    calls = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                calls.append(f"{Path(caller.co_filename).name}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_unlogged_steps_read_nothing_on_the_host(tmp_path, tiny_sd_dir, shapes_parquet, monkeypatch):
    """2 steps logged once and 6 steps logged once make the same host reads: the steps between
    logs (loss, metrics, NaN check, grad norm) leave every value on the device."""
    calls = _count_host_reads(monkeypatch)
    run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "short", "max_steps=2", "log_every=2"))
    short = list(calls)
    calls.clear()
    run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "long", "max_steps=6", "log_every=6"))
    assert short, "the logging step reads the metrics: the counter must see it"
    assert Counter(calls) == Counter(short), f"host reads beyond the logging step's: {Counter(calls) - Counter(short)}"


def test_a_nan_loss_stops_at_the_next_logging_step(tmp_path, tiny_sd_dir, shapes_parquet):
    config = _config(tmp_path, tiny_sd_dir, shapes_parquet, "nan", "max_steps=4", "log_every=2")
    config.objective.beta = float("nan")  # past the config's range check (it refuses NaN): the loop's own guard
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 .*last good checkpoint: none yet"):
        run_training(config)
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_deferred_stop_keeps_the_first_nonfinite_gradient_norm_until_the_check(tmp_path):
    """on_nonfinite=stop in a loop with device-side metrics: nothing is read per step; the check at
    the logging step names the first non-finite norm since the last check. skip never defers."""
    from types import SimpleNamespace

    from diffpo.trainers.nonfinite import NonfiniteGuard

    accelerator = SimpleNamespace(num_processes=1, scaler=None, device=torch.device("cpu"))  # what the guard reads
    guard = NonfiniteGuard(accelerator, tmp_path, "stop", 3, defer_stop=True)
    assert guard.check_loss(torch.tensor(float("nan")), 1, ["a"])  # left to the window mean
    for step, norm in enumerate((1.0, float("inf"), float("nan"), 2.0), start=1):
        assert guard.step_ok(torch.tensor(norm), step, ["a"])
    with pytest.raises(FloatingPointError, match=r"the gradient norm is inf at step 4 \(captions: \['a cat'\]\)"):
        guard.check_window(0.5, 4, ["a cat"])
    guard.check_window(0.5, 5, ["a"])  # the check starts a new window
    with pytest.raises(FloatingPointError, match="loss is nan at step 6"):
        guard.check_window(float("nan"), 6, ["a"])
    skip = NonfiniteGuard(accelerator, tmp_path, "skip", 3, defer_stop=True)
    assert not skip.check_loss(torch.tensor(float("nan")), 1, ["a"]) and not skip.step_ok(torch.tensor(1.0), 1, ["a"])
    assert skip.skipped == 1
    skip.check_window(float("nan"), 1, ["a"])  # skip decided at the step: nothing to stop at the log


@pytest.mark.slow
def test_compiled_unet_trains_like_the_eager_one(tmp_path, tiny_sd_dir, shapes_parquet):
    """compile=true (inductor; ~5 min on 2 shared CPU cores): the same losses within compiler
    rounding. The policy and the adapters-disabled reference are two graphs, so the first loss is
    log 2 only to ~1e-7 (fused kernels round differently), not bit-exactly."""
    eager = run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "eager", "max_steps=3"))
    compiled = run_training(_config(tmp_path, tiny_sd_dir, shapes_parquet, "compiled", "max_steps=3", "compile=true"))
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (eager, compiled)]
    assert losses[1][0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
