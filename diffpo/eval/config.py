"""``diffpo eval`` configuration: the models compared, the prompt set, sampling, reward heads and
the report, as strict dataclasses (the YAML schema of ``configs/eval/``; see ``diffpo.config``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from diffpo.config import ConfigError, _suggest

SCHEDULERS = ("auto", "ddim", "ddpm", "pndm", "euler", "euler-ancestral", "heun", "lms", "dpm++", "dpm++-karras",
              "unipc", "flow-euler")
MAX_IMAGES_PER_PROMPT = 1000  # seeds are seed * 10^7 + prompt_index * 1000 + image_index


@dataclass
class SamplingConfig:
    """How every model samples (an entry of ``models`` may override any field)."""

    # auto (the model's: ddim for UNets, flow-euler for SD3 / FLUX), ddim, ddpm, pndm, euler, euler-ancestral,
    # heun, lms, dpm++, dpm++-karras, unipc, flow-euler
    scheduler: str = "auto"
    steps: int = 25
    guidance_scale: float = 5.0
    eta: float = 0.0  # DDIM/DDPM step noise; its draws come from the same per-image seed
    resolution: int | None = None  # None: the model's native resolution
    images_per_prompt: int = 2
    batch_size: int = 8
    num_frames: int = 16  # video models: frames per clip (image models ignore it)

    def __post_init__(self):
        if self.num_frames < 1:
            raise ConfigError(f"sampling.num_frames={self.num_frames} must be >= 1")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"sampling.scheduler={self.scheduler!r} is unknown{_suggest(self.scheduler, SCHEDULERS)}")
        for name in ("steps", "images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sampling.{name}={getattr(self, name)} must be >= 1")
        if self.images_per_prompt > MAX_IMAGES_PER_PROMPT:
            raise ConfigError(f"sampling.images_per_prompt={self.images_per_prompt} must be <= {MAX_IMAGES_PER_PROMPT}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ConfigError(f"sampling.resolution={self.resolution} must be a positive multiple of 8")
        if self.eta < 0:
            raise ConfigError(f"sampling.eta={self.eta} must be >= 0")


@dataclass
class SamplingOverride:
    """Per-model changes to ``sampling``; unset fields (null) keep the shared value."""

    scheduler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    resolution: int | None = None
    batch_size: int | None = None
    # images_per_prompt is not overridable: win rates pair the models' images one to one


@dataclass
class EvalModelConfig:
    """One model compared; the first entry of ``models`` is the baseline."""

    name: str = ""  # display name in tables and folder name (letters, digits, . _ - + and spaces)
    pretrained: str = "tiny"  # hub id, local diffusers folder, or "tiny"; ignored when run_dir names base_model
    revision: str | None = None
    variant: str | None = None
    lora: str | None = None  # folder (or file) holding pytorch_lora_weights.safetensors
    lora_scale: float = 1.0
    unet: str | None = None  # a full fine-tuned UNet: local folder or hub id (e.g. a Diffusion-DPO checkpoint)
    unet_subfolder: str | None = "unet"  # subfolder of ``unet`` on the hub; local folders are detected
    run_dir: str | None = None  # a diffpo run: final/ holds a LoRA or unet/, final/diffpo.json names base_model
    sampling: SamplingOverride = field(default_factory=SamplingOverride)

    def __post_init__(self):
        if not self.name.strip():
            raise ConfigError("every entry of models needs a name (its display name), e.g. name: base")
        if not re.fullmatch(r"[\w.+\- ]+", self.name):
            raise ConfigError(f"models name {self.name!r} may hold only letters, digits, spaces and . _ - +")
        if sum(x is not None for x in (self.lora, self.unet, self.run_dir)) > 1:
            raise ConfigError(f"model {self.name!r}: set at most one of lora, unet, run_dir")


@dataclass
class PromptSetConfig:
    """The prompt set: bundled ``partiprompts`` or ``shapes``, a .txt/.tsv/.csv/.jsonl file, or a
    ``datasets`` hub id (with ``split`` and ``prompt_column``)."""

    source: str = "shapes"
    format: Literal["auto", "partiprompts", "shapes", "txt", "tsv", "csv", "jsonl", "hub"] = "auto"
    prompt_column: str | None = None  # None: Prompt (tsv/csv), prompt (jsonl), caption (hub)
    category_column: str | None = None  # None: Category (tsv/csv), category (jsonl), none (hub); "" for none
    split: str = "test"  # hub datasets only (Pick-a-Pic: validation_unique)
    categories: list[str] | None = None  # keep only these categories
    max_prompts: int | None = None  # random subsample of this many prompts, in their original order
    subsample_seed: int = 0

    def __post_init__(self):
        if not self.source:
            raise ConfigError("prompts.source is empty: use partiprompts, shapes, a prompt file or a datasets id")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"prompts.max_prompts={self.max_prompts} must be >= 1 (or null: all)")


@dataclass
class RewardConfig:
    """One reward head of ``diffpo.rewards.REWARDS`` with its weights and options."""

    name: str = ""
    label: str | None = None  # column name in tables (default: name); lets one head appear twice
    path: str | None = None
    arch: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {raw: true, batch_size: 32, frame_stride: 2}

    def __post_init__(self):
        from diffpo.rewards import REWARDS

        if self.name not in REWARDS:
            raise ConfigError(f"reward {self.name!r} is unknown{_suggest(self.name, REWARDS)}")

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class ReportConfig:
    """Statistics and what the HTML report shows."""

    confidence: float = 0.95
    bootstrap_resamples: int = 2000
    bootstrap_unit: Literal["prompt", "sample"] = "prompt"  # resample prompts (images of a prompt are correlated)
    tie_tolerance: float = 0.0  # |candidate - baseline| <= this counts as a tie (half a win)
    primary_reward: str | None = None  # the head ranking gains/losses (default: the first)
    grid_prompts: int = 8
    top_k: int = 5  # prompts with the largest gains and losses shown per model
    histogram_bins: int = 30
    consistency_reward: str | None = None  # videos: an open_clip head (clip/hps) embedding frames; default the first
    # videos: what embeds frames for temporal consistency. auto: consistency_reward or the first open_clip head
    # (none: no consistency); clip: that head, else a CLIP image encoder of its own (consistency_clip_arch /
    # consistency_clip_path, the clip head's defaults when null); pixels: centred pixels (offline, no weights);
    # none: no consistency
    consistency_embedding: Literal["auto", "clip", "pixels", "none"] = "auto"
    consistency_clip_arch: str | None = None  # open_clip architecture of the own CLIP encoder (null: ViT-H-14)
    consistency_clip_path: str | None = None  # its weights: a file or an open_clip pretrained tag (null: laion2b)
    per_frame_rewards: bool = True  # videos: image heads also score each frame position (scores.jsonl, a figure)
    gif_fps: int = 8
    thumbnail_size: int = 128  # displayed pixels per image (small images are upscaled, pixelated)

    def __post_init__(self):
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"report.confidence={self.confidence} must lie in [0.5, 1)")
        if self.bootstrap_resamples < 100:
            raise ConfigError(f"report.bootstrap_resamples={self.bootstrap_resamples} must be >= 100")
        if self.tie_tolerance < 0:
            raise ConfigError(f"report.tie_tolerance={self.tie_tolerance} must be >= 0")
        for name in ("grid_prompts", "top_k", "histogram_bins", "gif_fps", "thumbnail_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"report.{name}={getattr(self, name)} must be >= 1")


@dataclass
class EvalConfig:
    """A whole evaluation: ``diffpo eval CONFIG [key=value ...]``."""

    output_dir: str = "runs/eval"
    seed: int = 0  # image seeds: seed * 10^7 + prompt_index * 1000 + image_index
    device: str = "cpu"  # e.g. cuda, cuda:1, mps: generation and learned reward heads
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    progress_bar: bool = True
    check_memory: bool = True  # refuse a resolution x batch whose images cannot fit in memory (diffpo/memory.py)
    models: list[EvalModelConfig] = field(default_factory=list)
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: name a folder for the report (e.g. output_dir=runs/eval)")
        if not self.models:
            raise ConfigError("models is empty: list at least one model (the first is the baseline)")
        names = [m.name for m in self.models]
        slugs = [slug(n) for n in names]
        if len(set(slugs)) != len(slugs):
            raise ConfigError(f"model names must be distinct (case and spaces aside), got {names}")
        if not self.rewards:
            raise ConfigError("rewards is empty: list at least one head, e.g. - name: clip")
        keys = [r.key for r in self.rewards]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"reward labels must be distinct, got {keys}: give repeated heads a label")
        if self.report.consistency_embedding in ("pixels", "none") and self.report.consistency_reward is not None:
            raise ConfigError(f"report.consistency_reward={self.report.consistency_reward!r} names a head to embed frames "
                              f"with, but report.consistency_embedding={self.report.consistency_embedding}: drop one")
        for option in ("primary_reward", "consistency_reward"):
            value = getattr(self.report, option)
            if value is not None and value not in keys:
                raise ConfigError(f"report.{option}={value!r} is not a configured reward{_suggest(value, keys)}")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")
        for model in self.models:
            sampling_for(self, model)  # a bad override fails now, naming its model

    @property
    def primary_reward(self) -> str:
        return self.report.primary_reward or self.rewards[0].key


def sampling_for(config: EvalConfig, model: EvalModelConfig) -> SamplingConfig:
    """The shared sampling settings with ``model``'s overrides applied (and checked)."""
    changes = {k: v for k, v in dataclasses.asdict(model.sampling).items() if v is not None}
    try:
        return dataclasses.replace(config.sampling, **changes)
    except ConfigError as error:
        raise ConfigError(f"model {model.name!r}: {error}".replace("sampling.", "sampling override ")) from None


