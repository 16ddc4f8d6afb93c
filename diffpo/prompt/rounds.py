"""Several rounds of on-policy Sem-DPO: in round r the current rewriter samples K rewrites of that
round's source prompts, every rewrite is rendered and scored (``build_candidates``), best vs worst
become pairs (``make_pairs``) and Sem-DPO trains a new LoRA on top of the current rewriter
(``train_rewriter``; its reference is the current rewriter, adapters off). The next round samples
from the model just trained, so its pairs come from where the policy now puts its mass.

Resume: a round whose ``train/final`` exists is done and skipped; inside an unfinished round the
candidates file continues where it stopped and training resumes from its latest checkpoint. So
rerunning the same call after an interruption finishes the same rounds an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffpo.prompt.config import PromptTrainConfig
from diffpo.prompt.lm import REWRITER_FILE


def round_dir(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"round-{index}"


def run_rounds(start: str, template, round_prompts: list[list[str]], pipeline, heads: dict[str, tuple], embedder,
               out_dir: str | Path, options, train: PromptTrainConfig, references: dict[str, str] | None = None,
               progress: bool = True) -> Path:
    """Run ``len(round_prompts)`` rounds from the rewriter ``start`` (any ``load_rewriter`` name);
    returns the last round's ``final`` folder. ``options`` is a ``PairBuildOptions``; ``train`` the
    Sem-DPO settings of every round (its ``pairs``, ``output_dir`` and ``rewriter.model`` are set
    per round). Each round writes ``round-R/{candidates.jsonl, pairs.jsonl, train/, round.json}``."""
    from diffpo.prompt.lm import load_rewriter
    from diffpo.prompt.pairs import build_candidates, make_pairs, read_candidates
    from diffpo.prompt.train import train_rewriter

    if not round_prompts or any(not prompts for prompts in round_prompts):
        raise ValueError("every round needs at least one source prompt")
    current = str(start)
    for index, prompts in enumerate(round_prompts):
        folder = round_dir(out_dir, index)
        final = folder / "train" / "final"
        if (final / REWRITER_FILE).is_file():  # finished in an earlier call
            current = str(final)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        candidates = folder / "candidates.jsonl"
        rewriter = load_rewriter(current)
        round_options = dataclasses.replace(options, seed=options.seed + 1_000 * index)  # fresh samples per round
        build_candidates(rewriter, template, prompts, pipeline, heads, embedder, candidates, round_options,
                         progress=progress, references=references)
        del rewriter
        pair_count = make_pairs(candidates, folder / "pairs.jsonl", options.pairing, options.margin)
        if pair_count == 0:
            raise ValueError(f"round {index}: every prompt's rewrites tied, so there are no pairs: raise "
                             "n_candidates or the temperature, or lower margin")
        config = dataclasses.replace(train, pairs=str(folder / "pairs.jsonl"), output_dir=str(folder / "train"),
                                     resume_from="latest", rewriter=dataclasses.replace(train.rewriter, model=current))
        train_rewriter(config)
        records = read_candidates(candidates)
        rewards = [r for record in records for r in record["rewards"] if r is not None]
        (folder / "round.json").write_text(json.dumps({
            "round": index, "rewriter": current, "prompts": len(prompts), "pairs": pair_count,
            "mean_candidate_reward": sum(rewards) / max(len(rewards), 1),
            "mean_original_reward": sum(r["original_reward"] for r in records if r["original_reward"] is not None)
            / max(len(records), 1)}, indent=2) + "\n")
        current = str(final)
    return Path(current)
