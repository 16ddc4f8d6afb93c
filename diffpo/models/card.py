"""The model card ``final/README.md`` of an exported run, so that the folder can be pushed to a model
hub as it is: what was trained from what, with which objective and data, how far, with what
result, and the two lines that load it."""

from __future__ import annotations

import json
from pathlib import Path

LOGGED = ("loss", "implicit_acc", "reward_mean", "policy_err_w", "policy_err_l", "ref_gap")


def diffpo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffpo")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (source tree)"


def last_metrics(run_dir: Path) -> dict:
    """The last logged step of ``run_dir/metrics.jsonl`` (empty when nothing was logged)."""
    path = run_dir / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def write_model_card(final: Path, config, stack, global_step: int, run_dir: Path, data_size: dict | None = None) -> Path:
    """Write ``final/README.md`` for the export of ``config``'s run (LoRA or full weights)."""
    pipeline = stack.family.pipeline_class_name
    objective = config.objective
    metrics = last_metrics(run_dir)
    shown = {k: metrics[k] for k in LOGGED if k in metrics}
    sizes = ", ".join(f"{count} {what}" for what, count in (data_size or {}).items())
    if config.finetune == "lora":
        load = (f'pipe = {pipeline}.from_pretrained("{stack.source}")\n'
                f'pipe.load_lora_weights("path/to/this/folder")  # {final.name}/pytorch_lora_weights.safetensors')
        weights = (f"LoRA rank {config.lora.rank} (alpha {config.lora.alpha or config.lora.rank}) on "
                   f"{', '.join(config.lora.target_modules or stack.family.lora_targets)}, in peft key naming")
    else:
        attr = stack.family.denoiser_attr  # unet, or transformer (SD3, FLUX)
        load = (f'{attr} = {stack.family.unet_class_name}.from_pretrained("path/to/this/folder/{attr}")\n'
                f'pipe = {pipeline}.from_pretrained("{stack.source}", {attr}={attr})')
        weights = f"full fine-tuning: the whole denoiser in {attr}/"
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {stack.source}",
        "tags: [diffpo, preference-alignment, " + ("lora" if config.finetune == "lora" else "full-finetune") + "]",
        "---",
        f"# {config.method} on {Path(stack.source).name}",
        "",
        f"Aligned with diffpo {diffpo_version()}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{stack.source}` ({pipeline}) |",
        f"| method | `{config.method}` |",
        f"| objective | `{objective.name}`, beta = {objective.beta:g} (loss = -log sigmoid(-beta/2 (dtheta - dref))) |",
        f"| weights | {weights} |",
        f"| data | `{config.data.source or config.online.prompts}`" + (f" ({sizes})" if sizes else "") + " |",
        f"| steps | {global_step} optimizer steps, {config.train_batch_size} per process x "
        f"{config.gradient_accumulation_steps} accumulation, lr {config.optim.lr:g} |",
        f"| seed | {config.seed} |",
        "",
        "## Metrics at the last logged step",
        "",
        ("\n".join(f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in
                   {"step": metrics.get("step"), **shown}.items()) if metrics else "(none logged)"),
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {pipeline}" + ("" if config.finetune == "lora" else f", {stack.family.unet_class_name}"),
        load,
        "```",
        "",
        "`diffpo.json` beside this card holds the same facts for programs; the run's resolved config is "
        "`config.yaml` in the run folder.",
        "",
    ]
    path = final / "README.md"
    path.write_text("\n".join(lines))
    return path