def slug(name: str) -> str:
    """A folder name for a display name."""
    return re.sub(r"[^\w.+-]+", "_", name.strip()).lower()


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``diffpo.config.apply_overrides`` plus list positions: ``models.1.lora=DIR`` sets the second
    model's LoRA, ``rewards.2.name=clip`` (one past the end) appends an entry."""
    import yaml

    from diffpo.config import apply_overrides as apply_dict_overrides

    for item in overrides:
        dotted, sep, raw = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or not any(p.isdigit() for p in parts):
            apply_dict_overrides(data, [item])
            continue
        node = data
        for depth, part in enumerate(parts):
            leaf = depth == len(parts) - 1
            value = (yaml.safe_load(raw) if raw.strip() else "") if leaf else {}
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:depth]) or 'config'} is a list of "
                                      f"{len(node)}; use an index 0..{len(node)}")
                if int(part) == len(node):
                    node.append(value)
                elif leaf:
                    node[int(part)] = value
                node = node[int(part)]
            elif isinstance(node, dict):
                if leaf:
                    node[part] = value
                else:
                    node = node.setdefault(part, [] if parts[depth + 1].isdigit() else {})
            else:
                raise ConfigError(f"override {dotted!r}: '{parts[depth - 1]}' is not a section or a list")
    return data


def load_eval_config(path=None, overrides: list[str] = ()) -> EvalConfig:
    """Read YAML ``path`` (optional), apply overrides (with list positions), build strictly."""
    from diffpo.config import from_dict, read_yaml

    data = read_yaml(path) if path else {}
    return from_dict(EvalConfig, apply_overrides(data, list(overrides)))
