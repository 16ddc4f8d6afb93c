"""The ``diffpo`` command. Each sub-command is a thin wrapper over a library call; imports are lazy
so that ``diffpo --help`` answers at once."""

from __future__ import annotations

import argparse
import os
import sys

OVERRIDES_HELP = "key=value overrides with dotted keys, e.g. optim.lr=1e-5 data.source=pairs.parquet"


def _train(args) -> None:
    from diffpo.config import TrainConfig, load_config
    from diffpo.errors import disk_full_names
    from diffpo.trainers import run_training

    config = load_config(TrainConfig, args.config, args.overrides)
    with disk_full_names(config.output_dir):
        run_dir = run_training(config)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"run written to {run_dir} (final weights in {run_dir / 'final'})")


def _cache(args) -> None:
    import torch
    from accelerate import PartialState

    from diffpo.config import TrainConfig, load_config
    from diffpo.data.cache import build_cache, cached_bad_samples
    from diffpo.data.pairs import build_pairs
    from diffpo.errors import disk_full_names
    from diffpo.models.loading import load_stack
    from diffpo.trainers.common import check_frames

    config = load_config(TrainConfig, args.config, args.overrides)
    # under `accelerate launch` / torchrun every process encodes its share of the shards on its device
    # (cpu=True: torchrun on a machine without an accelerator forms a gloo group)
    state = PartialState(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available())
    stack = load_stack(config.model.pretrained, config.model.revision, config.model.variant,
                       config.model.prediction_type, config.model.vae, device=state.device,
                       motion_adapter=config.model.motion_adapter, max_sequence_length=config.model.max_sequence_length)
    check_frames(config.data, stack)
    pairs = build_pairs(config.data, config.data.resolution or stack.native_resolution, config.seed)
    with disk_full_names(config.cache.dir, then="rerun `diffpo cache` (finished shards are kept)"):
        folder = build_cache(stack, pairs, config.cache.dir, config.cache.dtype, config.cache.shard_size,
                             text_dtype=config.cache.text_dtype, progress=state.is_main_process, process_index=state.process_index,
                             num_processes=state.num_processes, wait_for_everyone=state.wait_for_everyone)
    if state.is_main_process:
        bad = len(cached_bad_samples(folder))
        print(f"cache of {len(pairs)} pairs in {folder} ({state.num_processes} process(es))"
              + (f"; {bad} bad samples skipped, listed in {folder}/bad_samples.jsonl" if bad else ""))
    # build_cache ended on a barrier; a rank that exits still holding a gloo group can abort at teardown
    state.destroy_process_group()


def _data_check(args) -> None:
    import os

    from diffpo.config import DataConfig, TrainConfig, apply_overrides, from_dict, load_config, to_dict
    from diffpo.data.check import check_dataset, write_report
    from diffpo.outputs import check_not_an_input

    data, winners_only = {}, False
    if args.config:
        from diffpo.objectives import METHODS

        train = load_config(TrainConfig, args.config)
        data = to_dict(train.data)
        winners_only = METHODS[train.method].loop == "online" and train.method != "d3po"  # SePPO, DRO: winners only
    overrides = list(args.overrides)
    if args.source and "=" in args.source and not os.path.exists(args.source):  # only overrides were given
        overrides.insert(0, args.source)
    elif args.source:
        data["source"] = args.source
    overrides = [o[len("data."):] if o.startswith("data.") else o for o in overrides]
    config = from_dict(DataConfig, apply_overrides(data, overrides))
    if not config.source:
        raise ValueError("name the dataset: diffpo data check DATASET (or --config CONFIG with data.source)")
    check_not_an_input(args.out, {"dataset": config.source, "config": args.config})
    report = check_dataset(config, winners_only, args.max_rows, images=not args.no_images, progress=not args.no_progress)
    from diffpo.errors import disk_full_names

    with disk_full_names(args.out, then="pass an --out on a disk with space"):
        path = write_report(report, args.out)
    print("\n".join(report.summary_lines()))
    print(f"report: {path}")
    if not report.ok:
        raise SystemExit(1)


