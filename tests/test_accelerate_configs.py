"""Every ``configs/accelerate/*.yaml`` loads with accelerate's own config reader, and every key of
its nested sections is an option ``accelerate launch`` knows (the launcher ignores unknown ones)."""

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"))
PREFIX = {"fsdp_config": "fsdp_", "dynamo_config": "dynamo_"}  # as accelerate's launcher maps them to options


def test_the_documented_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3",
                                         "deepspeed_zero3_offload"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_reads_the_config(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    options = {action.dest for action in launch_command_parser()._actions}
    for section in ("deepspeed_config", "fsdp_config", "dynamo_config"):
        for key in getattr(config, section) or {}:
            name = key if key.startswith(PREFIX.get(section, "")) else PREFIX.get(section, "") + key
            assert name in options, f"{path.name}: {section}.{key} is not an `accelerate launch` option"
    kind = config.distributed_type.value
    if kind == "DEEPSPEED":
        stage = config.deepspeed_config["zero_stage"]
        assert stage in (2, 3)
        # RUN_DIR/final of a ZeRO-3 run needs the sharded weights gathered
        assert stage == 2 or config.deepspeed_config["zero3_save_16bit_model"] is True
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # diffpo's own setting applies
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert config.num_processes == (1 if kind == "NO" else 8)
