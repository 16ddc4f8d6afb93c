"""Typed, strict configuration: one documented dataclass per component is the Python API, the YAML
schema and the CLI (``key=value`` overrides with dotted paths).

Unknown keys fail with the nearest valid key; values are checked against their annotated types and
``Literal`` choices; relations between fields are checked in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffpo.ranges import check_range


class ConfigError(ValueError):
    """A configuration problem; its message names the key and what to do."""


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which diffusion stack to load and how."""

    pretrained: str = "tiny"  # hub id, local diffusers folder, or "tiny" (the bundled model)
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the scheduler's own
    vae: str | None = None  # a separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)
    motion_adapter: str | None = None  # AnimateDiff: a MotionAdapter (hub id or folder) added to an SD1.x model's UNet
    # flow-matching models (SD3/SD3.5, FLUX.1): how sigma is drawn per pair (Esser et al. 2024, Sec. 3.1)
    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0  # logit_normal: sigma = sigmoid(N(logit_mean, logit_std)) before the shift
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode: the heavy-tail scale
    flow_shift: float | None = None  # the static timestep shift (None: the scheduler config's, 3.0 for SD3)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"  # per-sample error weight by sigma
    guidance: float | None = None  # guidance-distilled flow models (FLUX.1-dev): the embedded guidance value (None: 3.5)
    max_sequence_length: int | None = None  # T5 tokens per prompt (None: the family's, 256 SD3 / 512 FLUX)

    def flow_sampling(self):
        """The ``FlowSampling`` these fields describe, or None when all are at their defaults (a DDPM
        model then loads; a DDPM model given any of them is an error naming them)."""
        from diffpo.kernel.noise_process import FlowSampling

        sampling = FlowSampling(self.timestep_sampling, self.logit_mean, self.logit_std, self.mode_scale,
                                self.loss_weighting, self.flow_shift)
        return None if sampling == FlowSampling() else sampling

    def __post_init__(self):
        if self.logit_std <= 0:
            raise ConfigError(f"model.logit_std={self.logit_std} must be > 0")
        if self.flow_shift is not None and self.flow_shift <= 0:
            raise ConfigError(f"model.flow_shift={self.flow_shift} must be > 0 (1.0: no shift)")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ConfigError(f"model.max_sequence_length={self.max_sequence_length} must be >= 1")


@dataclass
class LoraConfig:
    """LoRA on the UNet through peft (used when ``finetune: lora``)."""

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    # null: the family's attention projections (UNets: to_q, to_k, to_v, to_out.0; SD3 / FLUX add the
    # joint attention's context projections add_q_proj, add_k_proj, add_v_proj, to_add_out)
    target_modules: list[str] | None = None
    part: Literal["both", "spatial", "motion"] = "both"  # video UNets: spatial layers, motion modules, or both

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must lie in [0, 1)")


@dataclass
class ReferenceConfig:
    """The frozen reference policy for full fine-tuning (LoRA uses adapters-disabled instead)."""

    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: the mixed-precision dtype
    offload: bool = False  # keep its weights on the CPU, streamed to the device per forward


@dataclass
class EmaConfig:
    """Exponential moving average of the trained weights, exported instead of the raw ones."""

    enabled: bool = False
    decay: float = 0.9999

    def __post_init__(self):
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"ema.decay={self.decay} must lie in (0, 1)")


