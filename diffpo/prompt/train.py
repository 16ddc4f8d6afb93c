"""Sem-DPO training of the prompt rewriter: LoRA on the LM, DPO on sequence log-probabilities of
chosen vs rejected rewrites, each pair weighted by the chosen rewrite's semantic similarity to the
source prompt (Mohamed et al., 2025). Reference = the same LM with its adapters disabled.

The loop reads top to bottom: set-up, resume, one micro-step, train, export. Its data order and
dropout noise are functions of the micro-step, so a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from diffpo.config import ConfigError
from diffpo.prompt.config import PromptTrainConfig
from diffpo.trainers.common import (
    build_optimizer,
    check_finite,
    make_accelerator,
    prepare_run_dir,
    resume,
    run_resetting_accelerate,
    save_checkpoint,
    step_generator,
)

PAIR_TEXT_KEYS = ("prompt", "chosen", "rejected")


def read_pairs(path: str | Path, need_cosine: bool = True, max_pairs: int | None = None) -> list[dict]:
    """The pairs of a pairs JSONL: each line needs string ``prompt``, ``chosen``, ``rejected`` and,
    when Sem-DPO weights are used, a number ``cos_chosen``. Errors name the line."""
    path = Path(path)
    if not str(path) or not path.is_file():
        raise ConfigError(f"pairs={str(path)!r} is not a file: pass the pairs.jsonl that `diffpo prompt pairs` writes")
    pairs = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); fix or remove the line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a pair must be a JSON object, got {type(record).__name__}")
            for key in PAIR_TEXT_KEYS:
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{number}: key {key!r} is missing or not a string; every line needs "
                                     f"{', '.join(PAIR_TEXT_KEYS)}" + (" and cos_chosen" if need_cosine else ""))
            cos = record.get("cos_chosen")
            if need_cosine and (isinstance(cos, bool) or not isinstance(cos, (int, float)) or not math.isfinite(cos)):
                raise ValueError(f"{path}:{number}: key 'cos_chosen' is missing or not a finite number "
                                 "(Sem-DPO weights need it; set alpha=0 for plain DPO)")
            pairs.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"],
                          "cos_chosen": float(cos) if need_cosine else 1.0})
            if max_pairs is not None and len(pairs) >= max_pairs:
                break
    if not pairs:
        raise ValueError(f"{path}: holds no pairs (empty file): build pairs with `diffpo prompt pairs` first")
    return pairs


def batch_indices(size: int, batch: int, seed: int, micro_step: int) -> list[int]:
    """The pair indices of one global micro-batch: a fresh permutation per epoch from (seed, epoch);
    a short last batch is filled from the start of the permutation, so every batch is full."""
    per_epoch = math.ceil(size / batch)
    epoch, index = divmod(micro_step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist()
    picked = order[index * batch:(index + 1) * batch]
    return picked + [order[i % size] for i in range(batch - len(picked))]


def attach_rewriter_lora(model, lora) -> object:
    """Wrap the LM in a peft LoRA model (A random, B = 0: the policy starts as the base LM)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.rank,
                        lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"lora.target_modules={list(lora.target_modules)} matched no module of the rewriter "
                          f"({str(error).splitlines()[0]}): use names like q_proj, k_proj, v_proj, o_proj") from None


def train_rewriter(config: PromptTrainConfig) -> Path:
    """Run Sem-DPO on ``config.pairs``; returns the run directory (``final/`` is the trained rewriter,
    loadable with ``load_rewriter`` / ``PromptOptimizer.from_pretrained``)."""
    return run_resetting_accelerate(_train, config)


