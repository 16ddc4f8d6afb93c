"""The ``diffpo`` command. Each sub-command is a thin wrapper over a library call; imports are lazy
so that ``diffpo --help`` answers at once."""

from __future__ import annotations

import argparse
import sys

OVERRIDES_HELP = "key=value overrides with dotted keys, e.g. optim.lr=1e-5 data.source=pairs.parquet"


def _train(args) -> None:
    from diffpo.config import TrainConfig, load_config
    from diffpo.trainers import run_training

    config = load_config(TrainConfig, args.config, args.overrides)
    run_dir = run_training(config)
    print(f"run written to {run_dir} (final weights in {run_dir / 'final'})")


def _cache(args) -> None:
    from diffpo.config import TrainConfig, load_config
    from diffpo.data.cache import build_cache
    from diffpo.data.pairs import build_pairs
    from diffpo.models.loading import load_stack

    config = load_config(TrainConfig, args.config, args.overrides)
    stack = load_stack(config.model.pretrained, config.model.revision, config.model.variant,
                       config.model.prediction_type, config.model.vae)
    pairs = build_pairs(config.data, config.data.resolution or stack.native_resolution, config.seed)
    folder = build_cache(stack, pairs, config.cache.dir, config.cache.dtype, config.cache.shard_size)
    print(f"cache of {len(pairs)} pairs in {folder}")


def _quickstart(args) -> None:
    from diffpo.config import load_config
    from diffpo.quickstart import QuickstartConfig, default_config_path, run_quickstart

    path = args.config or (default_config_path() if default_config_path().is_file() else None)
    config = load_config(QuickstartConfig, path, args.overrides)
    result = run_quickstart(config)
    print(
        f"{result['reward']}: before {result['reward_before']['mean']:.4f} "
        f"[{result['reward_before']['ci95'][0]:.4f}, {result['reward_before']['ci95'][1]:.4f}]  "
        f"after {result['reward_after']['mean']:.4f} "
        f"[{result['reward_after']['ci95'][0]:.4f}, {result['reward_after']['ci95'][1]:.4f}]  "
        f"win rate {result['win_rate']['mean']:.3f} [{result['win_rate']['ci95'][0]:.3f}, {result['win_rate']['ci95'][1]:.3f}]"
    )
    print(f"grid and quickstart.json in {result['run_dir']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpo", description="Preference alignment of diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config",
                                description="Train with a YAML config (see configs/); also runs under `accelerate launch -m diffpo train`.")
    train.add_argument("config", help="YAML config file, e.g. configs/diffusion_dpo/sd15_lora.yaml or RUN_DIR/config.yaml")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.set_defaults(func=_train)

    cache = commands.add_parser("cache", help="precompute VAE latents and text embeddings of a config's dataset",
                                description="Encode every pair of the config's dataset once into cache.dir; training with cache.enabled=true then reads it.")
    cache.add_argument("config", help="the training YAML config whose model and data to cache")
    cache.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    cache.set_defaults(func=_cache)

    quick = commands.add_parser("quickstart", help="align the bundled tiny model end to end, offline, in minutes",
                                description="Sample pairs from the bundled tiny model, label them with a reward, train "
                                            "Diffusion-DPO LoRA, and report reward before/after and the win rate.")
    quick.add_argument("--config", default=None, help="optional YAML (default: built-in, as configs/quickstart.yaml)")
    quick.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/qs method=sft train.max_steps=100")
    quick.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffpo.errors import user_errors

    with user_errors():
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
