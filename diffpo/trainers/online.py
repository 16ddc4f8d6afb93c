"""The online loop: methods that sample from the model while they train. One file, top to bottom:
set up, (resume), train, export.

* **D3PO** (Yang et al., CVPR 2024): rounds. The current policy samples ``samples_per_prompt``
  DDIM trajectories per prompt from one shared x_T (eta > 0 makes them diverge); reward heads
  (Pareto dominance when several) or human labels from ``diffpo label`` rank every pair of a
  prompt's images; training re-scores the stored transitions under policy and reference and
  applies the clipped per-step DPO loss at every (or a ``timestep_fraction`` of the) denoising
  steps, the step order shuffled per pair, gradients accumulated over the steps.
* **SePPO** (Zhang et al., 2024): batches of preferred images. A reference drawn from the pool of
  past checkpoints (entry 0: the base model) samples an image for each caption; the policy and
  that reference are compared on winner and sample at shared noise and timestep with the
  anchor-based flip. The policy joins the pool every ``pool_every`` optimizer steps.
* **Diffusion-DRO** (Wu et al., NeurIPS 2025): batches of expert images. A lagged copy of the
  policy (synced every ``lagged_sync_every`` optimizer steps) samples DPM-Solver++ trajectories for
  the experts' captions into a replay buffer of the last ``replay_size`` trajectories; a micro-step
  draws (x_t, t, the lagged prediction) from it, noises the caption's expert afresh at the same t,
  and applies the hinge ranking loss against the frozen base.

Each optimizer step is ``gradient_accumulation_steps`` micro-steps; every micro-step draws all its
randomness from its own generator, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from diffpo.config import ConfigError, TrainConfig
from diffpo.dtypes import MIXED_PRECISION_DTYPES
from diffpo.errors import one_line
from diffpo.models.families import TextEmbeddings, sdxl_time_ids
from diffpo.serialization import load_state_file, save_state_file
from diffpo.trainers.common import (
    EpochSampler,
    build_optimization,
    build_sampler,
    check_frames,
    checkpoint_extra,
    export_final,
    load_policy,
    loader_options,
    make_accelerator,
    make_ema,
    prepare_run_dir,
    reference_dtype,
    resume,
    run_resetting_accelerate,
    save_checkpoint,
    step_generator,
)
from diffpo.memory import check_memory
from diffpo.trainers.preflight import check_free_space
from diffpo.trainers.nonfinite import NonfiniteGuard

ROUND_SEED_OFFSET = 7_777_777  # round sampling draws from its own stream, apart from the micro-steps'


def train(config: TrainConfig) -> Path:
    """Run the online loop for ``config``; returns the run directory."""
    return run_resetting_accelerate(_train, config)


@dataclass
class Round:
    """One D3PO sampling round in memory: trajectories of all samples, their text conditioning,
    and the preference pairs (winner, loser) as sample indices."""

    index: int
    prompts: list[str]
    trajectory: object  # diffpo.kernel.trajectory.Trajectory
    text: TextEmbeddings  # per sample
    pairs: list[tuple[int, int]]
    ties: int
    stats: dict
    groups: list[int]  # prompts with at least one non-tied pair
    groups_per_batch: int
    steps: int = 0  # optimizer steps this round trains for


def _train(config: TrainConfig) -> Path:
    from accelerate.utils import set_seed

    from diffpo.data import rounds as round_files
    from diffpo.data.pairs import build_pairs
    from diffpo.data.preferences import reward_preferences
    from diffpo.eval.config import PromptSetConfig
    from diffpo.eval.prompts import load_prompts
    from diffpo.data.replay import ReplayBuffer
    from diffpo.kernel.denoising import batch_errors, noise_pairs, pair_errors
    from diffpo.kernel.noise_process import DDPMProcess
    from diffpo.kernel.samplers import SampledTrajectory, check_on_policy, jittered_flow_sigmas, max_ratio_error
    from diffpo.kernel.trajectory import sample_dpm_solver, solver_timesteps
    from diffpo.models.lora import register_lora_checkpointing
    from diffpo.models.pool import load_pool, save_pool_entry
    from diffpo.models.reference import (
        REFERENCE_ADAPTER,
        AdaptersDisabledReference,
        FrozenCopyReference,
        FullSnapshotReference,
        LoraSnapshotReference,
        policy_snapshot,
    )
    from diffpo.objectives.d3po import d3po_step_loss
    from diffpo.objectives.dro import dro_loss
    from diffpo.objectives.seppo import aaf_loss

    online, is_d3po, is_dro = config.online, config.method == "d3po", config.method == "dro"
    human = is_d3po and online.preference == "human"
    if config.cache.enabled:
        raise ConfigError(f"method={config.method} samples while training and reads no latent cache: set cache.enabled=false")

    # ---- set-up -------------------------------------------------------------------------------
    # accumulation is done here by hand: D3PO backpropagates once per denoising step
    accelerator = make_accelerator(config, 1)
    if human and accelerator.num_processes > 1:
        raise ConfigError("online.preference=human runs on one process: launch without multi-GPU")
    run_dir = prepare_run_dir(config, accelerator.is_main_process)
    set_seed(config.seed)
    weight_dtype = MIXED_PRECISION_DTYPES[config.mixed_precision]
    stack, unet, params = load_policy(config, accelerator, weight_dtype)
    check_free_space(run_dir, sum(p.numel() for p in params) * 4, config)
    process = stack.noise_process
    is_flow = not isinstance(process, DDPMProcess)
    # the sampler fits the model's noise process: DDIM (eta = online.eta) on DDPM models, a flow SDE / ODE on flow models
    sampler_config = online.sampler
    if is_dro and not is_flow and (sampler_config.name != "auto" or sampler_config.noise_level is not None
                                   or sampler_config.window):
        raise ConfigError("method=dro samples DPM-Solver++ trajectories on DDPM models: leave online.sampler at its "
                          "defaults (it chooses the sampler on flow models only)")
    # DRO's lagged copy samples deterministically (DPM-Solver++ on DDPM models, the ODE on flow models)
    sampler = build_sampler(sampler_config, stack, online.eta, "ode" if is_dro else "flow_sde")
    if is_d3po and not sampler.stochastic:
        raise ConfigError(f"method=d3po needs a stochastic sampler with a log-probability per step; {sampler.spec.describe()} "
                          "has none: on DDPM models set online.eta > 0, on flow models online.sampler.name=flow_sde, "
                          "dance_sde or cps with noise_level > 0")
    if stack.is_video and config.method != "seppo":
        raise ConfigError(f"method={config.method} does not train video models yet: use method=seppo, method=grpo / ddpo / "
                          "nft on rewards, or method=diffusion_dpo / sft on video preference pairs")
    if not is_d3po:
        check_frames(config.data, stack)
    # the reference is a past state of the policy (D3PO: base or previous round; SePPO: a pool draw);
    # Diffusion-DRO compares against the base and samples with a lagged past state
    ref_dtype = reference_dtype(config, weight_dtype)
    lora = config.finetune == "lora"
    snapshot_reference = (LoraSnapshotReference(unet, stack.denoiser) if lora else
                          FullSnapshotReference(stack.load_unet(), accelerator.device, ref_dtype, config.reference.offload,
                                                stack.denoiser))
    reference, lagged = snapshot_reference, None
    if is_dro:
        lagged = snapshot_reference
        reference = (AdaptersDisabledReference(unet, stack.denoiser) if lora else
                     FrozenCopyReference(stack.load_unet(), accelerator.device, ref_dtype, config.reference.offload,
                                         stack.denoiser))
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    resolution = stack.native_resolution
    check_memory(config, stack, config.data.resolution or resolution, accelerator.device, weight_dtype.itemsize)
    latent_shape = stack.latent_shape(resolution)  # D3PO: images (video models are refused above)
    empty_text = stack.encode_prompts([""])

    rewards, loader, winners = {}, None, None
    if is_d3po:
        try:
            prompt_set = [r.prompt for r in load_prompts(PromptSetConfig(
                source=online.prompts, prompt_column=online.prompt_column, category_column="",
                max_prompts=online.max_prompts, subsample_seed=config.seed))]
        except (ValueError, OSError) as error:  # the eval loader names its own keys: name this config's
            raise ConfigError(one_line(error).replace("prompts.source", "online.prompts")
                              .replace("prompts.max_prompts", "online.max_prompts")) from None
        if not human:
            from diffpo.rewards import load as load_reward

            rewards = {name: load_reward(name, **online.reward_options.get(name, {})) for name in online.rewards}
    else:
        winners = build_pairs(config.data, config.data.resolution or resolution, config.seed, winners_only=True)
        epochs = EpochSampler(len(winners), config.seed)
        # DRO: a loader batch is one refill of the replay buffer
        batch_size = (online.replay_batch_size or config.train_batch_size) if is_dro else config.train_batch_size
        loader = torch.utils.data.DataLoader(winners, batch_size=batch_size, sampler=epochs,
                                             **loader_options(config, accelerator))
        if len(loader) == 0:
            raise ValueError(f"{len(winners)} images do not fill one batch of {batch_size}: use more images or a "
                             "smaller train_batch_size (DRO: online.replay_batch_size)")

    optimizer, lr_schedule, lr = build_optimization(config, params, accelerator)
    if loader is not None:
        unet, optimizer, loader, lr_schedule = accelerator.prepare(unet, optimizer, loader, lr_schedule)
    else:
        unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    if config.finetune == "lora":
        register_lora_checkpointing(accelerator, unet)
    ema = make_ema(config, params, accelerator)
    raw_unet = accelerator.unwrap_model(unet)
    policy, sampling_policy = stack.denoiser(unet), stack.denoiser(raw_unet)
    if accelerator.is_main_process:
        accelerator.init_trackers("diffpo", config={"method": config.method, "lr": lr, "beta": config.objective.beta})

    # ---- resume -------------------------------------------------------------------------------
    state, log = resume(accelerator, run_dir, config.resume_from,
                        {"global_step": 0, "micro_step": 0, "round": 0, "round_step": 0, "expert_batches": 0})
    if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        # rounds, replay buffers and expert-batch counters are per process
        raise ConfigError(f"this {config.method} checkpoint was saved by {state['num_processes']} processes: "
                          f"resume it with {state['num_processes']} (online runs keep per-process state)")
    nonfinite = NonfiniteGuard(accelerator, run_dir, config.on_nonfinite, config.max_nonfinite_skips, state)
    pool = load_pool(run_dir / "pool", online.pool_strategy, state["global_step"]) if config.method == "seppo" else None
    replay = replay_name = None
    if is_dro:  # the buffer and the lagged copy as the checkpoint left them (the copy: the policy itself when in sync)
        replay, replay_name = ReplayBuffer(online.replay_size), f"replay_buffer-p{accelerator.process_index}"
        replay.load_state_dict(checkpoint_extra(run_dir, config.resume_from, replay_name) or {})
        stored_lagged = checkpoint_extra(run_dir, config.resume_from, "lagged_policy")
        lagged.load(stored_lagged or policy_snapshot(raw_unet, config.finetune), snapshot_id=("lagged", state["global_step"]))

    def conditioning(text: TextEmbeddings) -> dict:
        n = text.hidden.shape[0]
        time_ids = None
        if stack.family.name == "sdxl":  # generated at the native size, uncropped
            size = torch.tensor([[resolution, resolution]] * n)
            time_ids = sdxl_time_ids(size, torch.zeros_like(size), resolution)
        return stack.family.unet_conditioning(text, time_ids)

    def unconditional(n: int) -> dict:
        return conditioning(TextEmbeddings(empty_text.hidden.expand(n, -1, -1),
                                           None if empty_text.pooled is None else empty_text.pooled.expand(n, -1)))

    def sample(denoise, text: TextEmbeddings, x_T: torch.Tensor, generator: torch.Generator) -> SampledTrajectory:
        with torch.no_grad(), accelerator.autocast():
            return sampler.sample(denoise, x_T.to(accelerator.device, weight_dtype), conditioning(text),
                                  unconditional(x_T.shape[0]), online.guidance_scale, online.num_inference_steps, generator)

    def decode(latents: torch.Tensor) -> torch.Tensor:  # images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]
        return stack.decode_latents(latents)

    def backward(loss: torch.Tensor, sync: bool) -> None:
        with nullcontext() if sync else accelerator.no_sync(unet):
            accelerator.backward(loss)

    # ---- D3PO rounds ----------------------------------------------------------------------------
    def sample_round(index: int) -> Path:
        """Sample, decode and store round ``index`` (trajectories, images, and reward scores)."""
        generator = step_generator(config.seed + ROUND_SEED_OFFSET, index, accelerator.process_index)
        picks = torch.randint(0, len(prompt_set), (online.prompts_per_round,), generator=generator).tolist()
        prompts = [prompt_set[i] for i in picks]
        k = online.samples_per_prompt
        x_T = torch.randn((len(prompts), *latent_shape), generator=generator).repeat_interleave(k, 0)
        text = stack.encode_prompts(prompts).select(torch.arange(len(prompts)).repeat_interleave(k))
        trajectory = sample(sampling_policy, text, x_T, generator)
        if trajectory.steps.numel() == 0:
            raise ConfigError(f"{sampler.spec.describe()} recorded no step of {online.num_inference_steps}: widen "
                              "online.sampler.window")
        images = decode(trajectory.final)
        folder = round_files.round_dir(run_dir, index)
        suffix = f"-p{accelerator.process_index}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        if sampler_config.on_policy_tolerance is not None:  # re-scoring with the sampling weights must give ratio 1
            with torch.no_grad(), accelerator.autocast():
                error = max_ratio_error(sampler, sampling_policy, trajectory, conditioning(text),
                                        unconditional(len(text.hidden)), online.guidance_scale)
            check_on_policy(error, sampler_config.on_policy_tolerance, trajectory.spec, weight_dtype)
            (folder / f"on_policy{suffix}.json").write_text(json.dumps({"max_ratio_error": error}))
        save_state_file({**trajectory.state_dict(), "prompts": prompts}, folder / f"trajectories{suffix}.safetensors")
        if online.reference == "previous_round":  # the model that sampled this round is its reference
            from safetensors.torch import save_file

            save_file(policy_snapshot(raw_unet, config.finetune), str(folder / f"reference{suffix}.safetensors"))
        if rewards:
            scores = torch.stack([head(images, [p for p in prompts for _ in range(k)]) for head in rewards.values()])
            (folder / f"scores{suffix}.json").write_text(json.dumps({n: s.tolist() for n, s in zip(rewards, scores)}))
        names = []
        if accelerator.is_main_process and (online.save_images or human):
            from diffpo.eval.generate import to_pil

            for n, image in enumerate(to_pil(images)):
                name = f"images/g{n // k:04d}-s{n % k}.png"
                image.save(folder / name)
                names.append(name)
        if accelerator.is_main_process:
            grouped = [names[g * k:(g + 1) * k] for g in range(len(prompts))] if names else [[] for _ in prompts]
            round_files.write_manifest(folder, index, prompts, k, grouped)
        return folder

    def load_round(index: int) -> Round | None:
        """Round ``index`` from disk with its preferences; None while human labels are missing."""
        folder = round_files.round_dir(run_dir, index)
        suffix = f"-p{accelerator.process_index}"
        stored = load_state_file(folder / f"trajectories{suffix}.safetensors")
        manifest = round_files.read_manifest(folder)
        k = online.samples_per_prompt
        if human:
            labels = round_files.read_labels(folder)
            if online.require_all_labels and round_files.pending_pairs(manifest, labels):
                return None
            prefs = round_files.labelled_preferences(manifest, labels)
            stats = {"labelled": float(len(labels))}
        else:
            scores = json.loads((folder / f"scores{suffix}.json").read_text())
            table = torch.tensor([scores[name] for name in rewards])
            prefs = reward_preferences(table, round_files.all_pairs(len(stored["prompts"]), k), k, online.min_margin)
            stats = {f"reward/{name}": float(torch.tensor(values).mean()) for name, values in scores.items()}
        pairs = [(g * k + w, g * k + lo) for g, w, lo, tie in prefs if not tie]
        ties = sum(tie for *_, tie in prefs)
        stats["tie_fraction"] = ties / max(len(prefs), 1)
        trajectory = SampledTrajectory.from_state_dict(stored, accelerator.device)
        on_policy = folder / f"on_policy{suffix}.json"
        if on_policy.is_file():
            stats["on_policy_ratio_error"] = json.loads(on_policy.read_text())["max_ratio_error"]
        prompts = stored["prompts"]
        text = stack.encode_prompts(prompts).select(torch.arange(len(prompts)).repeat_interleave(k))
        groups = sorted({w // k for w, _ in pairs})
        # train_batch_size pairs per micro-step, rounded up to whole prompts
        groups_per_batch = min(len(groups), -(-config.train_batch_size // (k * (k - 1) // 2))) if groups else 1
        micro_batches = len(groups) * online.inner_epochs // groups_per_batch
        steps = max(1, micro_batches // config.gradient_accumulation_steps) if pairs else 0
        if online.reference == "previous_round":
            from safetensors.torch import load_file

            reference.load(load_file(str(folder / f"reference{suffix}.safetensors")), snapshot_id=("round", index))
        else:
            reference.load(None)
        return Round(index, prompts, trajectory, text, pairs, ties, stats, groups, groups_per_batch, steps)

    def d3po_micro_step(current: Round, micro_in_round: int, generator: torch.Generator, scale: float, sync: bool) -> dict:
        """Per-step DPO on the pairs of ``groups_per_batch`` prompts; one backward per denoising step.

        All samples of a prompt are scored at the same (shuffled) step, so each transition is
        re-scored once however many pairs it is in: k samples give k(k-1)/2 pairs per k forwards."""
        k = online.samples_per_prompt
        order = torch.cat([torch.randperm(len(current.groups), generator=torch.Generator().manual_seed(
            config.seed * 9_973 + current.index * 101 + epoch)) for epoch in range(online.inner_epochs + 1)])
        n = current.groups_per_batch
        groups = [current.groups[int(order[(micro_in_round * n + i) % len(order)])] for i in range(n)]
        samples = torch.tensor([g * k + j for g in groups for j in range(k)])
        slot = {int(sample): i for i, sample in enumerate(samples)}  # a sample's row in the batch
        chosen = [(slot[w], slot[lo]) for w, lo in current.pairs if w // k in groups]
        winners, losers = torch.tensor([w for w, _ in chosen]), torch.tensor([lo for _, lo in chosen])
        recorded = current.trajectory.steps  # the stochastic steps (all of them without a window)
        num_steps = recorded.shape[0]
        trained = max(1, round(num_steps * online.timestep_fraction))
        perms = torch.stack([torch.randperm(num_steps, generator=generator)[:trained] for _ in groups])
        cond, uncond = conditioning(current.text.select(samples)), unconditional(len(samples))
        totals: dict[str, float] = {}
        for i in range(trained):
            steps = recorded[perms[:, i]].repeat_interleave(k)
            args = (current.trajectory, steps, samples, cond, uncond, online.guidance_scale)
            with torch.no_grad(), accelerator.autocast():
                logp_ref = sampler.rescore(reference, *args)
            logp_policy = sampler.rescore(policy, *args)
            loss, metrics = d3po_step_loss(logp_policy[winners], logp_ref[winners], logp_policy[losers], logp_ref[losers],
                                           beta=config.objective.beta, clip=config.objective.clip_range)
            loss = loss.mean()
            backward(loss * scale / trained, sync and i == trained - 1)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / trained
        totals["pairs_per_batch"] = float(len(chosen))
        return totals

    # ---- SePPO batches ----------------------------------------------------------------------------
    def seppo_micro_step(batch: dict, generator: torch.Generator, scale: float, sync: bool) -> dict:
        """Draw a reference from the pool, let it sample x_r for the captions, and apply AAF."""
        mean, std = stack.encode_images(batch["pixels_w"])
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        latents_w = stack.latents_from_distribution(mean, std, eps).to(weight_dtype)
        text = stack.encode_prompts(batch["caption"])
        drawn = pool.draw_index(generator)
        reference.load(pool.entries[drawn], snapshot_id=("pool", drawn))
        x_T = torch.randn(latents_w.shape, generator=generator)
        # the sample goes the winners' way (decoded to 8-bit pixels, encoded again), so that raw
        # sampled latents vs. VAE-encoded images is not a difference the policy can learn instead;
        # on a video model x_T has the winners' (C, F, h, w) shape, so the reference samples a video
        pixels_r = (decode(sample(reference, text, x_T, generator).final) * 255).round() / 255 * 2 - 1
        mean_r, std_r = stack.encode_images(pixels_r)
        eps_r = torch.randn(mean_r.shape, generator=generator).to(mean_r.device)
        latents_r = stack.latents_from_distribution(mean_r, std_r, eps_r).to(weight_dtype)
        noise, timesteps = process.draw(latents_w, generator)
        noised = noise_pairs(process, latents_w, latents_r, noise, timesteps)
        target = process.target(noised.latents, noised.noise, noised.timesteps)
        errors = pair_errors(policy, reference, noised, conditioning(text.repeat_pairs()), target)
        loss, metrics = aaf_loss(errors.policy_w, errors.ref_w, errors.policy_l, errors.ref_l, config.objective.beta,
                                 config.objective.adaptive_flip)
        loss = loss.mean()
        backward(loss * scale, sync)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()},
                "pool_index": float(drawn), "pool_size": float(len(pool))}

    def expert_batches():
        """Batches of preferred images (SePPO) or experts (DRO), epoch after epoch, from the batch the run is at."""
        while True:
            epoch, skip = divmod(state["expert_batches"], len(loader))
            epochs.start_epoch(epoch)
            winners.start_epoch(epoch)
            for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
                state["expert_batches"] += 1
                yield batch

    # ---- Diffusion-DRO micro-steps -----------------------------------------------------------------
    def refill_replay(batch: dict, generator: torch.Generator) -> None:
        """The lagged copy samples one DPM-Solver++ trajectory per expert caption (prompts dropped
        with data.prompt_dropout, for both branches) into the buffer, with the expert latents."""
        mean, std = stack.encode_images(batch["pixels_w"])
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        experts = stack.latents_from_distribution(mean, std, eps).to(weight_dtype)
        n = experts.shape[0]
        drop = torch.rand(n, generator=generator) < config.data.prompt_dropout
        text = stack.encode_prompts(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
        x_T = torch.randn(experts.shape, generator=generator).to(accelerator.device, weight_dtype)
        if is_flow:  # the flow sampler (ode by default) on per-sample jittered sigma grids, recording its outputs
            sigmas = jittered_flow_sigmas(process, online.num_inference_steps, n, experts.shape[1:], online.jitter_timesteps,
                                          generator)
            with torch.no_grad(), accelerator.autocast():
                flow = sampler.sample(lagged, x_T, conditioning(text), unconditional(n), online.guidance_scale,
                                      record_outputs=online.negative_target, schedule=sampler.per_sample_schedule(sigmas))
            replay.add(timesteps=flow.timesteps.T, latents=flow.latents[:-1].to(weight_dtype).transpose(0, 1),
                       predictions=flow.outputs.transpose(0, 1), expert=experts, hidden=text.hidden, pooled=text.pooled)
            return
        grid = solver_timesteps(stack.noise_scheduler.config.num_train_timesteps, online.num_inference_steps, n,
                                online.jitter_timesteps, generator)
        with torch.no_grad(), accelerator.autocast():
            trajectory = sample_dpm_solver(lagged, stack.noise_scheduler, x_T, conditioning(text), grid, unconditional(n),
                                           online.guidance_scale, stack.prediction_type, online.negative_target)
        replay.add(timesteps=grid.T, latents=trajectory.latents.transpose(0, 1), predictions=trajectory.predictions.transpose(0, 1),
                   expert=experts, hidden=text.hidden, pooled=text.pooled)

    def dro_micro_step(generator: torch.Generator, scale: float, sync: bool) -> dict:
        """Hinge ranking loss on ``train_batch_size`` draws from the buffer: each an online negative
        (x_t, t, target = the lagged prediction) and its caption's expert noised afresh at that t."""
        if len(replay) == 0 or state["micro_step"] % online.replay_every == 0:
            refill_replay(next(batches), generator)
        drawn = {k: v.to(accelerator.device) for k, v in replay.sample(config.train_batch_size, generator).items()}
        experts, t = drawn["expert"].to(weight_dtype), drawn["timesteps"]
        noise = torch.randn(experts.shape, generator=generator).to(experts.device, experts.dtype)
        noisy = torch.cat([process.add_noise(experts, noise, t), drawn["latents"].to(weight_dtype)])
        target = torch.cat([process.target(experts, noise, t).float(),
                            drawn["predictions"].float()])
        text = TextEmbeddings(drawn["hidden"], drawn.get("pooled"))
        errors = batch_errors(policy, reference, noisy, torch.cat([t, t]), conditioning(text.repeat_pairs()), target)
        loss, metrics = dro_loss(errors.policy_w, errors.ref_w, errors.policy_l, errors.ref_l, config.objective.margin)
        loss = loss.mean()
        backward(loss * scale, sync)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}, "replay_size": float(len(replay))}

    def checkpoint_extras() -> dict | None:
        """DRO: the replay buffer, and the lagged copy unless it equals the policy (in sync this step)."""
        if not is_dro:
            return None
        extras = {replay_name: replay.state_dict()}
        if state["global_step"] % online.lagged_sync_every and accelerator.is_main_process:
            extras["lagged_policy"] = lagged_state()
        return extras

    def lagged_state() -> dict:
        if lora:
            from peft.utils import get_peft_model_state_dict

            state_dict = get_peft_model_state_dict(raw_unet, adapter_name=REFERENCE_ADAPTER)
        else:
            state_dict = lagged.unet.state_dict()
        return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}

    # ---- train --------------------------------------------------------------------------------
    progress = tqdm(total=config.max_steps, initial=state["global_step"], desc=f"train {config.method}",
                    disable=not (accelerator.is_main_process and config.progress_bar))
    current, batches, empty_rounds = None, (expert_batches() if not is_d3po else None), 0
    window: dict[str, float] = {}
    window_count = 0
    while state["global_step"] < config.max_steps:
        while is_d3po and (current is None or state["round_step"] >= current.steps):
            if current is not None:  # the round is done: move on to the next one
                state["round"], state["round_step"] = state["round"] + 1, 0
            if not (round_files.round_dir(run_dir, state["round"]) / round_files.MANIFEST).is_file():
                progress.set_postfix_str(f"sampling round {state['round']}")
                sample_round(state["round"])
                accelerator.wait_for_everyone()
            current = load_round(state["round"])
            if current is None:  # human labels pending: save where we are, export, and stop
                save_checkpoint(accelerator, run_dir, dict(state), config.checkpoints_total_limit)
                export_final(accelerator, unet, stack, config, run_dir, state["global_step"], ema, params)
                progress.close()
                accelerator.print(
                    f"round {state['round']} waits for labels: run `diffpo label {run_dir}`, then "
                    f"`diffpo train {run_dir / 'config.yaml'} resume_from=latest`")
                accelerator.end_training()
                return run_dir
            empty_rounds = 0 if current.steps else empty_rounds + 1
            if empty_rounds >= 10:
                raise ValueError(f"10 rounds in a row gave only ties (last: round {current.index}): lower "
                                 "online.min_margin, raise online.samples_per_prompt or check the reward")
        metrics_sum: dict[str, float] = {}
        accumulation = config.gradient_accumulation_steps
        for micro in range(accumulation):
            generator = step_generator(config.seed, state["micro_step"], accelerator.process_index)
            sync = micro == accumulation - 1
            if is_d3po:
                metrics = d3po_micro_step(current, state["round_step"] * accumulation + micro, generator, 1 / accumulation, sync)
                captions = current.prompts
            elif is_dro:
                metrics = dro_micro_step(generator, 1 / accumulation, sync)
                captions = []
            else:
                batch = next(batches)
                metrics = seppo_micro_step(batch, generator, 1 / accumulation, sync)
                captions = batch["caption"]
            # the micro-step has back-propagated already: a bad loss makes step_ok drop the whole step
            nonfinite.check_loss(metrics["loss"], state["global_step"] + 1, captions)  # stop: raises
            for key, value in metrics.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value / accumulation
            state["micro_step"] += 1
            log.count(int(metrics.get("pairs_per_batch", config.train_batch_size)))
        max_norm = config.optim.max_grad_norm or float("inf")
        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        stepped = nonfinite.step_ok(grad_norm, state["global_step"] + 1, captions)  # skip: False drops the step
        if stepped:
            optimizer.step()
        state.update(nonfinite.state())
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        state["global_step"] += 1
        state["round_step"] += 1
        step = state["global_step"]
        if ema is not None:
            ema.step(params)
        if is_dro and step % online.lagged_sync_every == 0:  # DRO: the lagged sampler catches up
            lagged.load(policy_snapshot(raw_unet, config.finetune), snapshot_id=("lagged", step))
        if pool is not None and step % online.pool_every == 0:  # SePPO: the policy joins the pool
            snapshot = policy_snapshot(raw_unet, config.finetune)
            pool.add(snapshot)
            if accelerator.is_main_process:
                save_pool_entry(run_dir / "pool", len(pool) - 1, step, snapshot)
        if stepped:  # a skipped step's NaNs stay out of the logged means
            for key, value in metrics_sum.items():
                window[key] = window.get(key, 0.0) + value
            window_count += 1
        progress.update(1)
        if step % config.log_every == 0 or step == config.max_steps:
            window = window or {"loss": float("nan")}  # every step of the window was skipped
            keys = sorted(window)
            means = accelerator.reduce(torch.tensor([window[k] / max(window_count, 1) for k in keys], device=accelerator.device),
                                       reduction="mean")
            values = dict(zip(keys, means.tolist()))
            values.update(grad_norm=float(grad_norm), lr=lr_schedule.get_last_lr()[0], skipped_steps=nonfinite.skipped)
            if is_d3po:  # the round being trained: its rewards, ties, labels
                values.update(current.stats, round=float(state["round"]))
            record = log.write(step, values)
            nan = float("nan")
            shown = ({"acc": record.get("implicit_acc", nan)} if is_d3po else {"active": record.get("active", nan)}
                     if is_dro else {"flip": record.get("flip_rate", nan)})
            progress.set_postfix(loss=f"{record['loss']:.4f}", **{k: f"{v:.2f}" for k, v in shown.items()})
            window, window_count = {}, 0
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            save_checkpoint(accelerator, run_dir, dict(state), config.checkpoints_total_limit, checkpoint_extras())
    progress.close()
    save_checkpoint(accelerator, run_dir, dict(state), config.checkpoints_total_limit, checkpoint_extras())

    # ---- export -------------------------------------------------------------------------------
    export_final(accelerator, unet, stack, config, run_dir, state["global_step"], ema, params)
    accelerator.end_training()
    return run_dir
