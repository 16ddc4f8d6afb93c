"""Pieces every training loop shares: run directory, optimizer, checkpoints, metrics, RNG."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from diffpo.config import ConfigError, save_config
from diffpo.errors import one_line

# the checkpoint folder layout lives in trainers.checkpoints (nonfinite and preflight read it too)
from diffpo.trainers.checkpoints import (  # noqa: F401 - re-exported: the loops and tests import them from here
    CHECKPOINT_PREFIX,
    KILL_DURING_SAVE,
    OLD_PREFIX,
    STATE_FILE,
    TMP_PREFIX,
    checkpoint_complete,
    checkpoint_dirs,
    remove_unfinished_checkpoints,
    resolve_resume,
)


PENDING_CONFIG = ".config.yaml.pending"  # the new run's config until the run starts (RunFiles.start)
RUN_FILES = "diffpo_run_files"  # the attribute of a run's Accelerator that holds its RunFiles


def prepare_run_dir(config, is_main: bool) -> Path:
    """Check that the run folder can hold this run and stage its resolved config there, without
    touching what an earlier run left in it: ``config.yaml`` is replaced (and a fresh run's
    ``metrics.jsonl`` removed) only when the run starts writing (``RunFiles.start``), after its
    config, model, data and checkpoint have loaded. ``diffpo train RUN/config.yaml`` reruns it."""
    import tempfile

    from diffpo.config import absolute_paths
    from diffpo.trainers.preflight import check_resume_config, output_dir_error

    run_dir = Path(config.output_dir)
    # main only: the others would race these writes; a launcher stops them when the main process fails
    changed = check_resume_config(config, run_dir) if is_main else []
    if is_main:
        if changed:
            print(f"note: resuming with changed settings: {'; '.join(changed)}")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
                pass
            save_config(absolute_paths(config), run_dir / PENDING_CONFIG)
        except OSError as error:
            raise output_dir_error(run_dir, error) from None
    return run_dir


class RunFiles:
    """What a run owns in its run dir. ``start`` (once, at the run's first metrics line or
    checkpoint) moves the staged config onto ``config.yaml`` and lets a fresh run begin a new
    ``metrics.jsonl``; until then a failing run leaves an earlier run's files as they were.
    ``checkpoint``: the last checkpoint this run resumed from or saved (None: none yet), the one a
    NaN message or an interruption names."""

    def __init__(self, run_dir: Path, is_main: bool, fresh: bool, checkpoint: Path | None = None):
        self.run_dir, self.is_main, self.fresh, self.checkpoint = Path(run_dir), is_main, fresh, checkpoint
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        if not self.is_main:
            return
        pending = self.run_dir / PENDING_CONFIG
        if pending.is_file():
            os.replace(pending, self.run_dir / "config.yaml")
        if self.fresh:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)


def run_files(accelerator) -> RunFiles | None:
    return getattr(accelerator, RUN_FILES, None)


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


def build_optimizer(params, optim, cpu_offload: bool = False):
    """The optimizer of ``optim``; ``cpu_offload`` (DeepSpeed offloading the optimizer): AdamW as
    DeepSpeed's CPU Adam, the one its offloaded step runs."""
    lr = optim.lr
    if optim.optimizer == "adamw" and cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon,
                                weight_decay=optim.weight_decay, adamw_mode=True)
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


