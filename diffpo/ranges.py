"""The stated range of every numeric config key, checked when a config is read.

``RANGES`` maps a config dataclass's name to ``{field: range}``; a subclass (``PromptOptimConfig``)
inherits its bases' ranges and may restate them. A range is written as

* ``">= 1"``, ``"> 0"``, ``"<= 1"``, ``"< 1"``: one bound;
* ``"[0, 1)"``, ``"(0, 1]"``, ``"[0.5, 1)"``: an interval, brackets closed, parentheses open;
* ``"any"``: any finite number;

optionally followed by ``; why`` (what the bound means, or what null does), added to the message.

Every number must also be finite (NaN and inf are refused) and an ``int`` field must hold an
integer (``from_dict`` checks the type first). ``None`` is allowed exactly where the field's type
allows it (``int | None``: null means "off" or "all", as each field's comment says).

``diffpo.config.from_dict`` calls ``check_range`` for every numeric key it reads, with the key's
dotted name (``optim.adam_beta1``, ``models[1].sampling.steps``), so the error names it:
``optim.adam_beta1=1.5 must lie in [0, 1)``. Relations between keys (``madpo_weight_min <=
madpo_weight_max``) stay in the dataclasses' ``__post_init__``. ``tests/test_config_ranges.py``
checks that every numeric field of every config dataclass has a range here and that its default
lies in it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SEED = "[0, 4294967295]"  # numpy's and accelerate's set_seed accept 32-bit seeds

RANGES: dict[str, dict[str, str]] = {
    # diffpo.config: training
    "ModelConfig": {"logit_mean": "any", "logit_std": "> 0", "mode_scale": ">= 0",
                    "flow_shift": "> 0; null uses the scheduler config's shift", "guidance": ">= 0; null: 3.5",
                    "max_sequence_length": ">= 1; null uses the family's T5 length"},
    "LoraConfig": {"rank": ">= 1", "alpha": "> 0", "dropout": "[0, 1)"},
    "EmaConfig": {"decay": "(0, 1)"},
    "DataConfig": {"max_pairs": ">= 1; null uses every pair",
                   "resolution": ">= 8; null uses the model's native resolution",
                   "prompt_dropout": "[0, 1]", "num_workers": "[0, 1024]",
                   "curriculum_stages": ">= 0; 0 turns the curriculum off",
                   "num_frames": ">= 1; null for image data", "frame_stride": ">= 1"},
    "CacheConfig": {"shard_size": ">= 1"},
    "ObjectiveConfig": {"beta": "> 0", "epsilon": "[0, 0.5); it is the assumed label-flip rate",
                        "madpo_scale": "> 0; it is the reward margin unit",
                        "madpo_weight_min": ">= 0; weights are never negative",
                        "madpo_weight_max": ">= 0; weights are never negative", "gamma_margin": ">= 0",
                        "clip_range": "(0, 1)", "gamma": "> 0", "score_low": "any", "score_high": "any",
                        "inversion_steps": ">= 0", "margin": ">= 0", "kl_coef": ">= 0; 0 drops the KL term",
                        "nft_beta": "> 0; the trust region of the implicit policies"},
    "OnlineConfig": {"max_prompts": ">= 1", "prompts_per_round": ">= 1", "samples_per_prompt": ">= 2; to form pairs",
                     "inner_epochs": ">= 1", "timestep_fraction": "(0, 1]", "num_inference_steps": ">= 1",
                     "eta": "[0, 1]", "guidance_scale": ">= 0", "min_margin": ">= 0", "pool_every": ">= 1",
                     "replay_size": ">= 1", "replay_batch_size": ">= 1", "replay_every": ">= 1",
                     "lagged_sync_every": ">= 1",
                     "hacking_patience": ">= 0; 0 only logs", "hacking_tolerance": ">= 0", "stat_buffer_size": ">= 1",
                     "stat_min_count": ">= 1", "adv_clip": "> 0", "window_size": ">= 1; null: every step stochastic",
                     "window_stride": ">= 1"},
    "SamplerConfig": {"noise_level": ">= 0; null: ddim uses online.eta, flow samplers their official default",
                      "on_policy_tolerance": ">= 0; null: log the on-policy ratio error only"},
    "OptimConfig": {"lr": ">= 0; the optimizer's step size (1e-5 to 1e-3 is usual)", "weight_decay": "[0, 1]",
                    "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_epsilon": "> 0",
                    "max_grad_norm": "> 0; null turns clipping off", "warmup_steps": ">= 0"},
    "TrainConfig": {"seed": SEED, "max_steps": ">= 1", "train_batch_size": ">= 1", "gradient_accumulation_steps": ">= 1",
                    "log_every": ">= 1", "checkpoint_every": ">= 0; 0 saves only at the end",
                    "checkpoints_total_limit": ">= 1; null keeps every checkpoint", "max_nonfinite_skips": ">= 1"},
    # diffpo.eval.config
    "SamplingConfig": {"steps": ">= 1", "guidance_scale": ">= 0", "eta": "[0, 1]", "resolution": ">= 8",
                       "images_per_prompt": "[1, 1000]", "batch_size": ">= 1", "num_frames": ">= 1"},
    "SamplingOverride": {"steps": ">= 1", "guidance_scale": ">= 0", "eta": "[0, 1]", "resolution": ">= 8",
                         "batch_size": ">= 1"},
    "EvalModelConfig": {"lora_scale": "any"},
    "PromptSetConfig": {"max_prompts": ">= 1", "subsample_seed": SEED},
    "ReportConfig": {"confidence": "[0.5, 1)", "bootstrap_resamples": ">= 100", "tie_tolerance": ">= 0",
                     "grid_prompts": ">= 1", "top_k": ">= 1", "histogram_bins": ">= 1", "gif_fps": "[1, 100]",
                     "thumbnail_size": "[1, 4096]"},
    "EvalConfig": {"seed": SEED},
    # diffpo.quickstart
    "QuickstartConfig": {"seed": SEED, "num_frames": ">= 1", "heldout_prompts": ">= 1", "num_prompts": ">= 1",
                         "eval_seen_prompts": ">= 1",
                         "samples_per_prompt": ">= 2", "min_margin": ">= 0", "sample_steps": ">= 1",
                         "sample_eta": "[0, 1]", "guidance_scale": ">= 0", "eval_seeds_per_prompt": ">= 1",
                         "eval_steps": ">= 1", "batch_size": ">= 1", "grid_prompts": ">= 1"},
    # diffpo.prompt
    "RewriterConfig": {"temperature": ">= 0", "top_p": "(0, 1]", "max_new_tokens": ">= 1"},
    "PromptTrainConfig": {"seed": SEED, "beta": "> 0", "alpha": ">= 0", "train_batch_size": ">= 1",
                          "gradient_accumulation_steps": ">= 1", "max_steps": ">= 1", "epochs": ">= 1",
                          "max_pairs": ">= 1", "max_length": ">= 8", "log_every": ">= 1", "checkpoint_every": ">= 0",
                          "checkpoints_total_limit": ">= 1"},
    "PromptQuickstartConfig": {"seed": SEED, "sft_examples": ">= 0; 0: no SFT warm start", "sft_steps": ">= 1",
                               "sft_lr": "> 0", "rounds": ">= 0", "prompts_per_round": ">= 1",
                               "heldout_prompts": "[1, 120]", "candidates": ">= 2",
                               "seeds_per_prompt": ">= 1", "steps": ">= 1", "guidance_scale": ">= 0", "margin": ">= 0",
                               "eval_temperature": ">= 0"},
}


@dataclass(frozen=True)
class Range:
    """A set of finite numbers between two optional bounds, each open or closed."""

    text: str
    why: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def requirement(self) -> str:
        """What a value must be, for messages: ``must be >= 1``, ``must lie in [0, 1)``."""
        if self.text == "any":
            text = "must be a finite number"
        else:
            text = f"must lie in {self.text}" if self.text[0] in "[(" else f"must be {self.text}"
        return f"{text}: {self.why}" if self.why else text


_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


def parse_range(text: str) -> Range:
    text, _, why = (part.strip() for part in text.partition(";"))
    if text == "any":
        return Range(text, why)
    match = _INTERVAL.match(text)
    if match:
        left, low, high, right = match.groups()
        return Range(text, why, float(low), float(high), left == "(", right == ")")
    match = _BOUND.match(text)
    if match:
        op, bound = match.groups()
        value = float(bound)
        if op.startswith(">"):
            return Range(text, why, low=value, low_open=op == ">")
        return Range(text, why, high=value, high_open=op == "<")
    raise ValueError(f"not a range: {text!r} (use '>= 1', '> 0', '[0, 1)' or 'any')")


def range_of(cls, name: str) -> Range | None:
    """The stated range of field ``name`` of config dataclass ``cls`` (its bases' too); None if unstated."""
    for klass in getattr(cls, "__mro__", (cls,)):
        text = RANGES.get(klass.__name__, {}).get(name)
        if text is not None:
            return parse_range(text)
    return None


def range_error(key: str, value, allowed: Range) -> str | None:
    """The message for ``key=value`` outside ``allowed`` (None when it lies inside)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # not a number: the type check names it
    if value in allowed:
        return None
    if not math.isfinite(value):
        text = "" if allowed.text == "any" else f" ({allowed.text})"
        return f"{key}={value} must be a finite number{text}" + (f": {allowed.why}" if allowed.why else "")
    return f"{key}={value!r} {allowed.requirement()}"


def check_range(cls, name: str, key: str, value) -> str | None:
    """``range_error`` for field ``name`` of ``cls`` read under the dotted ``key``."""
    allowed = range_of(cls, name)
    return None if allowed is None or value is None else range_error(key, value, allowed)


def argument(kind, text: str):
    """An argparse ``type=`` that parses ``kind`` (int or float) and refuses values outside ``text``:
    ``--max-rows -5`` says ``must be >= 1, got -5``."""
    import argparse

    allowed = parse_range(text)

    def parse(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, got {raw!r}") from None
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{allowed.requirement()}, got {raw}")
        return value

    parse.__name__ = kind.__name__
    return parse
