"""Strict configs: unknown keys, types, overrides, and every shipped config."""

from pathlib import Path

import pytest
import yaml

from diffpo.config import ConfigError, TrainConfig, apply_overrides, from_dict, load_config, save_config
from diffpo.quickstart import QuickstartConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_unknown_key_names_it_and_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'.*did you mean 'lr'|unknown config key 'optim.learning_rat'"):
        from_dict(TrainConfig, {"optim": {"learning_rat": 1e-5}})
    with pytest.raises(ConfigError, match="'max_step'.*did you mean 'max_steps'"):
        from_dict(TrainConfig, {"max_step": 3})


def test_wrong_types_and_ranges_are_errors():
    with pytest.raises(ConfigError, match="max_steps must be an integer"):
        from_dict(TrainConfig, {"max_steps": "ten"})
    with pytest.raises(ConfigError, match="beta"):
        from_dict(TrainConfig, {"objective": {"beta": -1}})
    with pytest.raises(ConfigError, match="lr"):
        from_dict(TrainConfig, {"optim": {"lr": -1.0}})
    with pytest.raises(ConfigError, match="objective.name='nope' is not one of"):
        from_dict(TrainConfig, {"objective": {"name": "nope"}})
    with pytest.raises(ConfigError, match="method='dpo' is unknown"):
        from_dict(TrainConfig, {"method": "dpo"})


def test_overrides_use_dotted_keys_and_yaml_values():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=1e-5", "lora.target_modules=[to_q, to_v]", "finetune=full"])
    config = from_dict(TrainConfig, data)
    assert config.optim.lr == 1e-5 and config.lora.target_modules == ["to_q", "to_v"] and config.finetune == "full"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(TrainConfig, None, ["max_steps=7", "data.flip=joint", "objective.beta=123"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == config


def test_random_crop_with_cache_is_rejected():
    with pytest.raises(ConfigError, match="data.crop=center"):
        from_dict(TrainConfig, {"cache": {"enabled": True}, "data": {"crop": "random"}})


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.yaml") if not {"accelerate", "eval"} & set(p.parts)), ids=str)
def test_every_shipped_config_validates(path):
    from diffpo.prompt.config import PromptTrainConfig

    cls = (PromptTrainConfig if "prompt" in path.parts else QuickstartConfig if path.name.startswith("quickstart")
           else TrainConfig)
    load_config(cls, path)


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=str)
def test_accelerate_configs_are_valid_yaml_for_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys raise
    assert config.num_processes >= 1 and config.distributed_type is not None