def save_checkpoint(accelerator, run_dir: Path, state: dict, keep: int | None,
                    extras: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the training state (``training_state.save_training_state``: safetensors only) into a
    temporary folder, fsync it, then rename it to ``checkpoints/step-N``; keep the last ``keep``.

    ``trainer_state.json`` (the loop's counters and a manifest of every file with its size) is
    written last, so a kill at any moment leaves either the previous checkpoints untouched plus a
    ``.tmp-step-N`` that nothing reads (and the next save or resume deletes), or a complete
    ``step-N``. ``extras`` maps file names to tensors a loop keeps outside accelerate (a replay
    buffer), written by every process as ``NAME.safetensors`` (names carry the process index where
    they differ)."""
    from safetensors.torch import save_file

    from diffpo.serialization import fsync_tree
    from diffpo.trainers.training_state import save_training_state

    run = run_files(accelerator)
    if run is not None:
        run.start()
    root = run_dir / "checkpoints"
    name = f"{CHECKPOINT_PREFIX}{state['global_step']}"
    final, tmp, old = root / name, root / f"{TMP_PREFIX}{name}", root / f"{OLD_PREFIX}{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        remove_unfinished_checkpoints(run_dir)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    save_training_state(accelerator, tmp)
    for extra, tensors in (extras or {}).items():
        save_file(tensors, str(tmp / f"{extra}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.environ.get(KILL_DURING_SAVE) == str(state["global_step"]):
            os.kill(os.getpid(), signal.SIGKILL)  # the state files are written, the manifest not yet
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        # num_processes: a resume with another process count adjusts the schedule (resume) and the data position
        (tmp / STATE_FILE).write_text(json.dumps({**state, "num_processes": accelerator.num_processes, "files": files}))
        fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run that was already done): swap
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if keep:
            for stale in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    if run is not None:
        run.checkpoint = final
    return final


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and to accelerate trackers."""

    def __init__(self, accelerator, path: Path, run: RunFiles | None = None):
        self.accelerator, self.path, self.run = accelerator, path, run
        self.last_time, self.pairs_since = time.time(), 0

    def count(self, pairs: int) -> None:
        self.pairs_since += pairs

    def write(self, step: int, values: dict) -> dict:
        now = time.time()
        record = {"step": step, **{k: (float(v) if not isinstance(v, str) else v) for k, v in values.items()}}
        record["pairs_per_s"] = self.pairs_since * self.accelerator.num_processes / max(now - self.last_time, 1e-9)
        self.last_time, self.pairs_since = now, 0
        if self.run is not None:
            self.run.start()
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        return record


def check_finite(loss: torch.Tensor | float, step: int, captions: list[str], run_dir: Path, accelerator=None) -> None:
    """Stop on a NaN/inf loss (loops without ``on_nonfinite`` use this; see trainers.nonfinite). A
    tensor is read on the host: call it where a sync is acceptable."""
    from diffpo.trainers.nonfinite import nonfinite_message

    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(nonfinite_message("loss", value, step, captions, run_dir, skip_hint=False,
                                                   accelerator=accelerator))


def make_accelerator(config, gradient_accumulation_steps: int):
    """The run's Accelerator: precision, trackers, and ``RUN_DIR/logs`` for tensorboard."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    trackers = {"none": None, "all": "all"}.get(config.report_to, config.report_to)
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # processes torchrun / accelerate launch started
    accelerator = Accelerator(
        # torchrun on a machine without an accelerator: accelerate forms a gloo (MULTI_CPU) group
        # only when asked for the CPU; otherwise every process would run alone as the main one
        cpu=launched > 1 and not torch.accelerator.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")),
        # batches reach the device by asynchronous copies from pinned memory (loader_options)
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    if accelerator.num_processes != launched:
        raise ConfigError(f"{launched} processes were launched but accelerate joined {accelerator.num_processes}: "
                          "launch with `accelerate launch` or torchrun and a backend this machine has")
    return accelerator


def loader_options(config, accelerator) -> dict:
    """DataLoader settings of the training loops: ``data.num_workers`` decoding processes, and pinned
    host memory on CUDA so that batches reach the GPU by asynchronous copies (no stream sync).
    Workers are not persistent: each epoch's workers must see the dataset's new epoch (flips)."""
    from diffpo.data.pairs import collate_pairs

    return {"num_workers": config.data.num_workers, "pin_memory": accelerator.device.type == "cuda",
            "collate_fn": collate_pairs, "drop_last": True}


def load_policy(config, accelerator, weight_dtype):
    """The stack of ``config.model`` and the trainable policy: a LoRA adapter (fp32 weights) on the
    frozen UNet, or the whole UNet in fp32. Returns (stack, unet, trainable params)."""
    from diffusers.training_utils import cast_training_params

    from diffpo.models.loading import load_stack
    from diffpo.models.lora import attach_lora

    stack = load_stack(config.model.pretrained, config.model.revision, config.model.variant,
                       config.model.prediction_type, config.model.vae, dtype=weight_dtype, device=accelerator.device,
                       motion_adapter=config.model.motion_adapter, flow_sampling=config.model.flow_sampling(),
                       guidance=config.model.guidance, max_sequence_length=config.model.max_sequence_length)
    unet = stack.unet
    if config.finetune == "lora":
        if not stack.family.supports_lora:
            raise ConfigError(f"{stack.family.unet_class_name} ({stack.family.pipeline_class_name}) has no peft adapter "
                              "support in diffusers, so its pipeline cannot load a LoRA: set finetune=full")
        try:
            params = attach_lora(unet, config.lora.rank, config.lora.alpha, config.lora.dropout,
                                 config.lora.target_modules, config.lora.part, stack.family)
        except ValueError as error:  # peft: "Target modules {...} not found in the base model"
            if "arget modules" not in str(error):
                raise
            raise ConfigError(f"lora.target_modules={config.lora.target_modules}: {one_line(error)} Name layers of "
                              "the denoiser, e.g. [to_q, to_k, to_v, to_out.0]") from None
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
    else:
        unet.to(dtype=torch.float32).requires_grad_(True)
        params = list(unet.parameters())
    return stack, unet, params


def build_sampler(sampler_config, stack, ddim_eta: float = 1.0, flow_auto: str = "flow_sde", key: str = "online.sampler"):
    """The ``diffpo.kernel.samplers.Sampler`` that ``sampler_config`` (a ``SamplerConfig``) names for
    ``stack``'s noise process, on the family's sampling scheduler. ``name: auto`` is ``ddim`` on DDPM
    models and ``flow_auto`` on flow models; ``noise_level: null`` is ``ddim_eta`` for DDIM and the
    official default otherwise. A sampler that does not fit the model is a ConfigError naming ``key``
    and the valid choices."""
    from diffpo.kernel.noise_process import DDPMProcess
    from diffpo.kernel.samplers import SamplerMismatch, make_sampler

    is_flow = not isinstance(stack.noise_process, DDPMProcess)
    if is_flow and ddim_eta != 1.0:  # a DDIM setting that would silently do nothing on a flow model
        raise ConfigError(f"online.eta={ddim_eta} is DDIM's eta; {stack.family.pipeline_class_name} is a flow model: set "
                          f"{key}.noise_level instead (and leave online.eta at 1.0)")
    name = flow_auto if is_flow and sampler_config.name == "auto" else sampler_config.name
    noise_level = sampler_config.noise_level
    if noise_level is None and not is_flow:
        noise_level = ddim_eta
    try:
        return make_sampler(name, stack.noise_process, stack.family.sampling_scheduler(stack.noise_scheduler), noise_level,
                            sampler_config.window, stack.prediction_type)
    except SamplerMismatch as error:
        raise ConfigError(f"{key}.name={sampler_config.name}: {error} "
                          f"({stack.family.pipeline_class_name} is {'a flow-matching' if is_flow else 'a DDPM'} model)") from None


def check_frames(data, stack) -> None:
    """Video models train on clips of ``data.num_frames`` frames, image models on images."""
    if stack.is_video and data.num_frames is None:
        raise ConfigError(f"{stack.source} is a video model ({stack.family.pipeline_class_name}): set data.num_frames "
                          "(frames per training clip, e.g. 16 for AnimateDiff)")
    if not stack.is_video and data.num_frames is not None:
        raise ConfigError(f"data.num_frames={data.num_frames} reads video clips, but {stack.source} is an image model "
                          f"({stack.family.pipeline_class_name}): set data.num_frames=null or use a video model")
    try:  # the family's own limits (Wan: 4k+1 frames, sides a multiple of VAE factor x patch)
        stack.check_clip(data.num_frames, data.resolution or stack.native_resolution)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def reference_dtype(config, weight_dtype):
    from diffpo.dtypes import DTYPES

    return weight_dtype if config.reference.dtype == "auto" else DTYPES[config.reference.dtype]


def build_optimization(config, params, accelerator):
    """Optimizer and learning-rate schedule of ``config.optim``; returns (optimizer, schedule, lr)."""
    from diffusers.optimization import get_scheduler

    lr = config.optim.lr
    if config.optim.scale_lr:  # Diffusion-DPO: lr x total pairs per optimizer step
        lr *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type.value == "DEEPSPEED" else None
    optimizer = build_optimizer(params, config.optim, cpu_offload=plugin is not None and plugin.offload_optimizer_device == "cpu")
    for group in optimizer.param_groups:
        group["lr"] = lr
    schedule = get_scheduler(config.optim.lr_scheduler, optimizer,
                             num_warmup_steps=config.optim.warmup_steps * accelerator.num_processes,
                             num_training_steps=config.max_steps * accelerator.num_processes)
    return optimizer, schedule, lr


def shards_parameters(accelerator) -> bool:
    """True under FSDP and DeepSpeed ZeRO-3: no process holds the whole trained UNet."""
    kind = accelerator.distributed_type.value
    return kind == "FSDP" or (kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3)


def export_final(accelerator, unet, stack, config, run_dir: Path, global_step: int, ema=None, params=None,
                 data_size: dict | None = None) -> None:
    """Write ``RUN_DIR/final``: LoRA weights ``pipe.load_lora_weights`` reads, or the full UNet, plus
    ``diffpo.json`` (base model, method, steps) and a model card ``README.md`` (``data_size``: counts
    of the training data for it, e.g. ``{"pairs": 1200}``). EMA weights replace the raw ones when kept."""
    from diffpo.models.card import write_model_card
    from diffpo.models.lora import export_lora

    accelerator.wait_for_everyone()
    # sharded weights are gathered first: a collective every process joins (ZeRO-3 needs
    # zero3_save_16bit_model: true, as configs/accelerate/deepspeed_zero3*.yaml set)
    gathered = accelerator.get_state_dict(unet) if shards_parameters(accelerator) else None
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(params)
        final = run_dir / "final"
        if config.finetune == "lora":
            export_lora(trained, stack.family.pipeline_class, final, state_dict=gathered,
                        layers_argument=stack.family.lora_layers_argument)
        elif gathered is None:  # final/unet, or final/transformer (SD3, FLUX): the family's denoiser folder
            trained.save_pretrained(final / stack.family.denoiser_attr, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            folder = final / stack.family.denoiser_attr
            trained.save_config(folder)
            save_file({k: v.contiguous() for k, v in gathered.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
        (final / "diffpo.json").write_text(json.dumps({
            "base_model": stack.source, "finetune": config.finetune, "method": config.method,
            "steps": global_step, "pipeline_class": stack.family.pipeline_class_name,
            **({"motion_adapter": stack.extra["motion_adapter"]} if stack.extra.get("motion_adapter") else {})}, indent=2))
        write_model_card(final, config, stack, global_step, run_dir, data_size)


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
    if shards_parameters(accelerator):
        raise ConfigError("ema.enabled=true keeps a full copy of weights that FSDP / DeepSpeed ZeRO-3 shard: "
                          "set ema.enabled=false or use DDP / ZeRO-2")
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


def resume(accelerator, run_dir: Path, resume_from: str | None, state: dict,
           lr_schedule=None) -> tuple[dict, MetricsLog]:
    """Load the checkpoint ``resume_from`` names (if any) into the accelerator and ``state`` (the
    loop's counters); a fresh run starts a new ``metrics.jsonl`` when it first writes
    (``RunFiles``). Metrics logged after the
    checkpoint by the run that died are dropped, so the resumed log reads like an uninterrupted
    one. Returns (state, metrics log).

    A checkpoint saved by another number of processes loads where the format allows it (diffpo's
    own format and DDP: the full weights and optimizer state, fresh RNGs for new processes; FSDP
    sharded states through torch.distributed.checkpoint); accelerate steps a prepared schedule
    once per process per optimizer step, so ``lr_schedule`` is moved to where this process count
    would have it."""
    from diffpo.trainers.training_state import load_training_state

    checkpoint = resolve_resume(run_dir, resume_from)
    metrics = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        remove_unfinished_checkpoints(run_dir)
    if checkpoint is not None:
        load_training_state(accelerator, checkpoint)
        saved = json.loads((checkpoint / STATE_FILE).read_text())
        saved.pop("files", None)
        state = {**state, **saved}
        saved_processes = state.get("num_processes", accelerator.num_processes)
        if saved_processes != accelerator.num_processes and lr_schedule is not None:
            schedule = getattr(lr_schedule, "scheduler", lr_schedule)
            schedule.last_epoch = state["global_step"] * accelerator.num_processes - 1
            schedule.step()  # recomputes every group's lr at the new position
        accelerator.print(f"resumed from {checkpoint} at step {state['global_step']}"
                          + (f" (saved by {saved_processes} processes)" if saved_processes != accelerator.num_processes else ""))
    run = RunFiles(run_dir, accelerator.is_main_process, fresh=checkpoint is None, checkpoint=checkpoint)
    if checkpoint is not None:
        run.start()  # the run resumes: its config and metrics log go on from the checkpoint
        if accelerator.is_main_process:
            truncate_metrics(metrics, state["global_step"])
    setattr(accelerator, RUN_FILES, run)  # save_checkpoint and the NaN guard of this run find it there
    accelerator.wait_for_everyone()
    return state, MetricsLog(accelerator, metrics, run)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (and none cut short by a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def resumed_micro_step(state: dict, batches_per_epoch: int, global_batch: int) -> int:
    """The micro-step to continue at when ``global_batch`` (pairs per micro-step over all
    processes) may differ from the saved run's: the same epoch, the same pairs consumed in it.
    Every pair draws its randomness from its own stream (``PairStreams``), so the continuation
    sees the same pairs with the same noise as the saved run would have."""
    if "epoch_pairs" not in state:  # a fresh run, or a checkpoint from before positions were saved
        return state["micro_step"]
    if state["epoch_pairs"] % global_batch:
        raise ConfigError(
            f"the checkpoint is {state['epoch_pairs']} pairs into epoch {state['epoch']}, which batches of "
            f"{global_batch} pairs (train_batch_size x processes) do not divide: resume with a train_batch_size "
            "or process count whose product divides it")
    return state["epoch"] * batches_per_epoch + state["epoch_pairs"] // global_batch
