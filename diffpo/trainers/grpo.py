"""The online RL loop on rewards: GRPO (Flow-GRPO / DanceGRPO), DDPO and DiffusionNFT. One file, top
to bottom: set up, (resume), rounds of sampling and training, export.

A round: ``online.prompts_per_round`` prompts (the same on every process), a group of
``online.samples_per_prompt`` = G samples per prompt, each from its own x_T, split evenly over the
processes; every reward head scores every sample; the scores are gathered so that each group is
normalised over all its G samples wherever they were sampled (``gather_groups``), and the trained
rewards combine into advantages A = sum_k w_k · groupnorm(r_k) (``diffpo.rewards.combine``; DDPO:
``advantage: per_prompt``, the per-prompt stat tracker), clipped to ``online.adv_clip``. Gold
rewards (``online.gold_rewards``) are scored and logged, never trained on; the hacking guard stops
the run when the gold mean falls while the trained mean rises.

Video models (AnimateDiff, ModelScope, Wan) train the same way on clips of ``data.num_frames``
frames: x_T is (C, F', h, w) (``stack.latent_shape``), every log-probability and error is a mean
over all non-batch dims of the 5-D latents (the kernel's convention), the decoded clips
(B, F, 3, H, W) go to the reward heads whole (``motion-match``, ``video-reward``) or frame by frame
and averaged (image heads).

Training on a round, per micro-step, ``train_batch_size`` of this process's samples:

* **GRPO / DDPO** (``objectives.grpo``): the stored transitions of ``timestep_fraction`` of the
  steps (a random subset per sample) or of a window of ``window_size`` steps that slides by
  ``window_stride`` per round (MixGRPO), re-scored under the policy with the sampler's own guidance
  (no guidance: ``guidance_scale: 1``); PPO-clipped ratio against the sampler's stored log-probs,
  plus ``objective.kl_coef`` x the exact Gaussian KL to the base model. Before the round's first
  optimizer step the policy *is* the sampler, so every ratio must be 1: the largest deviation is
  logged (``ratio_deviation``) and above ``online.ratio_tolerance`` the run stops naming dtype and
  sampler settings.
* **DiffusionNFT** (``objectives.nft``): the clean samples noised afresh by the model's forward
  process at timesteps from its training distribution, ``round(num_inference_steps x
  timestep_fraction)`` draws per sample; the policy and the round's sampling policy (v_old, kept
  in a second adapter or a frozen copy) predict; no log-probabilities, no guidance.

Rounds live in ``RUN_DIR/rounds/round-NNNN/`` (trajectories or clean latents, every reward's scores,
the sampling policy for NFT, images), so a resumed run trains the same round from the same step;
each micro-step draws its randomness from its own generator (``step_generator``).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from diffpo.config import ConfigError, TrainConfig
from diffpo.dtypes import MIXED_PRECISION_DTYPES
from diffpo.errors import one_line
from diffpo.memory import check_memory
from diffpo.models.families import TextEmbeddings
from diffpo.serialization import load_state_file, save_state_file
from diffpo.trainers.common import (
    build_optimization,
    build_sampler,
    check_frames,
    export_final,
    load_policy,
    make_accelerator,
    make_ema,
    prepare_run_dir,
    reference_dtype,
    resume,
    run_resetting_accelerate,
    save_checkpoint,
    step_generator,
)
from diffpo.trainers.nonfinite import NonfiniteGuard
from diffpo.trainers.preflight import check_free_space

ROUND_SEED_OFFSET = 8_888_888  # round sampling draws from its own stream, apart from the micro-steps'
SCORES_FILE = "scores.json"  # every reward's (prompts, G) table of a round, gathered over processes


def train(config: TrainConfig) -> Path:
    """Run the GRPO / DDPO / NFT loop for ``config``; returns the run directory."""
    return run_resetting_accelerate(_train, config)


def gather_groups(accelerator, local: torch.Tensor) -> torch.Tensor:
    """(prompts, G / processes) scores of this process -> the (prompts, G) table of every group,
    process p's samples in columns p·G/n ... (p+1)·G/n - 1, identical on every process."""
    gathered = accelerator.gather(local.contiguous().to(accelerator.device)).cpu()  # (n · prompts, G / n)
    n = accelerator.num_processes
    return gathered.view(n, *local.shape).permute(1, 0, 2).reshape(local.shape[0], -1)