def _quickstart(args) -> None:
    from diffpo.config import load_config
    from diffpo.quickstart import QuickstartConfig, default_config_path, run_quickstart

    methods = [o.split("=", 1)[1].strip() for o in args.overrides if o.startswith("method=")]
    models = [o.split("=", 1)[1].strip() for o in args.overrides if o.startswith("model=")]
    preset = default_config_path(methods[-1] if methods else None, models[-1] if models else None)
    path = args.config or (preset if preset.is_file() else None)
    config = load_config(QuickstartConfig, path, args.overrides)
    result = run_quickstart(config)

    def line(figures: dict) -> str:
        before, after, win = figures["reward_before"], figures["reward_after"], figures["win_rate"]
        return (f"{result['reward']}: before {before['mean']:.4f} [{before['ci95'][0]:.4f}, {before['ci95'][1]:.4f}]  "
                f"after {after['mean']:.4f} [{after['ci95'][0]:.4f}, {after['ci95'][1]:.4f}]  "
                f"win rate {win['mean']:.3f} [{win['ci95'][0]:.3f}, {win['ci95'][1]:.3f}]")

    print(f"held-out captions ({result['heldout_captions']}, never trained on): {line(result)}")
    print(f"training captions ({result['seen_captions']['captions']}, new seeds): {line(result['seen_captions'])}")
    print(f"grid and quickstart.json in {result['run_dir']}")


def _data_top_k(args) -> None:
    from diffpo.data.topk import top_k_images, write_top_k
    from diffpo.outputs import check_not_an_input

    check_not_an_input(args.out, {"--source": args.source})
    head = _load_heads([args.reward], args.reward_option, args.device)[args.reward]
    records = top_k_images(args.source, head, args.k, tuple(args.image_column or ("jpg_0", "jpg_1")),
                           args.caption_column, progress=not args.no_progress)
    out = write_top_k(records, args.out, args.reward)
    print(f"{len(records)} images written to {out} (scores {records[-1]['score']:.4f} to {records[0]['score']:.4f})")


def _eval(args) -> None:
    from diffpo.errors import disk_full_names
    from diffpo.eval.config import load_eval_config
    from diffpo.eval.runner import run_eval

    config = load_eval_config(args.config, args.overrides)
    from diffpo.outputs import check_not_an_input

    for name in ("manifest.jsonl", "index.html", "summary.md", "scores.json", "scores.jsonl"):  # what it writes
        check_not_an_input(os.path.join(config.output_dir, name), {"prompts.source": config.prompts.source},
                           option="output_dir")
    with disk_full_names(config.output_dir, then="rerun the same config (finished images are kept)"):
        result = run_eval(config)
    baseline, metrics = result["baseline"], result["metrics"]
    for metric in metrics:
        parts = [f"{m} {s['mean']:.4g} [{s['ci95'][0]:.4g}, {s['ci95'][1]:.4g}]" for m, s in result["summary"][metric].items()]
        wins = [f"{m} wins {w['mean']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]" for m, w in result["win_rates"][metric].items()]
        print(f"{metric}: " + "  ".join(parts) + (f"  | vs {baseline}: " + "  ".join(wins) if wins else ""))
    print(f"report: {result['report']} (tables for a paper in {result['output_dir']}/summary.md)")


def _reward_options(pairs: list[str], names: list[str]) -> dict[str, dict]:
    """``NAME.KEY=VALUE`` strings -> {name: {key: value}}; values parse as JSON when they can."""
    import json

    options: dict[str, dict] = {name: {} for name in names}
    for pair in pairs:
        target, sep, value = pair.partition("=")
        name, dot, key = target.rpartition(".")  # names may hold dots (hps-v2.1): the key is after the last
        if not sep or not dot or name not in options:
            raise ValueError(f"--reward-option {pair!r}: expected NAME.KEY=VALUE with NAME one of the --reward names {names}")
        try:
            options[name][key] = json.loads(value)
        except ValueError:
            options[name][key] = value
    return options


def _load_heads(names: list[str], option_pairs: list[str], device: str = "cpu", dtype: str = "fp32",
                batch_size: int | None = None) -> dict:
    """Reward heads by name with their ``NAME.KEY=VALUE`` options; device and dtype reach learned heads."""
    from diffpo.rewards import load

    options = _reward_options(option_pairs, names)
    heads = {}
    for name in names:
        opts = ({"batch_size": batch_size} if batch_size else {}) | options[name]
        learned = {"device": device, "dtype": dtype} if _is_learned(name) else {}
        heads[name] = load(name, **learned, **opts)
    return heads


