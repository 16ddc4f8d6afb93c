"""The offline-pairs loop: Diffusion-DPO, SFT, SmPO and every method that learns from a fixed set
of preference pairs. One file, top to bottom: set up, (resume), train, export.

Per micro-step: get latent distributions and text embeddings (from the cache, or by running the
VAE and text encoders), draw everything random from the step's own generator, noise winner and
loser with shared noise and timestep, compute policy and reference errors in one concatenated
forward each, apply the method's objective, step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from diffpo.config import ConfigError, TrainConfig
from diffpo.dtypes import MIXED_PRECISION_DTYPES
from diffpo.kernel.denoising import (
    NoisedPairs,
    PairStreams,
    noise_pairs,
    pair_errors,
    per_sample_error,
    to_device,
)
from diffpo.kernel.noise_process import DDPMProcess
from diffpo.models.families import TextEmbeddings, sdxl_time_ids
from diffpo.objectives import METHODS
from diffpo.objectives.variants import kto_feedback_loss
from diffpo.trainers.common import (
    CurriculumSampler,
    EpochSampler,
    build_optimization,
    check_frames,
    export_final,
    load_policy,
    loader_options,
    make_accelerator,
    make_ema,
    prepare_run_dir,
    reference_dtype,
    resume,
    run_resetting_accelerate,
    resumed_micro_step,
    save_checkpoint,
)
from diffpo.memory import check_memory
from diffpo.trainers.preflight import check_free_space
from diffpo.trainers.nonfinite import NonfiniteGuard


def train(config: TrainConfig) -> Path:
    """Run the offline-pairs loop for ``config``; returns the run directory."""
    return run_resetting_accelerate(_train, config)


def _train(config: TrainConfig) -> Path:
    from accelerate.utils import set_seed

    from diffpo.data.bad_samples import BadSampleLog, skipped_records
    from diffpo.data.cache import CachedPairs, build_cache, cached_bad_samples
    from diffpo.data.pairs import build_pairs
    from diffpo.models.lora import register_lora_checkpointing
    from diffpo.models.reference import AdaptersDisabledReference, FrozenCopyReference

    # ---- set-up -------------------------------------------------------------------------------
    accelerator = make_accelerator(config, config.gradient_accumulation_steps)
    run_dir = prepare_run_dir(config, accelerator.is_main_process)
    set_seed(config.seed)
    method = METHODS[config.method]
    weight_dtype = MIXED_PRECISION_DTYPES[config.mixed_precision]
    stack, unet, params = load_policy(config, accelerator, weight_dtype)
    check_free_space(run_dir, sum(p.numel() for p in params) * 4, config)
    check_frames(config.data, stack)
    resolution = config.data.resolution or stack.native_resolution
    if resolution % stack.vae_scale_factor:
        factor = stack.vae_scale_factor
        raise ConfigError(f"data.resolution={resolution} is not divisible by the VAE factor {factor}: use a multiple of "
                          f"{factor}, e.g. {max(factor, round(resolution / factor) * factor)}")
    check_memory(config, stack, resolution, accelerator.device, weight_dtype.itemsize)
    reference = None
    # a reference-free objective (simpo) needs neither the reference forward nor a frozen copy
    if method.needs_reference and not config.objective.reference_free:
        reference = (AdaptersDisabledReference(unet, stack.denoiser) if config.finetune == "lora" else
                     FrozenCopyReference(stack.load_unet(), accelerator.device, reference_dtype(config, weight_dtype),
                                         config.reference.offload, stack.denoiser))
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.compile:  # in place: the LoRA reference (adapters off) is one more graph of the same module
        unet.compile()

    pairs = build_pairs(config.data, resolution, config.seed)
    if config.cache.enabled:
        # every process encodes its share of the shards (diffpo.data.cache.build_cache)
        folder = build_cache(stack, pairs, config.cache.dir, config.cache.dtype, config.cache.shard_size,
                             text_dtype=config.cache.text_dtype, progress=accelerator.is_main_process, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes, wait_for_everyone=accelerator.wait_for_everyone)
        for encoder in stack.text_encoders:  # training reads their outputs from the cache: free the device (T5-XXL: 9.5 GB)
            encoder.to("cpu")
        dataset = CachedPairs(folder, [pairs.caption(i) for i in range(len(pairs))], config.data.flip, config.seed)
        empty = dataset.empty_prompt()
        empty_text = TextEmbeddings(empty["hidden"].to(accelerator.device, weight_dtype),
                                    empty["pooled"].to(accelerator.device, weight_dtype) if "pooled" in empty else None)
    else:
        dataset = pairs
        empty_text = stack.encode_prompts([""])
    if config.data.curriculum_stages:  # Curry-DPO: the first epoch easy -> hard by reward margin
        sampler = CurriculumSampler(pairs.score_margins(), config.data.curriculum_stages, config.seed)
    else:
        sampler = EpochSampler(len(dataset), config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, sampler=sampler,
                                         **loader_options(config, accelerator))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} pairs do not fill one batch of train_batch_size={config.train_batch_size}: "
                         "use more pairs or a smaller train_batch_size")

    optimizer, lr_schedule, lr = build_optimization(config, params, accelerator)
    unet, optimizer, loader, lr_schedule = accelerator.prepare(unet, optimizer, loader, lr_schedule)
    global_batch = config.train_batch_size * accelerator.num_processes  # pairs per micro-step, all processes

    def position(step: int, micro: int) -> dict:
        """The run's place in the data: counters, and the pairs consumed in the current epoch (for a
        resume with another process count or batch size)."""
        epoch, batches = divmod(micro, len(loader))
        return {"global_step": step, "micro_step": micro, "epoch": epoch, "epoch_pairs": batches * global_batch}
    if config.finetune == "lora":
        register_lora_checkpointing(accelerator, unet)
    ema = make_ema(config, params, accelerator)
    policy = stack.denoiser(unet)
    process = stack.noise_process  # DDPM or rectified flow: the family chose it
    if method.prepare == "inversion":  # SmPO: the current policy inverts x_0 (no grad): DDIM, or the flow ODE
        if isinstance(process, DDPMProcess) and stack.prediction_type != "epsilon":
            raise ConfigError(f"method={config.method} trains against an inversion noise target: it needs an epsilon-prediction model")
        if config.cache.enabled:
            raise ConfigError(f"method={config.method} reads reward scores with every pair: set cache.enabled=false")
        if config.data.score_columns is None:
            raise ConfigError(f"method={config.method} needs reward scores per image: set data.score_columns "
                              "(e.g. [pickscore_0, pickscore_1] from `diffpo score --pairs`)")
        # objective.inversion_model: the policy (official; the target moves as it trains) or the reference
        inverting_policy = (reference if config.objective.inversion_model == "reference"
                            else stack.denoiser(accelerator.unwrap_model(unet)))
    if accelerator.is_main_process:
        accelerator.init_trackers("diffpo", config={"method": config.method, "lr": lr, "beta": config.objective.beta})

    # ---- resume -------------------------------------------------------------------------------
    state, log = resume(accelerator, run_dir, config.resume_from, {"global_step": 0, "micro_step": 0}, lr_schedule)
    global_step, micro_step = state["global_step"], resumed_micro_step(state, len(loader), global_batch)
    bad_samples = BadSampleLog(accelerator, run_dir, micro_step)  # data.skip_bad_samples: RUN_DIR/bad_samples.jsonl
    if config.cache.enabled:
        bad_samples.add(cached_bad_samples(folder), micro_step=-1, step=0)
    # on_nonfinite=stop keeps this loop free of per-step host syncs: the loss and gradient norm stay
    # on the device and are checked at the next logging or checkpoint step, after the cross-process
    # reduce, before anything is written (so no checkpoint or export holds weights a NaN reached).
    # on_nonfinite=skip must decide each optimizer step on the host: it syncs once per micro-step.
    nonfinite = NonfiniteGuard(accelerator, run_dir, config.on_nonfinite, config.max_nonfinite_skips, state,
                               defer_stop=True)

    # ---- one micro-step -----------------------------------------------------------------------
    def feedback_batch_loss(batch: dict, streams: PairStreams):
        """Diffusion-KTO on unpaired feedback (``data.feedback_column``): every image noised on its
        own (no pair to share noise with), policy and reference errors, the per-image KTO loss."""
        mean, std = stack.encode_images(batch["pixels_w"])
        eps = to_device(streams.randn(mean.shape[1:]), mean.device)
        latents = stack.latents_from_distribution(mean, std, eps).to(weight_dtype)
        drop = streams.rand() < config.data.prompt_dropout
        text = stack.encode_prompts(batch["caption"]).where(drop, empty_text)
        noise, timesteps = process.draw(latents, streams)
        time_ids = None
        if stack.family.name == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size_w"], batch["crop_w"], resolution)
        conditioning = stack.family.unet_conditioning(text, time_ids)
        noisy = process.add_noise(latents, noise, timesteps)
        target = process.target(latents, noise, timesteps)
        weights = process.error_weights(timesteps)
        policy_err = per_sample_error(policy(noisy, timesteps, conditioning), target, weights)
        with torch.no_grad():
            ref_err = per_sample_error(reference(noisy, timesteps, conditioning), target, weights)
        per_image, metrics = kto_feedback_loss(policy_err, ref_err, torch.as_tensor(batch["desirable"]), config.objective.beta)
        return per_image.mean(), metrics

    def micro_batch_loss(batch: dict, streams: PairStreams):
        if "mean_w" in batch:  # from the cache
            mean = torch.cat([batch["mean_w"], batch["mean_l"]]).to(accelerator.device, torch.float32)
            std = torch.cat([batch["std_w"], batch["std_l"]]).to(accelerator.device, torch.float32)
            text = TextEmbeddings(batch["hidden"].to(accelerator.device, weight_dtype),
                                  batch["pooled"].to(accelerator.device, weight_dtype) if "pooled" in batch else None)
        else:
            mean, std = stack.encode_images(torch.cat([batch["pixels_w"], batch["pixels_l"]]))
            text = stack.encode_prompts(batch["caption"])
        eps = to_device(torch.cat([streams.randn(mean.shape[1:]), streams.randn(mean.shape[1:])]), mean.device)
        latents = stack.latents_from_distribution(mean, std, eps).to(weight_dtype)
        latents_w, latents_l = latents.chunk(2)
        drop = streams.rand() < config.data.prompt_dropout
        text = text.where(drop, empty_text).repeat_pairs()
        noise, timesteps = process.draw(latents_w, streams)  # one noise and one timestep per pair
        noised = noise_pairs(process, latents_w, latents_l, noise, timesteps)
        time_ids = None
        if stack.family.name == "sdxl":
            time_ids = sdxl_time_ids(torch.cat([batch["original_size_w"], batch["original_size_l"]]),
                                     torch.cat([batch["crop_w"], batch["crop_l"]]), resolution)
        conditioning = stack.family.unet_conditioning(text, time_ids)
        if method.prepare == "inversion" and config.objective.inversion_steps > 0:  # SmPO: x_t from inverting x_0; its target
            # (DDPM: the noise tau reaching x~_t in one jump; flow: the straight-path velocity (x~ - x_0) / sigma)
            noisy = process.invert(inverting_policy, noised.latents, conditioning, noised.timesteps,
                                   config.objective.inversion_steps, config.objective.inversion_grid)
            target = process.inversion_target(noisy, noised.latents, noised.timesteps).to(noised.latents.dtype)
            noised = NoisedPairs(noisy.to(noised.latents.dtype), target, noised.timesteps, noised.latents)
        else:
            target = process.target(noised.latents, noised.noise, noised.timesteps)
        errors = pair_errors(policy, reference, noised, conditioning, target, process.error_weights(noised.timesteps),
                             winners_only=not method.uses_losers)
        per_pair, metrics = method.loss(errors, config.objective, batch)
        return per_pair.mean(), metrics

    # ---- train --------------------------------------------------------------------------------
    progress = tqdm(total=config.max_steps, initial=global_step, desc=f"train {config.method}",
                    disable=not (accelerator.is_main_process and config.progress_bar))
    # metric sums stay on the device: the host reads them (one sync) only at logging and checkpoint steps
    window: dict[str, torch.Tensor] = {}
    window_count = 0

    def window_means(captions: list[str]) -> dict[str, float]:
        """Means over the micro-steps since the last log, averaged over processes (a NaN/inf loss on
        any process makes the mean NaN); on_nonfinite=stop ends every process here on one."""
        # every micro-step of the window was skipped (on_nonfinite=skip): a NaN loss is logged
        sums = window or {"loss": torch.tensor(float("nan"), device=accelerator.device)}
        means = accelerator.reduce(torch.stack([v / max(window_count, 1) for v in sums.values()]), reduction="mean")
        values = dict(zip(sums.keys(), means.tolist()))
        nonfinite.check_window(values["loss"], global_step, captions)
        return values

    while global_step < config.max_steps:
        epoch, skip = divmod(micro_step, len(loader))
        sampler.start_epoch(epoch)
        dataset.start_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            with accelerator.accumulate(unet):
                batch_loss = feedback_batch_loss if config.data.feedback_column else micro_batch_loss
                loss, metrics = batch_loss(batch, PairStreams(config.seed, epoch, batch["index"]))
                finite = nonfinite.check_loss(loss, global_step + 1, batch["caption"])  # skip: False drops the batch
                bad_samples.add(skipped_records(batch), micro_step, global_step + 1)
                if finite:
                    accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    max_norm = config.optim.max_grad_norm or float("inf")
                    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
                    if nonfinite.step_ok(grad_norm, global_step + 1, batch["caption"]):  # skip: False drops the step
                        optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            log.count(len(batch["caption"]))
            if finite:  # a skipped batch's NaNs stay out of the logged means
                for key, value in {"loss": loss, **metrics}.items():
                    value = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device).detach()
                    window[key] = window[key] + value if key in window else value
                window_count += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.step(params)
            progress.update(1)
            checkpointing = bool(config.checkpoint_every) and global_step % config.checkpoint_every == 0
            if global_step % config.log_every == 0 or global_step == config.max_steps:
                values = window_means(batch["caption"])
                bad_samples.flush()
                values.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                              lr=lr_schedule.get_last_lr()[0], epoch=epoch, bad_samples=bad_samples.count,
                              skipped_steps=nonfinite.skipped)
                record = log.write(global_step, values)
                progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('implicit_acc', float('nan')):.2f}")
                window, window_count = {}, 0
            elif checkpointing:
                window_means(batch["caption"])  # never checkpoint weights a NaN loss has reached
            if checkpointing and global_step < config.max_steps:
                bad_samples.flush()
                save_checkpoint(accelerator, run_dir, {**position(global_step, micro_step), **nonfinite.state()},
                                config.checkpoints_total_limit)
            if global_step >= config.max_steps:
                break
    progress.close()
    bad_samples.flush()
    save_checkpoint(accelerator, run_dir, {**position(global_step, micro_step), **nonfinite.state()},
                    config.checkpoints_total_limit)

    # ---- export -------------------------------------------------------------------------------
    export_final(accelerator, unet, stack, config, run_dir, global_step, ema, params, data_size={"pairs": len(pairs)})
    accelerator.end_training()
    return run_dir