def sliding_window(num_steps: int, size: int, stride: int, round_index: int) -> tuple[int, int]:
    """MixGRPO's window of round ``round_index``: ``size`` consecutive steps starting ``stride`` steps
    later every round, wrapping around to step 0 after the last position."""
    size = min(size, num_steps)
    start = (round_index * stride) % (num_steps - size + 1)
    return start, start + size


def trained_steps(recorded: torch.Tensor, count: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Which of the ``recorded`` (stochastic) steps each of ``count`` samples trains this micro-step:
    (steps per sample, count), a fresh random subset of ``fraction`` of them per sample, in shuffled order."""
    trained = max(1, round(len(recorded) * fraction))
    return torch.stack([recorded[torch.randperm(len(recorded), generator=generator)[:trained]] for _ in range(count)], dim=1)


@dataclass
class Round:
    """One round in memory: this process's samples (trajectories for GRPO, clean latents for NFT),
    their text, advantages and the round's logged statistics."""

    index: int
    prompts: list[str]  # per local sample
    trajectory: object  # diffpo.kernel.samplers.SampledTrajectory (NFT: None, it trains on ``final``)
    final: torch.Tensor  # the clean samples (local samples, ...)
    text: TextEmbeddings  # per local sample
    advantages: torch.Tensor  # (local samples,)
    stats: dict
    steps: int  # optimizer steps this round trains for
    batches_per_epoch: int


def _train(config: TrainConfig) -> Path:
    from accelerate.utils import set_seed

    from diffpo.data import rounds as round_files
    from diffpo.eval.config import PromptSetConfig
    from diffpo.eval.prompts import load_prompts
    from diffpo.kernel.samplers import SampledTrajectory, check_on_policy
    from diffpo.models.lora import register_lora_checkpointing
    from diffpo.models.reference import (
        AdaptersDisabledReference,
        FrozenCopyReference,
        FullSnapshotReference,
        LoraSnapshotReference,
        policy_snapshot,
    )
    from diffpo.objectives.grpo import PerPromptStatTracker, gaussian_mean_kl, grpo_step_loss
    from diffpo.objectives.nft import nft_loss, optimality_probability
    from diffpo.rewards.combine import HackingGuard, RewardSet, combine, reward_stats

    online, objective = config.online, config.objective
    is_nft = config.method == "nft"
    advantage = online.advantage or ("per_prompt" if config.method == "ddpo" else "group")
    if config.cache.enabled:
        raise ConfigError(f"method={config.method} samples while training and reads no latent cache: set cache.enabled=false")
    if online.preference != "reward":
        raise ConfigError(f"method={config.method} learns from reward heads: set online.preference=reward")

    # ---- set-up -------------------------------------------------------------------------------
    accelerator = make_accelerator(config, 1)  # accumulation by hand: GRPO backpropagates once per denoising step
    n_proc = accelerator.num_processes
    if online.samples_per_prompt % n_proc:
        raise ConfigError(f"online.samples_per_prompt={online.samples_per_prompt} must split evenly over {n_proc} "
                          "processes (each samples an equal share of every group)")
    run_dir = prepare_run_dir(config, accelerator.is_main_process)
    set_seed(config.seed)
    weight_dtype = MIXED_PRECISION_DTYPES[config.mixed_precision]
    stack, unet, params = load_policy(config, accelerator, weight_dtype)
    check_free_space(run_dir, sum(p.numel() for p in params) * 4, config)
    process = stack.noise_process
    # the sampler layer: DDIM (eta = online.eta) on DDPM models, flow_sde / dance_sde / cps / ode on flow models
    sampler_config = online.sampler
    if online.window_size is not None and sampler_config.window is not None:
        raise ConfigError("online.window_size slides a window over the steps every round and online.sampler.window fixes "
                          "one: set one of them")
    sampler = build_sampler(sampler_config, stack, online.eta)
    if not is_nft and not sampler.stochastic:
        raise ConfigError(f"method={config.method} needs a stochastic sampler with a log-probability per step; "
                          f"{sampler.spec.describe()} has none: on DDPM models set online.eta > 0, on flow models "
                          "online.sampler.name=flow_sde, dance_sde or cps with noise_level > 0 (method=nft trains on any sampler)")
    if online.share_initial_noise and not sampler.stochastic:
        raise ConfigError(f"online.share_initial_noise=true with {sampler.spec.describe()} gives G identical samples per group: "
                          "use a stochastic sampler (online.eta > 0 on DDPM models, online.sampler.name=flow_sde, dance_sde "
                          "or cps on flow models) or set online.share_initial_noise=false")
    check_frames(config.data, stack)  # video models: clips of data.num_frames frames (Wan: 4k+1); image models: none
    lora = config.finetune == "lora"
    ref_dtype = reference_dtype(config, weight_dtype)
    # the base model for the KL term (none when kl_coef = 0); NFT's v_old: the policy that sampled the round
    base = None
    if objective.kl_coef > 0:
        base = (AdaptersDisabledReference(unet, stack.denoiser) if lora else
                FrozenCopyReference(stack.load_unet(), accelerator.device, ref_dtype, config.reference.offload, stack.denoiser))
    old = None
    if is_nft:
        old = (LoraSnapshotReference(unet, stack.denoiser) if lora else
               FullSnapshotReference(stack.load_unet(), accelerator.device, ref_dtype, config.reference.offload, stack.denoiser))
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    resolution = config.data.resolution or stack.native_resolution
    check_memory(config, stack, resolution, accelerator.device, weight_dtype.itemsize)
    # x_T of one sample: (C, h, w), or (C, F', h, w) for a clip (the family maps frames to latent frames)
    latent_shape = stack.latent_shape(resolution, config.data.num_frames)
    empty_text = stack.encode_prompts([""])
    try:
        prompt_set = [r.prompt for r in load_prompts(PromptSetConfig(
            source=online.prompts, prompt_column=online.prompt_column, category_column="",
            max_prompts=online.max_prompts, subsample_seed=config.seed))]
    except (ValueError, OSError) as error:
        raise ConfigError(one_line(error).replace("prompts.source", "online.prompts")
                          .replace("prompts.max_prompts", "online.max_prompts")) from None
    try:
        rewards = RewardSet.load(online.rewards, online.reward_weights, online.gold_rewards, online.reward_options)
    except ValueError as error:
        raise ConfigError(one_line(error)) from None
    whole_clip = [name for name, head in rewards.heads.items() if head.scores_videos]
    if whole_clip and not stack.is_video:
        raise ConfigError(f"reward {whole_clip[0]!r} scores whole clips (B, F, 3, H, W); {stack.source} is an image model: "
                          "use a video model or an image reward")

    optimizer, lr_schedule, lr = build_optimization(config, params, accelerator)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    if lora:
        register_lora_checkpointing(accelerator, unet)
    ema = make_ema(config, params, accelerator)
    raw_unet = accelerator.unwrap_model(unet)
    policy, sampling_policy = stack.denoiser(unet), stack.denoiser(raw_unet)
    if accelerator.is_main_process:
        accelerator.init_trackers("diffpo", config={"method": config.method, "lr": lr, "kl_coef": objective.kl_coef})

    # ---- resume -------------------------------------------------------------------------------
    state, log = resume(accelerator, run_dir, config.resume_from,
                        {"global_step": 0, "micro_step": 0, "round": 0, "round_step": 0, "guard_round": -1})
    if state.get("num_processes", n_proc) != n_proc:
        raise ConfigError(f"this {config.method} checkpoint was saved by {state['num_processes']} processes: resume it "
                          f"with {state['num_processes']} (each process keeps its share of a round's samples)")
    nonfinite = NonfiniteGuard(accelerator, run_dir, config.on_nonfinite, config.max_nonfinite_skips, state)
    guard = HackingGuard(online.hacking_tolerance, online.hacking_patience)
    guard.load(state)
    tracker = PerPromptStatTracker(online.stat_buffer_size, online.stat_min_count)
    tracked_rounds = 0  # rounds the per-prompt tracker has seen (rebuilt from the round files on resume)

    def conditioning(text: TextEmbeddings) -> dict:
        return stack.family.unet_conditioning(text)

    def unconditional(n: int) -> dict:
        return conditioning(TextEmbeddings(empty_text.hidden.expand(n, -1, -1),
                                           None if empty_text.pooled is None else empty_text.pooled.expand(n, -1)))

    def backward(loss: torch.Tensor, sync: bool) -> None:
        with nullcontext() if sync else accelerator.no_sync(unet):
            accelerator.backward(loss)

    def rescore(denoise, trajectory, steps: torch.Tensor, samples: torch.Tensor, cond: dict, uncond: dict | None):
        """``StepOutput`` (fp32 log-prob (N,), the step's mean and std) of N stored transitions under ``denoise``."""
        return sampler.rescore_step(denoise, trajectory, steps, samples, cond, uncond, online.guidance_scale)

    # ---- rounds -------------------------------------------------------------------------------
    local_g = online.samples_per_prompt // n_proc

    def sample_round(index: int) -> Path:
        """Sample, score and store round ``index``: this process's share of every group, and the
        gathered score tables."""
        shared = step_generator(config.seed + ROUND_SEED_OFFSET, index, 0)  # the same prompts on every process
        picks = torch.randint(0, len(prompt_set), (online.prompts_per_round,), generator=shared).tolist()
        prompts = [prompt_set[i] for i in picks]
        generator = step_generator(config.seed + ROUND_SEED_OFFSET, index, 1 + accelerator.process_index)
        n = len(prompts) * local_g
        if online.share_initial_noise:  # DanceGRPO: drawn from the shared stream, so a group split over processes shares it too
            x_T = torch.randn((len(prompts), *latent_shape), generator=shared).repeat_interleave(local_g, dim=0)
        else:
            x_T = torch.randn((n, *latent_shape), generator=generator)
        x_T = x_T.to(accelerator.device, weight_dtype)
        local_prompts = [p for p in prompts for _ in range(local_g)]
        text = stack.encode_prompts(prompts).select(torch.arange(len(prompts)).repeat_interleave(local_g))
        window = "config"  # the sampler's own (online.sampler.window), or MixGRPO's window of this round
        if online.window_size is not None:
            window = sliding_window(online.num_inference_steps, online.window_size, online.window_stride, index)
        started = time.perf_counter()
        with torch.no_grad(), accelerator.autocast():
            trajectory = sampler.sample(sampling_policy, x_T, conditioning(text), unconditional(n), online.guidance_scale,
                                        online.num_inference_steps, generator, window=window)
        if not is_nft and trajectory.steps.numel() == 0:
            raise ConfigError(f"{sampler.spec.describe()} recorded no step of {online.num_inference_steps}: widen "
                              "online.sampler.window")
        images = stack.decode_latents(trajectory.final)
        sampled = time.perf_counter()
        scores = rewards.score(images, local_prompts)
        scored = time.perf_counter()
        tables = {name: gather_groups(accelerator, s.view(len(prompts), local_g)) for name, s in scores.items()}
        folder = round_files.round_dir(run_dir, index)
        suffix = f"-p{accelerator.process_index}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        stored = {"final": trajectory.final.cpu().clone(), "prompts": local_prompts}
        if not is_nft:  # NFT trains on the clean samples alone
            stored.update(trajectory.state_dict())
        save_state_file(stored, folder / f"samples{suffix}.safetensors")
        if is_nft and accelerator.is_main_process:  # v_old of this round: the policy that sampled it
            from safetensors.torch import save_file

            save_file(policy_snapshot(raw_unet, config.finetune), str(folder / "old_policy.safetensors"))
        extension = "gif" if stack.is_video else "png"  # a clip (F, 3, H, W) as a looping GIF
        if online.save_images:
            from diffpo.eval.generate import to_pil
            from diffpo.eval.video import save_gif

            for j, sample in enumerate(images):
                g, s = divmod(j, local_g)
                name = f"images/g{g:04d}-s{accelerator.process_index * local_g + s}.{extension}"
                if stack.is_video:
                    save_gif(sample, folder / name, fps=4)
                else:
                    to_pil(sample[None])[0].save(folder / name)
        # this process's seconds: sampling (denoiser + VAE decode) and every reward head
        (folder / f"timing{suffix}.json").write_text(json.dumps({"sampling_s": sampled - started, "reward_s": scored - sampled}))
        if accelerator.is_main_process:
            (folder / SCORES_FILE).write_text(json.dumps({k: v.tolist() for k, v in tables.items()}))
            g_all = online.samples_per_prompt
            names = [[f"images/g{g:04d}-s{s}.{extension}" for s in range(g_all)] if online.save_images else []
                     for g in range(len(prompts))]
            round_files.write_manifest(folder, index, prompts, g_all, names)
        accelerator.wait_for_everyone()
        return folder

    def advantages_of(index: int, prompts: list[str], tables: dict[str, torch.Tensor]) -> torch.Tensor:
        """(prompts, G) advantages of round ``index``, before clipping."""
        nonlocal tracked_rounds
        if advantage != "per_prompt":
            return combine({k: tables[k] for k in rewards.weights}, rewards.weights, advantage == "global_std")
        # DDPO: the tracker's state is a function of the rounds before; replay them after a resume
        while tracked_rounds < index:
            past = round_files.round_dir(run_dir, tracked_rounds)
            past_tables = {k: torch.tensor(v) for k, v in json.loads((past / SCORES_FILE).read_text()).items()}
            past_prompts = round_files.read_manifest(past).prompts
            tracker_update(past_prompts, past_tables)
            tracked_rounds += 1
        tracked_rounds += 1
        return tracker_update(prompts, tables)

    def tracker_update(prompts: list[str], tables: dict[str, torch.Tensor]) -> torch.Tensor:
        g = online.samples_per_prompt
        total = sum(w * tables[k] for k, w in rewards.weights.items())  # DDPO: one (weighted) reward, tracked per prompt
        flat = tracker.update([p for p in prompts for _ in range(g)], total.flatten())
        return flat.view(len(prompts), g)

    def load_round(index: int) -> Round:
        folder = round_files.round_dir(run_dir, index)
        stored = load_state_file(folder / f"samples-p{accelerator.process_index}.safetensors")
        manifest = round_files.read_manifest(folder)
        tables = {k: torch.tensor(v) for k, v in json.loads((folder / SCORES_FILE).read_text()).items()}
        full = advantages_of(index, manifest.prompts, tables)
        mine = slice(accelerator.process_index * local_g, (accelerator.process_index + 1) * local_g)
        advantages = full[:, mine].flatten().clamp(-online.adv_clip, online.adv_clip)
        stats = reward_stats(tables)
        timing = folder / f"timing-p{accelerator.process_index}.json"
        if timing.is_file():
            stats.update({f"time/{k}": v for k, v in json.loads(timing.read_text()).items()})
        stats.update({"advantage_mean": float(full.mean()), "advantage_std": float(full.std(correction=0)),
                      "advantage_abs": float(full.abs().mean()),
                      "advantage_clipped": float((full.abs() > online.adv_clip).float().mean()),
                      "round": float(index)})
        if is_nft:
            from safetensors.torch import load_file

            old.load(load_file(str(folder / "old_policy.safetensors")), snapshot_id=("round", index))
            trajectory = None
        else:
            trajectory = SampledTrajectory.from_state_dict(stored, accelerator.device)
        prompts = stored["prompts"]
        text = stack.encode_prompts(prompts)
        count = len(prompts)
        if config.train_batch_size > count:
            raise ConfigError(f"train_batch_size={config.train_batch_size} exceeds the {count} samples a round gives "
                              f"each process (online.prompts_per_round x samples_per_prompt / processes)")
        batches_per_epoch = count // config.train_batch_size
        steps = max(1, batches_per_epoch * online.inner_epochs // config.gradient_accumulation_steps)
        return Round(index, prompts, trajectory, stored["final"].to(accelerator.device), text, advantages, stats, steps,
                     batches_per_epoch)

    def batch_of(current: Round, micro_in_round: int) -> torch.Tensor:
        epoch, position = divmod(micro_in_round, current.batches_per_epoch)
        order = torch.randperm(len(current.prompts), generator=torch.Generator().manual_seed(
            config.seed * 9_973 + current.index * 101 + epoch))
        b = config.train_batch_size
        return order[position * b:(position + 1) * b]

    # ---- GRPO / DDPO micro-step -----------------------------------------------------------------
    def grpo_micro_step(current: Round, micro_in_round: int, generator, scale: float, sync: bool, on_policy: bool) -> dict:
        samples = batch_of(current, micro_in_round)
        steps = trained_steps(current.trajectory.steps, len(samples), online.timestep_fraction, generator)
        text = current.text.select(samples)
        cond, uncond = conditioning(text), unconditional(len(samples))
        totals: dict[str, float] = {}
        deviation = 0.0
        for i in range(steps.shape[0]):
            with accelerator.autocast():
                step = rescore(policy, current.trajectory, steps[i], samples, cond, uncond)
            log_prob = step.log_prob
            kl = None
            if base is not None:
                with torch.no_grad(), accelerator.autocast():
                    ref_mean = rescore(base, current.trajectory, steps[i], samples, cond, uncond).mean
                kl = gaussian_mean_kl(step.mean, ref_mean, step.std)
            old_log_prob = current.trajectory.recorded_log_probs(steps[i], samples).to(log_prob.device)
            if on_policy:
                deviation = max(deviation, float((torch.exp(log_prob.detach() - old_log_prob) - 1).abs().max()))
            loss, metrics = grpo_step_loss(log_prob, old_log_prob, current.advantages[samples], objective.clip_range,
                                           kl, objective.kl_coef)
            loss = loss.mean()
            backward(loss * scale / steps.shape[0], sync and i == steps.shape[0] - 1)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / steps.shape[0]
        if on_policy:  # the round's first update: re-scoring with the sampling weights must give ratio 1
            totals["ratio_deviation"] = deviation
            if sampler_config.on_policy_tolerance is not None:
                check_on_policy(deviation, sampler_config.on_policy_tolerance, current.trajectory.spec, weight_dtype)
        return totals

    # ---- DiffusionNFT micro-step ---------------------------------------------------------------
    def nft_micro_step(current: Round, micro_in_round: int, generator, scale: float, sync: bool) -> dict:
        samples = batch_of(current, micro_in_round)
        x0 = current.final[samples].to(weight_dtype)
        cond = conditioning(current.text.select(samples))
        r = optimality_probability(current.advantages[samples], online.adv_clip)
        draws = max(1, round(online.num_inference_steps * online.timestep_fraction))
        totals: dict[str, float] = {}
        for i in range(draws):
            noise, t = process.draw(x0, generator)
            noisy, target = process.add_noise(x0, noise, t), process.target(x0, noise, t)
            with accelerator.autocast():
                prediction = policy(noisy, t, cond)
                with torch.no_grad():
                    old_prediction = old(noisy, t, cond)
                    ref_prediction = base(noisy, t, cond) if base is not None else None
            loss, metrics = nft_loss(prediction, old_prediction, target, r, objective.nft_beta, ref_prediction,
                                     objective.kl_coef)
            loss = loss.mean()
            backward(loss * scale / draws, sync and i == draws - 1)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / draws
        return totals

    def stop_for_hacking(message: str) -> Path:
        save_checkpoint(accelerator, run_dir, dict(state), config.checkpoints_total_limit)
        export_final(accelerator, unet, stack, config, run_dir, state["global_step"], ema, params)
        if accelerator.is_main_process:
            (run_dir / "stopped.json").write_text(json.dumps({"reason": message, "round": state["round"],
                                                              "step": state["global_step"]}, indent=2))
        accelerator.print(f"stopped: {message}; the weights of step {state['global_step']} are in {run_dir / 'final'}")
        accelerator.end_training()
        return run_dir

    # ---- train --------------------------------------------------------------------------------
    progress = tqdm(total=config.max_steps, initial=state["global_step"], desc=f"train {config.method}",
                    disable=not (accelerator.is_main_process and config.progress_bar))
    current = None
    resumed_round = state["round"] if state["global_step"] else -1
    window: dict[str, float] = {}
    window_count = 0
    while state["global_step"] < config.max_steps:
        while current is None or state["round_step"] >= current.steps:  # (a resume at a round's end moves on)
            if current is not None:
                state["round"], state["round_step"] = state["round"] + 1, 0
            # only the round a checkpoint was saved in is read back: any other is sampled by this run (a
            # resume at a round's end samples the next one again, as the interrupted run did, bit for bit)
            if state["round"] != resumed_round or not (round_files.round_dir(run_dir, state["round"]) /
                                                       round_files.MANIFEST).is_file():
                progress.set_postfix_str(f"sampling round {state['round']}")
                sample_round(state["round"])
            current = load_round(state["round"])
            if state["round"] > state["guard_round"]:  # once per round, also across a resume
                tables = {k: torch.tensor(v) for k, v in json.loads(
                    (round_files.round_dir(run_dir, state["round"]) / SCORES_FILE).read_text()).items()}
                guard_metrics, stop = guard.update(rewards.trained_mean(tables), rewards.gold_mean(tables))
                state.update(guard.state(), guard_round=state["round"])
                current.stats.update(guard_metrics)
                if stop:
                    progress.close()
                    log.write(state["global_step"], {"loss": float("nan"), **current.stats, "hacking_stop": 1.0})
                    return stop_for_hacking(stop)
        metrics_sum: dict[str, float] = {}
        step_started = time.perf_counter()
        accumulation = config.gradient_accumulation_steps
        on_policy = state["round_step"] == 0  # no update yet in this round: the policy is the sampler
        for micro in range(accumulation):
            generator = step_generator(config.seed, state["micro_step"], accelerator.process_index)
            sync = micro == accumulation - 1
            micro_in_round = state["round_step"] * accumulation + micro
            if is_nft:
                metrics = nft_micro_step(current, micro_in_round, generator, 1 / accumulation, sync)
            else:
                metrics = grpo_micro_step(current, micro_in_round, generator, 1 / accumulation, sync, on_policy)
            deviation = metrics.pop("ratio_deviation", None)
            if deviation is not None:  # the round's on-policy check: the worst transition of any process
                worst = accelerator.gather(torch.tensor([deviation], device=accelerator.device)).max()
                current.stats["ratio_deviation"] = max(current.stats.get("ratio_deviation", 0.0), float(worst))
            nonfinite.check_loss(metrics["loss"], state["global_step"] + 1, current.prompts)
            for key, value in metrics.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value / accumulation
            state["micro_step"] += 1
            log.count(config.train_batch_size)
        max_norm = config.optim.max_grad_norm or float("inf")
        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        stepped = nonfinite.step_ok(grad_norm, state["global_step"] + 1, current.prompts)
        if stepped:
            optimizer.step()
        state.update(nonfinite.state())
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        metrics_sum["time/training_step_s"] = time.perf_counter() - step_started
        state["global_step"] += 1
        state["round_step"] += 1
        step = state["global_step"]
        if ema is not None:
            ema.step(params)
        if stepped:
            for key, value in metrics_sum.items():
                window[key] = window.get(key, 0.0) + value
            window_count += 1
        progress.update(1)
        if step % config.log_every == 0 or step == config.max_steps:
            window = window or {"loss": float("nan")}
            keys = sorted(window)
            means = accelerator.reduce(torch.tensor([window[k] / max(window_count, 1) for k in keys],
                                                    device=accelerator.device), reduction="mean")
            values = dict(zip(keys, means.tolist()))
            values.update(current.stats, grad_norm=float(grad_norm), lr=lr_schedule.get_last_lr()[0],
                          skipped_steps=nonfinite.skipped)
            record = log.write(step, values)
            shown = {k: record[k] for k in (f"reward/{next(iter(rewards.weights))}", "kl", "clip_fraction") if k in record}
            progress.set_postfix(loss=f"{record['loss']:.4f}", **{k.split('/')[-1]: f"{v:.3g}" for k, v in shown.items()})
            window, window_count = {}, 0
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            save_checkpoint(accelerator, run_dir, dict(state), config.checkpoints_total_limit)
    progress.close()
    save_checkpoint(accelerator, run_dir, dict(state), config.checkpoints_total_limit)

    # ---- export -------------------------------------------------------------------------------
    export_final(accelerator, unet, stack, config, run_dir, state["global_step"], ema, params)
    accelerator.end_training()
    return run_dir
