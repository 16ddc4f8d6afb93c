"""Pieces every training loop shares: run directory, optimizer, checkpoints, metrics, RNG."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffpo.config import ConfigError, save_config

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def prepare_run_dir(config, is_main: bool) -> Path:
    """Create the run folder and write the resolved config (``diffpo train RUN/config.yaml`` reruns it)."""
    run_dir = Path(config.output_dir)
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "config.yaml")
        except OSError as error:
            raise ConfigError(f"output_dir={str(run_dir)!r} is not writable ({error.strerror}): choose another folder") from None
    return run_dir


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """The CPU generator of one micro-step: noise, timesteps, latent samples and prompt dropout
    are all drawn from it, so resuming at any step reproduces the uninterrupted run exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 1_009 + process_index)


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch): the data order is a function of the step.

    The method is deliberately not called ``set_epoch``: accelerate's dataloaders call that with
    their own iteration counter, which restarts at 0 after ``skip_first_batches`` on resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class CurriculumSampler(EpochSampler):
    """Curry-DPO (Pattnaik et al., 2024) order: epoch 0 is the curriculum, easy to hard.

    Pairs are sorted by reward margin s_w − s_l, largest (easiest) first, ties by index, and cut
    into ``stages`` near-equal consecutive stages (``numpy.array_split``); epoch 0 visits stage 1
    in a shuffled order, then stage 2, ... Epochs >= 1 are ``EpochSampler``'s plain permutations.
    Every order is a pure function of (margins, stages, seed, epoch), so resuming is exact."""

    def __init__(self, margins, stages: int, seed: int):
        margins = np.asarray(margins, dtype=np.float64)
        if not np.isfinite(margins).all():
            raise ValueError("data.score_columns hold NaN/inf scores: fix or drop those rows before a curriculum")
        if not 1 <= stages <= len(margins):
            raise ValueError(f"data.curriculum_stages={stages} must lie in [1, {len(margins)}] (the number of pairs)")
        super().__init__(len(margins), seed)
        self.stages = [stage.tolist() for stage in np.array_split(np.argsort(-margins, kind="stable"), stages)]

    def __iter__(self):
        if self.epoch > 0:
            return super().__iter__()
        order = []
        for number, stage in enumerate(self.stages):
            # its own stream per stage, apart from the epoch permutations (seed * 7_919 + epoch)
            generator = torch.Generator().manual_seed(self.seed * 7_919 + 1_000_003 * (number + 1))
            order.extend(stage[i] for i in torch.randperm(len(stage), generator=generator).tolist())
        return iter(order)


def build_optimizer(params, optim):
    lr = optim.lr
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                 eps=optim.adam_epsilon, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.optimizer=adamw8bit needs bitsandbytes: pip install 'diffpo[bnb]'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                   eps=optim.adam_epsilon, weight_decay=optim.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=optim.weight_decay)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a trainer state), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(run_dir: Path, resume_from: str | None) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None  # nothing saved yet: start from scratch
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from={resume_from!r} is not a diffpo checkpoint folder (no {STATE_FILE}); use 'latest' or a checkpoints/step-N folder")
    return path


def save_checkpoint(accelerator, run_dir: Path, state: dict, keep: int | None,
                    extras: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename; keep the last ``keep``.

    ``extras`` maps file names to tensors a loop keeps outside accelerate (a replay buffer), written
    by every process as ``NAME.safetensors`` (so names carry the process index where they differ)."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['global_step']}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{state['global_step']}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for name, tensors in (extras or {}).items():
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and to accelerate trackers."""

    def __init__(self, accelerator, path: Path):
        self.accelerator, self.path = accelerator, path
        self.last_time, self.pairs_since = time.time(), 0

    def count(self, pairs: int) -> None:
        self.pairs_since += pairs

    def write(self, step: int, values: dict) -> dict:
        now = time.time()
        record = {"step": step, **{k: (float(v) if not isinstance(v, str) else v) for k, v in values.items()}}
        record["pairs_per_s"] = self.pairs_since * self.accelerator.num_processes / max(now - self.last_time, 1e-9)
        self.last_time, self.pairs_since = now, 0
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        return record


def check_finite(loss: torch.Tensor, step: int, captions: list[str], run_dir: Path) -> None:
    if not math.isfinite(float(loss.detach())):
        found = checkpoint_dirs(run_dir)
        last = str(found[-1]) if found else "none yet"
        raise FloatingPointError(
            f"loss is {float(loss.detach())} at step {step} (captions: {captions[:4]}); last good checkpoint: {last}. "
            "Lower optim.lr or objective.beta, or check the data"
        )


def make_accelerator(config, gradient_accumulation_steps: int):
    """The run's Accelerator: precision, trackers, and ``RUN_DIR/logs`` for tensorboard."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = {"none": None, "all": "all"}.get(config.report_to, config.report_to)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")),
    )


