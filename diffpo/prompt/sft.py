"""SFT warm start of the rewriter: LoRA on a few (request, canonical rewrite) examples, next-token
cross-entropy on the rewrite's tokens only (the supervised baseline that Promptist and Sem-DPO
start DPO from). A small LM that has never seen the target language samples almost no usable
rewrite, so DPO would have nothing to pair; a few dozen examples teach it the form.

The loop is plain PyTorch (a warm start of seconds to minutes, no accelerate state to resume); its
output folder loads like a Sem-DPO output (``load_rewriter`` merges the adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean over completion tokens of −log π(token | previous tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    token_nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_nll * mask).sum() / mask.sum().clamp(min=1)


def train_sft(rewriter: str, template, examples: list[tuple[str, str]], out_dir: str | Path, steps: int = 30,
              batch_size: int = 8, lr: float = 1e-3, lora_rank: int = 8, seed: int = 0, max_length: int = 192,
              progress: bool = True) -> Path:
    """Fine-tune a LoRA on ``examples`` (source prompt, target rewrite) for ``steps`` AdamW steps;
    writes ``out_dir/final`` (adapter, tokenizer, ``diffpo_rewriter.json`` with ``template``) and
    ``out_dir/metrics.jsonl``; returns ``final``. An existing ``final`` is kept (resume = skip)."""
    from tqdm import tqdm

    from diffpo.prompt.config import PromptLoraConfig
    from diffpo.prompt.lm import REWRITER_FILE, completion_batch, load_rewriter, render_inputs, write_rewriter_meta
    from diffpo.prompt.train import attach_rewriter_lora, batch_indices

    if not examples:
        raise ValueError("SFT needs at least one (prompt, rewrite) example")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    out = Path(out_dir)
    final = out / "final"
    if (final / REWRITER_FILE).is_file():
        return final
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the LoRA init (A random, B = 0)
        model, tokenizer = load_rewriter(rewriter)
        model = attach_rewriter_lora(model, PromptLoraConfig(rank=lora_rank, dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    with open(out / "metrics.jsonl", "w") as log:
        for step in tqdm(range(steps), desc="sft warm start", disable=not progress):
            picked = [examples[i] for i in batch_indices(len(examples), batch_size, seed, step)]
            inputs = render_inputs(tokenizer, [p for p, _ in picked], template)
            batch = completion_batch(tokenizer, inputs, [t for _, t in picked], max_length)
            loss = sft_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.write(json.dumps({"step": step + 1, "loss": float(loss.detach())}) + "\n")
    model.eval()
    final.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    base = str(Path(rewriter).resolve()) if Path(rewriter).exists() else rewriter
    write_rewriter_meta(final, base, template, method="sft", steps=steps, examples=len(examples), lr=lr)
    return final
