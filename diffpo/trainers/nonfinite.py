"""What a NaN or inf loss (or gradient norm) does to a training run: ``on_nonfinite`` in the config.

* ``stop`` (default): the run ends with one line naming the step, the batch's captions and the
  last good checkpoint. The check comes before the optimizer step, so the weights of the last
  checkpoint (and of the run so far) were never touched by the bad batch.
* ``skip``: the optimizer step of that batch is dropped (the weights and the optimizer state stay
  as they were; the data order and the learning-rate schedule move on as if it had been taken),
  ``skipped_steps`` in ``metrics.jsonl`` counts it, and ``max_nonfinite_skips`` skipped steps in a
  row end the run as ``stop`` would: a model that only produces NaN is not training.

The decision is taken alike on every process (one all-reduce of a flag), so that no process waits
in a collective the others skipped.

A loop that keeps its metrics on the device (the offline-pairs loop) passes ``defer_stop=True``:
with ``stop`` the loss and gradient norm are then not read on the host each step (that would
sync the device every step); ``check_window`` checks them at the next logging or checkpoint step,
on the window's loss mean after the cross-process reduce, before anything is written. The run
then stops there (the message names that step and its batch's captions), and no checkpoint or
export ever holds weights a NaN reached, though the in-memory weights of the steps since the last
check may have. ``skip`` cannot defer: each optimizer step's take-or-drop decision reads the loss
and the gradient norm on the host (one sync per micro-step, only in that mode). With fp16 mixed precision an inf gradient norm is the gradient
scaler's business (it skips the step and lowers the scale itself) and is not counted here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from diffpo.trainers.checkpoints import checkpoint_dirs


def last_checkpoint(run_dir: Path, accelerator=None) -> str:
    """The last checkpoint of this run: the one it resumed from or saved last (never one an earlier
    run left in the same folder); without the run's accelerator, the newest in ``run_dir``."""
    from diffpo.trainers.common import run_files  # common imports this module: a call-time import

    run = run_files(accelerator) if accelerator is not None else None
    if run is not None:
        return str(run.checkpoint) if run.checkpoint is not None else "none yet"
    found = checkpoint_dirs(run_dir)
    return str(found[-1]) if found else "none yet"


def nonfinite_message(what: str, value: float, step: int, captions, run_dir: Path, skip_hint: bool = True,
                      accelerator=None) -> str:
    return (f"{what} is {value} at step {step} (captions: {list(captions)[:4]}); last good checkpoint: "
            f"{last_checkpoint(run_dir, accelerator)}. Lower optim.lr or objective.beta, check the data"
            + (", or set on_nonfinite=skip to drop such steps" if skip_hint else ""))


class NonfiniteGuard:
    """Per run: ``check_loss`` after each micro-step's loss, ``step_ok`` once per optimizer step.
    ``state()`` goes into the checkpoint so that counts survive a resume."""

    def __init__(self, accelerator, run_dir: Path, mode: str, max_skips: int, state: dict | None = None,
                 defer_stop: bool = False):
        self.accelerator, self.run_dir, self.mode, self.max_skips = accelerator, Path(run_dir), mode, max_skips
        self.deferred = defer_stop and mode == "stop"  # check_window does the checks; skip always decides per step
        self.bad_norm: torch.Tensor | None = None  # deferred: the first non-finite gradient norm since the last check
        state = state or {}
        self.skipped = int(state.get("skipped_steps", 0))
        self.in_a_row = int(state.get("skipped_in_a_row", 0))
        self.pending: tuple[float, int, list] | None = None  # (loss, step, captions) of this step's first bad loss

    def state(self) -> dict:
        return {"skipped_steps": self.skipped, "skipped_in_a_row": self.in_a_row}

    def _any_process(self, bad: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return bad
        flag = torch.tensor([float(bad)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def check_loss(self, loss, step: int, captions) -> bool:
        """True when the micro-step's loss is finite on every process (then back-propagate it).
        Deferred (stop): always True, nothing read; ``check_window`` sees the loss in the window mean."""
        if self.deferred:
            return True
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not self._any_process(not math.isfinite(value)):
            return True
        if self.mode == "stop":
            raise FloatingPointError(nonfinite_message("loss", value, step, captions, self.run_dir,
                                                     accelerator=self.accelerator))
        if self.pending is None:
            self.pending = (value, step, list(captions))
        return False

    def step_ok(self, grad_norm, step: int, captions) -> bool:
        """Call after clipping, before ``optimizer.step()``: True to take the step, False to skip it.
        Deferred (stop): True; a non-finite norm is remembered on the device for ``check_window``."""
        if self.deferred:
            if grad_norm is not None and self.accelerator.scaler is None:
                norm = torch.as_tensor(grad_norm, dtype=torch.float32).detach()
                # keeps the first non-finite norm: a finite one is replaced, a non-finite one sticks
                self.bad_norm = norm if self.bad_norm is None else torch.where(torch.isfinite(self.bad_norm), norm, self.bad_norm)
            return True
        norm = float(grad_norm) if grad_norm is not None else 0.0
        bad_grad = not math.isfinite(norm) and self.accelerator.scaler is None
        if bad_grad and self.mode == "stop":
            raise FloatingPointError(nonfinite_message("the gradient norm", norm, step, captions, self.run_dir,
                                                     accelerator=self.accelerator))
        pending, self.pending = self.pending, None
        if pending is None and not bad_grad:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skips:
            value, _, bad_captions = pending or (norm, step, list(captions))
            raise FloatingPointError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient (max_nonfinite_skips="
                f"{self.max_skips}; the last at step {step}, value {value}, captions: {bad_captions[:4]}); the "
                f"weights are those of step {step - self.in_a_row}; last good checkpoint: "
                f"{last_checkpoint(self.run_dir, self.accelerator)}. Lower optim.lr or objective.beta, or check the data")
        return False

    def check_window(self, loss: float, step: int, captions) -> None:
        """Deferred (stop), at a logging or checkpoint step: raise when ``loss`` (the window's mean
        loss, reduced over processes) or a gradient norm since the last check was not finite.
        Does nothing otherwise (``skip`` decided every step already)."""
        if not self.deferred:
            return
        if not math.isfinite(loss):
            raise FloatingPointError(nonfinite_message("loss", loss, step, captions, self.run_dir,
                                                     accelerator=self.accelerator))
        bad_norm, self.bad_norm = self.bad_norm, None
        if bad_norm is not None:  # clipped norms are the same on every process: no collective needed
            norm = float(bad_norm)
            if not math.isfinite(norm):
                raise FloatingPointError(nonfinite_message("the gradient norm", norm, step, captions, self.run_dir,
                                                     accelerator=self.accelerator))