def load_policy(config, accelerator, weight_dtype):
    """The stack of ``config.model`` and the trainable policy: a LoRA adapter (fp32 weights) on the
    frozen UNet, or the whole UNet in fp32. Returns (stack, unet, trainable params)."""
    from diffusers.training_utils import cast_training_params

    from diffpo.models.loading import load_stack
    from diffpo.models.lora import attach_lora

    stack = load_stack(config.model.pretrained, config.model.revision, config.model.variant,
                       config.model.prediction_type, config.model.vae, dtype=weight_dtype, device=accelerator.device,
                       motion_adapter=config.model.motion_adapter)
    unet = stack.unet
    if config.finetune == "lora":
        if not stack.family.supports_lora:
            raise ConfigError(f"{stack.family.unet_class_name} ({stack.family.pipeline_class_name}) has no peft adapter "
                              "support in diffusers, so its pipeline cannot load a LoRA: set finetune=full")
        params = attach_lora(unet, config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.target_modules,
                             config.lora.part, stack.family)
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
    else:
        unet.to(dtype=torch.float32).requires_grad_(True)
        params = list(unet.parameters())
    return stack, unet, params


def check_frames(data, stack) -> None:
    """Video models train on clips of ``data.num_frames`` frames, image models on images."""
    if stack.is_video and data.num_frames is None:
        raise ConfigError(f"{stack.source} is a video model ({stack.family.pipeline_class_name}): set data.num_frames "
                          "(frames per training clip, e.g. 16 for AnimateDiff)")
    if not stack.is_video and data.num_frames is not None:
        raise ConfigError(f"data.num_frames={data.num_frames} reads video clips, but {stack.source} is an image model "
                          f"({stack.family.pipeline_class_name}): set data.num_frames=null or use a video model")


def reference_dtype(config, weight_dtype):
    from diffpo.dtypes import DTYPES

    return weight_dtype if config.reference.dtype == "auto" else DTYPES[config.reference.dtype]


def build_optimization(config, params, accelerator):
    """Optimizer and learning-rate schedule of ``config.optim``; returns (optimizer, schedule, lr)."""
    from diffusers.optimization import get_scheduler

    lr = config.optim.lr
    if config.optim.scale_lr:  # Diffusion-DPO: lr x total pairs per optimizer step
        lr *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(params, config.optim)
    for group in optimizer.param_groups:
        group["lr"] = lr
    schedule = get_scheduler(config.optim.lr_scheduler, optimizer,
                             num_warmup_steps=config.optim.warmup_steps * accelerator.num_processes,
                             num_training_steps=config.max_steps * accelerator.num_processes)
    return optimizer, schedule, lr


def export_final(accelerator, unet, stack, config, run_dir: Path, global_step: int, ema=None, params=None) -> None:
    """Write ``RUN_DIR/final``: LoRA weights ``pipe.load_lora_weights`` reads, or the full UNet, plus
    ``diffpo.json`` (base model, method, steps). EMA weights replace the raw ones when kept."""
    from diffpo.models.lora import export_lora

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(params)
        final = run_dir / "final"
        if config.finetune == "lora":
            export_lora(trained, stack.family.pipeline_class, final)
        else:
            trained.save_pretrained(final / "unet", safe_serialization=True)
        (final / "diffpo.json").write_text(json.dumps({
            "base_model": stack.source, "finetune": config.finetune, "method": config.method,
            "steps": global_step, "pipeline_class": stack.family.pipeline_class_name,
            **({"motion_adapter": stack.extra["motion_adapter"]} if stack.extra.get("motion_adapter") else {})}, indent=2))


def run_resetting_accelerate(loop, config):
    """Run a training loop; afterwards reset accelerate's process-wide state singleton so that the
    next run in this process (quickstart, notebooks, tests) may choose another precision or device."""
    from accelerate.state import AcceleratorState

    try:
        return loop(config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def make_ema(config, params, accelerator):
    """The EMA of the trained weights (``config.ema``), checkpointed with the run; None when off."""
    if not config.ema.enabled:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=config.ema.decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def checkpoint_extra(run_dir: Path, resume_from: str | None, name: str) -> dict[str, torch.Tensor] | None:
    """The tensors ``save_checkpoint`` stored as ``extras[name]`` in the checkpoint ``resume_from``
    names; None for a fresh run or a checkpoint without that file."""
    from safetensors.torch import load_file

    checkpoint = resolve_resume(run_dir, resume_from)
    path = None if checkpoint is None else checkpoint / f"{name}.safetensors"
    return load_file(str(path)) if path is not None and path.is_file() else None


def resume(accelerator, run_dir: Path, resume_from: str | None, state: dict) -> tuple[dict, MetricsLog]:
    """Load the checkpoint ``resume_from`` names (if any) into the accelerator and ``state`` (the
    loop's counters); a fresh run starts a new ``metrics.jsonl``. Returns (state, metrics log)."""
    checkpoint = resolve_resume(run_dir, resume_from)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = {**state, **json.loads((checkpoint / STATE_FILE).read_text())}
        accelerator.print(f"resumed from {checkpoint} at step {state['global_step']}")
    elif accelerator.is_main_process:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return state, MetricsLog(accelerator, run_dir / "metrics.jsonl")