@dataclass
class DataConfig:
    """Preference pairs: Pick-a-Pic-format parquet, a JSONL manifest or a ``datasets`` id."""

    source: str = ""  # parquet file / folder / glob, a .jsonl manifest, or a datasets hub id
    format: Literal["auto", "parquet", "jsonl", "hub"] = "auto"
    split: str = "train"
    image_0_column: str = "jpg_0"
    image_1_column: str = "jpg_1"
    label_column: str = "label_0"  # 1: image_0 preferred, 0: image_1 preferred, 0.5: tie
    caption_column: str = "caption"
    keep_ties: bool = False
    max_pairs: int | None = None
    resolution: int | None = None  # None: the model's native resolution
    crop: Literal["center", "random"] = "center"
    flip: Literal["none", "joint", "independent"] = "none"  # horizontal flip of a pair's images
    prompt_dropout: float = 0.0  # probability of training a pair on the empty prompt
    num_workers: int = 0
    score_columns: list[str] | None = None  # reward scores of image 0 and image 1 (SmPO, MADPO), e.g. [pickscore_0, pickscore_1]
    curriculum_stages: int = 0  # Curry-DPO: first pass easy -> hard by score margin in this many stages (0: off)
    feedback_column: str | None = None  # Diffusion-KTO on unpaired data: one image per row, this column 1 (desirable) / 0
    allow_empty_captions: bool = False  # true: an empty caption is an unconditional sample, not a bad one
    skip_bad_samples: bool = True  # corrupt images / empty or non-UTF-8 captions: skipped, counted, listed in RUN_DIR/bad_samples.jsonl (false: fatal)
    num_frames: int | None = None  # video data: frames per clip (needed by video models; None: images)
    frame_stride: int = 1  # video data: keep every frame_stride-th frame of a clip, from the first

    def __post_init__(self):
        if self.num_frames is not None and self.num_frames < 1:
            raise ConfigError(f"data.num_frames={self.num_frames} must be >= 1 (or null for image data)")
        if self.frame_stride < 1:
            raise ConfigError(f"data.frame_stride={self.frame_stride} must be >= 1")
        if self.curriculum_stages < 0:
            raise ConfigError(f"data.curriculum_stages={self.curriculum_stages} must be >= 0 (0 turns the curriculum off)")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ConfigError(f"data.prompt_dropout={self.prompt_dropout} must lie in [0, 1]")
        if self.resolution is not None and self.resolution <= 0:
            raise ConfigError(f"data.resolution={self.resolution} must be positive")


@dataclass
class CacheConfig:
    """Precomputed VAE latent distributions and text embeddings (``diffpo cache``)."""

    enabled: bool = False
    dir: str = ".cache/diffpo"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # text embeddings: auto = the family's choice (bf16 for SD3 / FLUX, whose T5 states are 4096 wide), else dtype
    text_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    shard_size: int = 1024  # pairs per safetensors shard


REFERENCE_FREE_OBJECTIVES = ("simpo",)  # objective names the offline loop runs without any reference forward


@dataclass
class ObjectiveConfig:
    """Hyperparameters of the preference objective (variants: docs/objective_variants.md)."""

    beta: float = 5000.0  # DESIGN.md convention: loss = -log sigmoid(-beta/2 (dtheta - dref)); D3PO: 0.1 on log-ratios
    # method=diffusion_dpo's loss: dpo (Eq. 14), hinge, ipo, robust_dpo, cdpo, madpo, simpo (reference-free), kto
    name: Literal["dpo", "hinge", "ipo", "robust_dpo", "cdpo", "madpo", "simpo", "kto"] = "dpo"
    epsilon: float = 0.1  # robust_dpo / cdpo: the assumed label-flip rate, in [0, 0.5)
    madpo_scale: float = 1.0  # madpo: reward-margin unit of w = clip(2 sigmoid(-(s_w - s_l)/scale), min, max)
    madpo_weight_min: float = 0.0
    madpo_weight_max: float = 2.0
    gamma_margin: float = 0.0  # simpo: target margin gamma in logit units
    clip_range: float = 0.1  # D3PO: per-step likelihood ratios clamped to [1 - clip_range, 1 + clip_range]
    gamma: float = 10.0  # SmPO: the official scale on the soft-label logit
    score_low: float = 0.11543526500463486  # SmPO: min-max normalisation of data.score_columns (official PickScore)
    score_high: float = 0.28201571106910706
    # SmPO: ReNoise steps from x_0 to the training timestep (SD1.5: 5, SDXL: 10); 0: no inversion, x_t from
    # the forward process with the pair's shared noise (SmPO's smoothed labels alone, an ablation)
    inversion_steps: int = 5
    # SmPO: per_sample lands x~ on each training timestep; shared is the official code's one coarse grid
    inversion_grid: Literal["per_sample", "shared"] = "per_sample"
    # SmPO: which model inverts x_0 (policy: the official code, a target that moves with training;
    # reference: a fixed trajectory, docs/methods.md "SmPO's fragility")
    inversion_model: Literal["policy", "reference"] = "policy"
    # SePPO: the anchor-based adaptive flip (AAF); false: the pool reference's sample is always the loser
    # (the paper's ablation without AAF)
    adaptive_flip: bool = True
    margin: float = 0.001  # Diffusion-DRO: the hinge margin m
    kl_coef: float = 0.04  # GRPO / DDPO / NFT: weight of the KL to the base model (Flow-GRPO: 0.04; 0: no reference forward)
    nft_beta: float = 1.0  # DiffusionNFT: the trust region b of v+ = (1 - b) v_old + b v_theta (official: 1.0 or 0.1)

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"objective.beta={self.beta} must be > 0")
        if not 0.0 <= self.epsilon < 0.5:
            raise ConfigError(f"objective.epsilon={self.epsilon} must lie in [0, 0.5): it is the assumed label-flip rate")
        if self.madpo_scale <= 0:
            raise ConfigError(f"objective.madpo_scale={self.madpo_scale} must be > 0: it is the reward margin unit")
        if not 0.0 <= self.madpo_weight_min <= self.madpo_weight_max:
            raise ConfigError(f"objective.madpo_weight_min={self.madpo_weight_min} and madpo_weight_max="
                              f"{self.madpo_weight_max} need 0 <= min <= max: weights are never negative")
        if not 0.0 < self.clip_range < 1.0:
            raise ConfigError(f"objective.clip_range={self.clip_range} must lie in (0, 1)")
        if self.margin < 0:
            raise ConfigError(f"objective.margin={self.margin} must be >= 0")
        if self.kl_coef < 0:
            raise ConfigError(f"objective.kl_coef={self.kl_coef} must be >= 0 (0: no KL term)")
        if self.nft_beta <= 0:
            raise ConfigError(f"objective.nft_beta={self.nft_beta} must be > 0")

    @property
    def reference_free(self) -> bool:
        """True when the objective never reads reference errors: no reference is built or run."""
        return self.name in REFERENCE_FREE_OBJECTIVES


