"""Every numeric config key has a stated range (``diffpo.ranges.RANGES``), its default lies in it,
the shipped configs lie in theirs, and a value outside is refused when the config is read, naming
the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest

from diffpo.config import ConfigError, TrainConfig, from_dict, load_config
from diffpo.eval.config import EvalConfig, load_eval_config
from diffpo.prompt.config import PromptTrainConfig
from diffpo.prompt.quickstart import PromptQuickstartConfig
from diffpo.quickstart import QuickstartConfig
from diffpo.ranges import parse_range, range_of

ROOTS = (TrainConfig, EvalConfig, QuickstartConfig, PromptTrainConfig, PromptQuickstartConfig)


def _unwrap(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def config_classes() -> list[type]:
    found, todo = [], list(ROOTS)
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        for hint in typing.get_type_hints(cls).values():
            hint = _unwrap(hint)
            inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
            if dataclasses.is_dataclass(inner):
                todo.append(inner)
    return found


def numeric_fields():
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _unwrap(hints[f.name]) in (int, float):
                yield cls, f


def test_every_numeric_key_of_every_config_has_a_range_holding_its_default():
    fields = list(numeric_fields())
    assert len(fields) > 100  # train, eval, quickstart and prompt configs
    missing = [f"{cls.__name__}.{f.name}" for cls, f in fields if range_of(cls, f.name) is None]
    assert not missing, f"numeric keys without a stated range in diffpo.ranges.RANGES: {missing}"
    for cls, f in fields:
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None:
            assert default in range_of(cls, f.name), f"{cls.__name__}.{f.name}={default}"


def test_range_notation():
    assert 0 in parse_range("[0, 1)") and 1 not in parse_range("[0, 1)") and 0 not in parse_range("(0, 1]")
    assert 5 in parse_range(">= 5") and 5 not in parse_range("> 5") and -1e300 in parse_range("any")
    assert math.nan not in parse_range("any") and math.inf not in parse_range(">= 0")
    with pytest.raises(ValueError, match="not a range"):
        parse_range("positive")


SHIPPED = Path(__file__).resolve().parents[1] / "diffpo" / "configs"


@pytest.mark.parametrize("path", sorted(p for p in SHIPPED.rglob("*.yaml") if "accelerate" not in p.parts),
                         ids=lambda p: str(p.relative_to(SHIPPED)))
def test_shipped_configs_lie_in_the_ranges(path):
    if path.parent.name == "eval":
        load_eval_config(path)
    elif path.name.startswith("quickstart"):
        load_config(QuickstartConfig, path)
    elif path.parent.name == "prompt":
        load_config(PromptTrainConfig, path)
    else:
        load_config(TrainConfig, path)


@pytest.mark.parametrize("override, message", [
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0 must be > 0: null turns clipping off"),
    ("objective.beta=.nan", "objective.beta=nan must be a finite number (> 0)"),
    ("objective.beta=inf", "objective.beta=inf must be a finite number (> 0)"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number (>= 0): the optimizer's step size (1e-5 to 1e-3 is usual)"),
    ("optim.lr=-.inf", "optim.lr=-inf must be a finite number (>= 0): the optimizer's step size (1e-5 to 1e-3 is usual)"),
    ("optim.lr=-1e-4", "optim.lr=-0.0001 must be >= 0: the optimizer's step size (1e-5 to 1e-3 is usual)"),
    ("optim.adam_beta1=1.5", "optim.adam_beta1=1.5 must lie in [0, 1)"),
    ("checkpoint_every=-1", "checkpoint_every=-1 must be >= 0: 0 saves only at the end"),
    ("data.max_pairs=0", "data.max_pairs=0 must be >= 1: null uses every pair"),
    ("seed=-1", "seed=-1 must lie in [0, 4294967295]"),
    ("online.eta=1.5", "online.eta=1.5 must lie in [0, 1]"),
    ("lora.alpha=0", "lora.alpha=0.0 must be > 0"),
])
def test_out_of_range_train_keys_are_refused_naming_the_key(override, message):
    from diffpo.config import apply_overrides

    with pytest.raises(ConfigError) as error:
        from_dict(TrainConfig, apply_overrides({}, [override]))
    assert str(error.value) == message


def test_out_of_range_keys_of_eval_prompt_and_quickstart_configs_are_refused():
    with pytest.raises(ConfigError, match=r"^models\[0\].sampling.steps=0 must be >= 1$"):
        load_eval_config(SHIPPED / "eval" / "tiny.yaml", ["models.0.sampling.steps=0"])
    with pytest.raises(ConfigError, match=r"^report.confidence=1.0 must lie in \[0.5, 1\)$"):
        load_eval_config(SHIPPED / "eval" / "tiny.yaml", ["report.confidence=1"])
    with pytest.raises(ConfigError, match=r"^optim.adam_beta2=1.0 must lie in \[0, 1\)$"):
        from_dict(PromptTrainConfig, {"optim": {"adam_beta2": 1.0}})
    with pytest.raises(ConfigError, match=r"^train.optim.lr=nan must be a finite number"):
        from_dict(QuickstartConfig, {"train": {"optim": {"lr": "nan"}}})
    with pytest.raises(ConfigError, match=r"^rewriter.top_p=0.0 must lie in \(0, 1\]$"):
        from_dict(PromptTrainConfig, {"rewriter": {"top_p": 0}})
