"""Configs of the prompt pipeline (Sem-DPO rewriter): strict dataclasses like diffpo.config, so
each is the Python API, the YAML schema and the ``key=value`` CLI at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffpo.config import ConfigError, LoraConfig, OptimConfig
from diffpo.prompt.lm import DEFAULT_REWRITER, RewriteTemplate

_DEFAULT_TEMPLATE = RewriteTemplate()


@dataclass
class RewriterConfig:
    """The rewriter LM, how prompts are put to it, and how rewrites are sampled."""

    model: str = DEFAULT_REWRITER  # "smollm2", "tiny", a hub id, a local/GGUF folder or a prompt-train final/
    instruction: str = _DEFAULT_TEMPLATE.instruction  # must contain {prompt}
    use_chat_template: bool = True
    system: str | None = None
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    max_new_tokens: int = 64
    trust_remote_code: bool = False  # run Python code a hub model ships (auto_map): only for authors you trust

    def __post_init__(self):
        if "{prompt}" not in self.instruction:
            raise ConfigError(f"rewriter.instruction={self.instruction!r} has no {{prompt}} placeholder: add one")
        if self.temperature < 0:
            raise ConfigError(f"rewriter.temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rewriter.top_p={self.top_p} must lie in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"rewriter.max_new_tokens={self.max_new_tokens} must be >= 1")

    def template(self) -> RewriteTemplate:
        return RewriteTemplate(self.instruction, self.use_chat_template, self.system)


@dataclass
class PromptLoraConfig(LoraConfig):
    """diffpo's LoRA settings on the rewriter's attention projections (peft); B = 0 at start, so
    policy = reference. alpha None means 2 x rank here (the LM default), rank on the UNet."""

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        super().__post_init__()
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty: name the linear layers to adapt (e.g. q_proj, v_proj)")


@dataclass
class PromptOptimConfig(OptimConfig):
    """diffpo's optimizer settings with LoRA-DPO defaults for a small LM."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"


@dataclass
class PromptTrainConfig:
    """Sem-DPO training of the rewriter on a pairs JSONL (``diffpo prompt train CONFIG [key=value ...]``)."""

    pairs: str = ""  # pairs.jsonl: {"prompt", "chosen", "rejected", "cos_chosen", ...} per line
    output_dir: str = "runs/prompt"
    seed: int = 0
    rewriter: RewriterConfig = field(default_factory=RewriterConfig)
    lora: PromptLoraConfig = field(default_factory=PromptLoraConfig)
    beta: float = 0.1  # DPO's beta on sequence log-ratios (Rafailov et al. 2023)
    alpha: float = 1.0  # Sem-DPO: W = exp(-alpha (1 - cos)); 0: plain DPO
    normalize_weights: bool = True  # divide W by its mean over the pairs file (a constant: same minimiser)
    optim: PromptOptimConfig = field(default_factory=PromptOptimConfig)
    train_batch_size: int = 8  # pairs per device per micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # optimizer steps; None: epochs over the pairs
    epochs: int = 1
    max_pairs: int | None = None  # the first N pairs of the file
    max_length: int = 256  # tokens of input + rewrite
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end
    checkpoints_total_limit: int | None = 3
    resume_from: str | None = None  # "latest" or a checkpoints/step-N folder
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    report_to: Literal["none", "tensorboard", "wandb", "all"] = "none"
    progress_bar: bool = True

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: name a folder for the run (e.g. output_dir=runs/prompt)")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} must be > 0")
        if self.alpha < 0:
            raise ConfigError(f"alpha={self.alpha} must be >= 0 (0: plain DPO)")
        for name in ("train_batch_size", "gradient_accumulation_steps", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be >= 1 (or null: train for `epochs`)")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"max_pairs={self.max_pairs} must be >= 1")
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} must be >= 8 tokens")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 0")