@dataclass
class SamplerConfig:
    """The online sampler (``diffpo.kernel.samplers``): a name and its parameters. It must fit the
    model's noise process: ``ddim`` on DDPM models; ``flow_sde`` (Flow-GRPO), ``dance_sde``
    (DanceGRPO), ``cps`` (coefficients-preserving) or ``ode`` (Euler, no log-probabilities) on
    flow models; ``auto`` picks ddim / flow_sde."""

    name: Literal["auto", "ddim", "flow_sde", "dance_sde", "cps", "ode"] = "auto"
    noise_level: float | None = None  # ddim: eta (null: online.eta); flow_sde: a (0.7); dance_sde: eta (0.3); cps: eta (0.8)
    window: list[int] | None = None  # [start, end): only these steps are stochastic and recorded, the rest ODE (null: all)
    on_policy_tolerance: float | None = None  # D3PO: stop when re-scoring a round with the sampling weights gives max |ratio - 1| above this (null: log it only)

    def __post_init__(self):
        if self.window is not None:
            if len(self.window) != 2 or not 0 <= self.window[0] < self.window[1]:
                raise ConfigError(f"online.sampler.window={self.window} must be [start, end) step indices with "
                                  "0 <= start < end (or null for every step)")
        if self.name == "cps" and self.noise_level is not None and self.noise_level > 1:
            raise ConfigError(f"online.sampler.noise_level={self.noise_level}: cps takes eta in (0, 1] "
                              "(s = sigma_next sin(eta pi / 2))")