def _score(args) -> None:
    from diffpo.eval.scoring import score_folder, score_pairs

    if (args.images is None) == (args.pairs is None):
        raise ValueError("pass either --images DIR --prompts FILE or --pairs PARQUET")
    if args.images is not None and args.prompts is None:
        raise ValueError("--images needs --prompts FILE (one prompt per line, or a .jsonl/.csv manifest with file,prompt)")
    if args.images is not None:
        from diffpo.eval.scoring import IMAGE_SUFFIXES
        from diffpo.outputs import check_not_an_input

        check_not_an_input(args.out or f"{args.images.rstrip('/')}/scores.jsonl",
                           {"--prompts": args.prompts, "--images": args.images}, read_suffixes=IMAGE_SUFFIXES)
    heads = _load_heads(list(dict.fromkeys(args.reward)), args.reward_option, args.device, args.dtype,
                        batch_size=args.batch_size)
    if args.pairs is not None:
        out = score_pairs(args.pairs, heads, args.out, batch_size=args.batch_size, progress=not args.no_progress)
        print(f"scored pairs written to {out}")
    else:
        out = score_folder(args.images, args.prompts, heads, args.out or f"{args.images.rstrip('/')}/scores.jsonl",
                           batch_size=args.batch_size, progress=not args.no_progress)
        print(f"scores written to {out}")


def _label(args) -> None:
    from diffpo.labeling.server import serve
    from diffpo.serving import resolve_api_key

    serve(args.run_dir, round_index=args.round, host=args.host, port=args.port, api_key=resolve_api_key(args.api_key),
          rate_limit=args.rate_limit, rate_burst=args.rate_burst, max_body_bytes=args.max_body_bytes)


def _is_learned(name: str) -> bool:
    from diffpo.rewards import REWARDS, LearnedHead

    return name in REWARDS and issubclass(REWARDS[name], LearnedHead)