def _train(config: PromptTrainConfig) -> Path:
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_scheduler

    from diffpo.models.lora import register_lora_checkpointing
    from diffpo.objectives.semdpo import semdpo_loss
    from diffpo.prompt.lm import completion_batch, load_rewriter, render_inputs, sequence_logprobs
    from diffpo.prompt.semantic import mean_weight_scale, semantic_weights

    # ---- set-up -------------------------------------------------------------------------------
    pairs = read_pairs(config.pairs, need_cosine=config.alpha > 0, max_pairs=config.max_pairs)
    weight_scale = (mean_weight_scale([p["cos_chosen"] for p in pairs], config.alpha)
                    if config.alpha > 0 and config.normalize_weights else 1.0)
    # Accumulation is done by hand below (no_sync + a scaled loss), so accelerate counts no micro-steps
    # of its own and resume needs nothing but (global_step, micro_step).
    accelerator = make_accelerator(config, 1)
    run_dir = prepare_run_dir(config, accelerator.is_main_process)
    set_seed(config.seed)
    model, tokenizer = load_rewriter(config.rewriter.model, device=str(accelerator.device),
                                     trust_remote_code=config.rewriter.trust_remote_code)
    template = config.rewriter.template()
    model = attach_rewriter_lora(model, config.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    accumulation = config.gradient_accumulation_steps
    global_batch = config.train_batch_size * accelerator.num_processes
    micro_per_epoch = math.ceil(len(pairs) / global_batch)
    max_steps = config.max_steps or config.epochs * math.ceil(micro_per_epoch / accumulation)
    lr = config.optim.lr
    if config.optim.scale_lr:
        lr *= global_batch * accumulation
    optimizer = build_optimizer(params, config.optim)
    for group in optimizer.param_groups:
        group["lr"] = lr
    schedule = get_scheduler(config.optim.lr_scheduler, optimizer, num_warmup_steps=config.optim.warmup_steps,
                             num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(schedule)  # stepped once per optimizer step by this loop
    register_lora_checkpointing(accelerator, model)  # checkpoints hold the LoRA weights only
    policy = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        accelerator.init_trackers("diffpo-prompt", config={"beta": config.beta, "alpha": config.alpha, "lr": lr})

    # ---- resume -------------------------------------------------------------------------------
    state, log = resume(accelerator, run_dir, config.resume_from, {"global_step": 0, "micro_step": 0})
    global_step, micro_step = state["global_step"], state["micro_step"]

    # ---- one micro-step -----------------------------------------------------------------------
    def micro_batch_loss(batch: list[dict]):
        inputs = render_inputs(tokenizer, [p["prompt"] for p in batch], template)
        chosen = completion_batch(tokenizer, inputs, [p["chosen"] for p in batch], config.max_length)
        rejected = completion_batch(tokenizer, inputs, [p["rejected"] for p in batch], config.max_length)
        both = _stack_right_padded(chosen, rejected, tokenizer.pad_token_id, accelerator.device)
        with accelerator.autocast():
            logp = sequence_logprobs(model, **both)
            with torch.no_grad(), policy.disable_adapter():  # the reference: adapters off, back on after
                ref_logp = sequence_logprobs(policy, **both)
        logp_w, logp_l = logp.chunk(2)
        ref_w, ref_l = ref_logp.chunk(2)
        cosine = torch.tensor([p["cos_chosen"] for p in batch], device=accelerator.device)
        weights = weight_scale * semantic_weights(cosine, config.alpha).to(accelerator.device)
        per_pair, metrics = semdpo_loss(logp_w, logp_l, ref_w, ref_l, weights, beta=config.beta)
        return per_pair.mean(), metrics

    # ---- train --------------------------------------------------------------------------------
    progress = tqdm(total=max_steps, initial=global_step, desc="train sem-dpo rewriter",
                    disable=not (accelerator.is_main_process and config.progress_bar))
    window: dict[str, float] = {}
    window_count = 0
    while global_step < max_steps:
        indices = batch_indices(len(pairs), global_batch, config.seed, micro_step)
        mine = indices[accelerator.process_index * config.train_batch_size:][:config.train_batch_size]
        batch = [pairs[i] for i in mine]
        # LoRA dropout draws from the global RNG: seed it from the micro-step for exact resumes.
        torch.manual_seed(step_generator(config.seed, micro_step, accelerator.process_index).initial_seed())
        sync = (micro_step + 1) % accumulation == 0
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss, metrics = micro_batch_loss(batch)
            check_finite(loss, global_step, [p["prompt"] for p in batch], run_dir, accelerator)
            accelerator.backward(loss / accumulation)
        micro_step += 1
        log.count(len(batch))
        for key, value in {"loss": loss.detach(), **metrics}.items():
            window[key] = window.get(key, 0.0) + float(value)
        window_count += 1
        if not sync:
            continue
        grad_norm = accelerator.clip_grad_norm_(params, config.optim.max_grad_norm or float("inf"))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        progress.update(1)
        if global_step % config.log_every == 0 or global_step == max_steps:
            means = torch.tensor([v / window_count for v in window.values()], device=accelerator.device)
            values = dict(zip(window.keys(), accelerator.reduce(means, reduction="mean").tolist()))
            values.update(grad_norm=float(grad_norm), lr=schedule.get_last_lr()[0],
                          epoch=(micro_step - 1) // micro_per_epoch)
            record = log.write(global_step, values)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.2f}")
            window, window_count = {}, 0
        if config.checkpoint_every and global_step % config.checkpoint_every == 0 and global_step < max_steps:
            save_checkpoint(accelerator, run_dir, {"global_step": global_step, "micro_step": micro_step},
                            config.checkpoints_total_limit)
    progress.close()
    save_checkpoint(accelerator, run_dir, {"global_step": global_step, "micro_step": micro_step},
                    config.checkpoints_total_limit)

    # ---- export -------------------------------------------------------------------------------
    export_rewriter(accelerator, policy, tokenizer, config, run_dir, global_step)
    accelerator.end_training()
    return run_dir


def _stack_right_padded(first: dict, second: dict, pad_id: int, device) -> dict:
    """Chosen and rejected batches as one (2B, L) batch (one forward), right-padded to one width."""
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    out = {}
    for key in ("input_ids", "attention_mask", "completion_mask"):
        fill = pad_id if key == "input_ids" else 0
        parts = [torch.nn.functional.pad(part[key], (0, width - part[key].shape[1]), value=fill) for part in (first, second)]
        out[key] = torch.cat(parts).to(device)
    return out


def export_rewriter(accelerator, policy, tokenizer, config: PromptTrainConfig, run_dir: Path, global_step: int) -> Path:
    """``RUN_DIR/final``: the LoRA adapter (peft format), the tokenizer and ``diffpo_rewriter.json``
    naming the base rewriter and the template it was trained with."""
    from diffpo.prompt.lm import write_rewriter_meta

    final = run_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final.mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(str(final))
        tokenizer.save_pretrained(str(final))
        base = config.rewriter.model
        if Path(base).exists():  # a local base must still resolve when the run dir is read from elsewhere
            base = str(Path(base).resolve())
        write_rewriter_meta(final, base, config.rewriter.template(), method="sem-dpo", steps=global_step,
                            beta=config.beta, alpha=config.alpha)
    accelerator.wait_for_everyone()
    return final