@dataclass
class OnlineConfig:
    """Sampling while training (D3PO, SePPO, Diffusion-DRO): prompts, the sampler, where preferences
    come from, SePPO's checkpoint pool and Diffusion-DRO's replay buffer and lagged copy."""

    prompts: str = "shapes"  # D3PO prompts: shapes, partiprompts, a .txt/.tsv/.csv/.jsonl file or a datasets id
    prompt_column: str | None = None  # None: Prompt (tsv/csv), prompt (jsonl), caption (hub)
    max_prompts: int | None = None  # a fixed random subset of the prompt set
    prompts_per_round: int = 8  # D3PO: prompts sampled per round (per process)
    samples_per_prompt: int = 2  # D3PO: images per prompt sharing x_T; all pairs between them
    inner_epochs: int = 1  # D3PO: passes over a round's pairs before sampling the next round
    timestep_fraction: float = 1.0  # D3PO: share of a trajectory's denoising steps trained (shuffled per pair)
    num_inference_steps: int = 20
    eta: float = 1.0  # DDIM eta of the sampler (1.0: DDPM posterior variance)
    guidance_scale: float = 5.0
    preference: Literal["reward", "human"] = "reward"  # D3PO: reward heads, or labels from `diffpo label`
    rewards: list[str] = field(default_factory=lambda: ["jpeg-compressibility"])  # several: Pareto dominance
    reward_options: dict = field(default_factory=dict)  # per head, e.g. {pickscore: {path: ..., device: cuda}}
    min_margin: float = 0.0  # a head prefers one sample only when it leads by more than this
    require_all_labels: bool = True  # human: train a round only once every pair is labelled
    reference: Literal["base", "previous_round"] = "base"  # D3PO reference (previous_round: human-feedback rounds)
    pool_every: int = 10  # SePPO: add the policy to the reference pool every K optimizer steps
    pool_strategy: Literal["uniform", "first", "latest"] = "uniform"
    save_images: bool = True  # write every round's samples to RUN_DIR/rounds/ (always on for human labels)
    replay_size: int = 4  # DRO: trajectories the replay buffer keeps (per process)
    replay_batch_size: int | None = None  # DRO: trajectories the lagged copy adds per refill (None: train_batch_size)
    replay_every: int = 1  # DRO: micro-steps between refills
    lagged_sync_every: int = 1  # DRO: optimizer steps between copies of the policy into the lagged sampler
    jitter_timesteps: bool = True  # DRO: each trajectory's solver grid shifted by its own offset
    # DRO: the negative's stored target when the lagged copy samples with guidance: its conditional
    # prediction (what the policy is trained to output), or the guided one that stepped the solver
    negative_target: Literal["conditional", "guided"] = "conditional"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # D3PO / SePPO sampler (DRO on flow models: its ODE steps)
    # GRPO / DDPO / NFT (diffpo/trainers/grpo.py): samples_per_prompt is the group size G
    reward_weights: list[float] | None = None  # per online.rewards entry (None: 1 each); A = sum_k w_k * groupnorm(r_k)
    gold_rewards: list[str] = field(default_factory=list)  # held-out rewards: scored and logged every round, never trained on
    hacking_patience: int = 0  # stop after this many rounds in a row of gold falling while the trained reward rises (0: only log)
    hacking_tolerance: float = 0.0  # how far (in gold units) the gold mean may fall below its best before a round counts
    # group std, the round's global std, or DDPO's per-prompt tracker (null: per_prompt for method=ddpo, else group)
    advantage: Literal["group", "global_std", "per_prompt"] | None = None
    stat_buffer_size: int = 32  # advantage=per_prompt: rewards kept per prompt
    stat_min_count: int = 16  # advantage=per_prompt: fewer kept rewards use the round's mean and std
    adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip] (NFT: r = clip(A) / (2 adv_clip) + 1/2)
    window_size: int | None = None  # MixGRPO: only this many consecutive steps are stochastic (and trained), the rest ODE (null: off)
    window_stride: int = 1  # window_size: the window moves this many steps per round (wrapping around)
    share_initial_noise: bool = False  # DanceGRPO: a group's G samples share x_T and differ only by the sampler's noise

    def __post_init__(self):
        for name in ("prompts_per_round", "inner_epochs", "num_inference_steps", "pool_every", "replay_size",
                     "replay_every", "lagged_sync_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"online.{name}={getattr(self, name)} must be >= 1")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"online.samples_per_prompt={self.samples_per_prompt} must be >= 2 to form pairs")
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"online.window_size={self.window_size} must be >= 1 (or null: every step stochastic)")
        for name in ("window_stride", "stat_buffer_size", "stat_min_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"online.{name}={getattr(self, name)} must be >= 1")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"online.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} "
                              "online.rewards: give one weight per reward (or null: 1 each)")
        if self.reward_weights is not None and not all(math.isfinite(w) for w in self.reward_weights):
            raise ConfigError(f"online.reward_weights={self.reward_weights} must be finite numbers")
        overlap = sorted(set(self.rewards) & set(self.gold_rewards))
        if overlap:
            raise ConfigError(f"online.gold_rewards holds {overlap[0]!r}, which online.rewards trains on: a gold reward "
                              "is one the run never trains on")
        if self.replay_batch_size is not None and self.replay_batch_size < 1:
            raise ConfigError(f"online.replay_batch_size={self.replay_batch_size} must be >= 1 (or null)")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ConfigError(f"online.timestep_fraction={self.timestep_fraction} must lie in (0, 1]")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"online.eta={self.eta} must lie in [0, 1]")
        if self.preference == "reward" and not self.rewards:
            raise ConfigError("online.rewards is empty: name at least one reward head (see diffpo.rewards.REWARDS)")
        if self.preference == "reward":
            from diffpo.rewards import REWARDS

            for name in [*self.rewards, *self.gold_rewards]:
                if name not in REWARDS:
                    raise ConfigError(f"online.rewards: reward {name!r} is unknown{_suggest(name, REWARDS)}")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    lr: float = 1e-5
    scale_lr: bool = False  # lr x (pairs per device x accumulation x processes), as Diffusion-DPO
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    warmup_steps: int = 0

    def __post_init__(self):
        if self.lr < 0:
            raise ConfigError(f"optim.lr={self.lr} must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class TrainConfig:
    """A whole training run: ``diffpo train CONFIG [key=value ...]``."""

    method: str = "diffusion_dpo"  # a name in diffpo.objectives.METHODS
    output_dir: str = "runs/diffpo"
    seed: int = 0
    finetune: Literal["lora", "full"] = "lora"
    max_steps: int = 100  # optimizer steps
    train_batch_size: int = 8  # pairs per device per micro-step
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet's forward (policy and adapters-disabled reference)
    check_memory: bool = True  # refuse a resolution x batch whose activations cannot fit the device (diffpo/memory.py); false: try anyway
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end
    checkpoints_total_limit: int | None = 3
    resume_from: str | None = None  # "latest" or a checkpoint folder
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop naming step, captions, last checkpoint; or skip that optimizer step
    max_nonfinite_skips: int = 10  # on_nonfinite=skip: this many skipped steps in a row stop the run
    report_to: Literal["none", "tensorboard", "wandb", "all"] = "none"
    progress_bar: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: name a folder for the run (e.g. output_dir=runs/dpo)")
        for name in ("max_steps", "train_batch_size", "gradient_accumulation_steps", "log_every", "max_nonfinite_skips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.cache.enabled and self.data.crop == "random":
            raise ConfigError(
                "cache.enabled=true stores one crop per image: set data.crop=center or cache.enabled=false"
            )
        from diffpo.objectives import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown{_suggest(self.method, METHODS)}")
        name = self.objective.name
        if name != "dpo" and self.method != "diffusion_dpo":
            raise ConfigError(f"objective.name={name} is a loss of method=diffusion_dpo: set method=diffusion_dpo "
                              "or objective.name=dpo")
        if name == "madpo" and self.data.score_columns is None:
            raise ConfigError("objective.name=madpo weights pairs by a reward margin: set data.score_columns "
                              "(e.g. [reward_0, reward_1])")
        if name == "madpo" and self.cache.enabled:
            raise ConfigError("objective.name=madpo reads reward scores with every pair: set cache.enabled=false")
        if self.data.feedback_column is not None:
            if name != "kto":
                raise ConfigError(f"data.feedback_column={self.data.feedback_column} is per-image (unpaired) feedback: "
                                  "train it with objective.name=kto")
            if self.cache.enabled or self.data.curriculum_stages:
                raise ConfigError("data.feedback_column (unpaired images) has no pairs to cache or order: set "
                                  "cache.enabled=false and data.curriculum_stages=0")
        if self.data.curriculum_stages:
            if self.data.score_columns is None:
                raise ConfigError(f"data.curriculum_stages={self.data.curriculum_stages} orders pairs by reward "
                                  "margin: set data.score_columns (e.g. [reward_0, reward_1])")
            if METHODS[self.method].loop != "offline_pairs":
                raise ConfigError(f"data.curriculum_stages orders offline pairs; method={self.method} samples "
                                  "online: set data.curriculum_stages=0")


# --------------------------------------------------------------------------------------------
# Parsing: dict -> dataclass, strictly
# --------------------------------------------------------------------------------------------


# names other trainers use for a diffpo key: suggested when spelling alone does not find it
ALIASES = {"learning_rate": "lr", "batch_size": "train_batch_size", "per_device_train_batch_size": "train_batch_size",
           "max_train_steps": "max_steps", "num_train_steps": "max_steps", "steps": "max_steps",
           "gradient_accumulation": "gradient_accumulation_steps", "pretrained_model_name_or_path": "pretrained",
           "dataset": "source", "dataset_name": "source", "beta_dpo": "beta", "output": "output_dir"}


def _suggest(name: str, options) -> str:
    if ALIASES.get(name) in options:
        return f"; did you mean {ALIASES[name]!r}?"
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    listed = ", ".join(sorted(options))
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {listed}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: None is not allowed")
    if origin is Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in args:  # YAML reads a bare no / yes as a bool
            value = "yes" if value else "no"
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(hint, type) and isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
        problem = check_range(cls, key, f"{prefix}{key}", kwargs[key])  # diffpo.ranges.RANGES
        if problem:
            raise ConfigError(problem)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def to_dict(config) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-5)")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
            node = child
        node[leaf] = value
    return data


def find_config(path: str | Path) -> Path:
    """``path`` as given when it is a file; otherwise the shipped config of that name
    (``configs/diffusion_dpo/sd15.yaml`` or ``diffusion_dpo/sd15.yaml``), so that the README's
    commands work for an installed wheel from any folder."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    from diffpo.resources import configs_dir

    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = configs_dir().joinpath(*parts) if parts else None
    return shipped if shipped is not None and shipped.is_file() else path


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}): keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


MAX_CONFIG_BYTES = 16 << 20  # a config is a few kB; a larger "YAML" file is some other file


def read_yaml(path: str | Path) -> dict:
    path = find_config(path)
    shipped = "shipped ones: diffpo/configs/, e.g. configs/diffusion_dpo/tiny.yaml"
    if path.is_dir():
        inside = path / "config.yaml"
        hint = f"pass {str(inside)!r} (the run's config)" if inside.is_file() else f"pass a YAML file ({shipped})"
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file: {hint}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"config file {str(path)!r} is not a regular file (a device, pipe or socket): pass a YAML "
                          f"file ({shipped})")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass a YAML file ({shipped})")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(path)!r} holds {size} bytes, not a YAML config (at most "
                              f"{MAX_CONFIG_BYTES} bytes): pass the config file")
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({error.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not a text YAML file (byte 0x{raw[error.start]:02x} at "
                          f"position {error.start} is not UTF-8): pass the YAML config, not a binary file") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error.__class__.__name__}); fix the syntax") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def load_config(cls, path: str | Path | None = None, overrides: list[str] = ()):
    """Read YAML ``path`` (optional), apply ``key=value`` overrides, build ``cls`` strictly."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


# config keys that name local files or folders (hub ids and "tiny" stay as they are)
PATH_KEYS = ("output_dir", "resume_from", "model.pretrained", "model.vae", "model.motion_adapter", "data.source",
             "cache.dir", "online.prompts")
ALWAYS_LOCAL = ("output_dir", "cache.dir")  # folders diffpo creates: absolute even before they exist


def absolute_paths(config):
    """``config`` with every local path of ``PATH_KEYS`` made absolute (globs too), so that the
    ``config.yaml`` a run writes reruns from any working directory. A value that names nothing
    on disk (a hub id, ``tiny``, ``latest``, ``shapes``) is kept as written."""
    import glob
    import os

    def resolve(node, dotted: str):
        head, _, rest = dotted.partition(".")
        if not dataclasses.is_dataclass(node) or not hasattr(node, head):
            return node
        value = getattr(node, head)
        if rest:
            return dataclasses.replace(node, **{head: resolve(value, rest)})
        if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
            return node
        expanded = os.path.expanduser(value)
        if dotted in ALWAYS_LOCAL or os.path.exists(expanded) or glob.glob(expanded):
            return dataclasses.replace(node, **{head: os.path.abspath(expanded)})
        return node

    for key in PATH_KEYS:
        config = resolve(config, key)
    return config


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