def build_parser() -> argparse.ArgumentParser:
    from diffpo.ranges import argument

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
    quick.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/qs method=sft train.max_steps=100; "
                                                    "model=video: the bundled AnimateDiff model (configs/quickstart_video.yaml); "
                                                    "model=wan: the bundled Wan2.1-layout model, aligned to motion "
                                                    "(configs/quickstart_wan.yaml); model=flow: the bundled SD3-layout model")
    quick.set_defaults(func=_quickstart)

    evaluate = commands.add_parser(
        "eval", help="compare models on fixed seeds with reward heads; win rates with CIs and an HTML report",
        description="Generate images (or videos) for a prompt set on fixed seeds (the same initial noise for every "
                    "model), score them with reward heads, and write OUTPUT_DIR/index.html, summary.md (markdown "
                    "tables), scores.json, scores.jsonl and manifest.jsonl. The first model is the baseline of the "
                    "win rates. Rerunning the same config skips images already generated. Examples: configs/eval/.")
    evaluate.add_argument("config", help="YAML config, e.g. configs/eval/tiny.yaml or OUTPUT_DIR/config.yaml")
    evaluate.add_argument("overrides", nargs="*",
                          help="key=value overrides with dotted keys; list entries by position, e.g. output_dir=runs/e2 "
                               "sampling.steps=30 models.1.lora=runs/dpo/final prompts.max_prompts=100")
    evaluate.set_defaults(func=_eval)

    score = commands.add_parser(
        "score", help="score an image folder or a preference-pair parquet with reward heads",
        description="Score images with reward heads. --images DIR --prompts FILE writes JSONL, one line per image "
                    "(file, prompt, one field per head); FILE is one prompt per line matched to the images sorted "
                    "by file name, or a .jsonl/.csv manifest with file,prompt. --pairs PARQUET (Pick-a-Pic format) "
                    "writes a NEW parquet with <name>_0, <name>_1 and label_<name> (1: image 0 scores higher, "
                    "0: lower, 0.5: equal); the input is never modified.")
    score.add_argument("--images", default=None, help="folder of images (.png/.jpg/.jpeg/.webp/.bmp)")
    score.add_argument("--prompts", default=None, help="prompts for --images: .txt (one per line) or .jsonl/.csv (file,prompt)")
    score.add_argument("--pairs", default=None, help="Pick-a-Pic-format parquet (jpg_0, jpg_1, caption)")
    score.add_argument("--reward", action="append", required=True, metavar="NAME",
                       help="a reward head (repeatable): clip, hps-v2, hps-v2.1, pickscore, aesthetic, brightness, ...")
    score.add_argument("--reward-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                       help="a head option (repeatable), e.g. hps-v2.1.path=ckpts/HPS_v2.1_compressed.pt clip.raw=true")
    score.add_argument("--out", default=None, help="output file (default: DIR/scores.jsonl; PARQUET_scored.parquet beside the input)")
    score.add_argument("--batch-size", type=argument(int, ">= 1"), default=16, help="images per forward pass (default 16)")
    score.add_argument("--device", default="cpu", help="device of learned heads, e.g. cpu, cuda, cuda:1 (default cpu)")
    score.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of learned heads (default fp32)")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(func=_score)

    label = commands.add_parser(
        "label", help="label a sampling round of an online run by hand, in the browser",
        description="Serve a local page that shows the pending pairs of one sampling round of RUN_DIR (a D3PO run "
                    "with online.preference=human) side by side; keys 1 or Left: left is better, 2 or Right: right "
                    "is better, 0 or Down: tie. "
                    "Every click is appended to RUN_DIR/rounds/round-NNNN/labels.jsonl at once, so stopping midway "
                    "loses nothing and a restart continues. Then `diffpo train RUN_DIR/config.yaml "
                    "resume_from=latest` trains on the labels. Listens on 127.0.0.1 unless --host says otherwise; "
                    "serves only the round's images inside RUN_DIR; SIGTERM or Ctrl-C finishes the requests "
                    "already received, then exits.")
    label.add_argument("run_dir", help="the run's output_dir, holding rounds/round-NNNN/")
    label.add_argument("--round", type=argument(int, ">= 0"), default=None, metavar="N",
                       help="round to label (default: the latest round with pending pairs, else the latest)")
    from diffpo.labeling.server import DEFAULT_PORT, MAX_BODY_BYTES, RATE_BURST, RATE_LIMIT
    from diffpo.serving import add_network_arguments

    add_network_arguments(label, DEFAULT_PORT, RATE_LIMIT, RATE_BURST, MAX_BODY_BYTES)
    label.set_defaults(func=_label)

    data = commands.add_parser("data", help="dataset tools: check a dataset for problems, top-k expert images",
                               description="Dataset tools. `diffpo data check DATASET` lists every problem of a "
                                           "preference dataset at once. `diffpo data top-k` keeps the K best distinct images of a "
                                           "Pick-a-Pic-format parquet / JSONL / datasets id by a reward head and writes "
                                           "an image+caption parquet (jpg_0, caption, the score, source_row, source_column).")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser(
        "check", help="list every problem of a preference dataset at once (exit 1 when there are any)",
        description="Read DATASET (parquet file/folder/glob such as a Pick-a-Pic download, a .jsonl manifest, or a "
                    "datasets id) as training would and report ALL its problems: unreadable files or JSONL lines, "
                    "missing columns, no rows, all pairs ties, labels outside {0, 0.5, 1}, corrupt/truncated/oversized "
                    "images, empty or non-UTF-8 captions, non-numeric scores. Writes a JSON report with every "
                    "problem's row (or line); exits 1 when there is any problem, 0 when the dataset is clean.")
    check.add_argument("source", nargs="?", default=None, help="the dataset (default: data.source of --config)")
    check.add_argument("overrides", nargs="*",
                       help="data settings as key=value (the data section of a training config), e.g. "
                            "caption_column=prompt keep_ties=true resolution=1024")
    check.add_argument("--config", default=None, help="a training config whose data section (columns, method) to use")
    check.add_argument("--out", default="data_check.json", help="report file (default data_check.json)")
    check.add_argument("--max-rows", type=argument(int, ">= 1"), default=None, help="check only the first N rows")
    check.add_argument("--no-images", action="store_true", help="do not decode images (columns, labels, captions only)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(func=_data_check)
    top_k = data_commands.add_parser("top-k", help="the K best images by a reward head, as an image+caption parquet",
                                     description="Score every distinct image of SOURCE with --reward and keep the best --k.")
    top_k.add_argument("--source", required=True, help="parquet file/folder/glob, a .jsonl manifest, or a datasets id")
    top_k.add_argument("--reward", required=True, help="a reward head: pickscore, hps-v2.1, aesthetic, clip, jpeg-compressibility, ...")
    top_k.add_argument("--reward-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                       help="a head option (repeatable), e.g. pickscore.path=ckpts/PickScore_v1")
    top_k.add_argument("--k", type=argument(int, ">= 1"), required=True, help="how many images to keep")
    top_k.add_argument("--out", required=True, help="output parquet")
    top_k.add_argument("--image-column", action="append", default=None, help="image column (repeatable; default jpg_0 and jpg_1)")
    top_k.add_argument("--caption-column", default="caption", help="caption column (default caption)")
    top_k.add_argument("--device", default="cpu", help="device of learned heads (default cpu)")
    top_k.add_argument("--no-progress", action="store_true", help="no progress bar")
    top_k.set_defaults(func=_data_top_k)

    from diffpo.prompt.cli import add_prompt_commands

    add_prompt_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from contextlib import nullcontext

    from diffpo.errors import user_errors
    from diffpo.interrupt import stop_cleanly

    serves = args.command == "label" or getattr(args, "prompt_command", None) == "serve"  # own signal handling
    with nullcontext() if serves else stop_cleanly(args, argv), user_errors():
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
