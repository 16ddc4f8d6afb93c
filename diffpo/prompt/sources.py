"""Source prompts for the rewriter: the prompts whose rewrites become preference pairs (or are
evaluated). Reads what ``diffpo eval`` reads, through ``diffpo.eval.prompts``."""

from __future__ import annotations


def load_source_prompts(source: str, column: str | None = None, max_prompts: int | None = None, seed: int = 0,
                        split: str = "train") -> list[str]:
    """Prompts from a .txt file (one per line), a .jsonl file (key ``prompt`` or ``column``), a
    .tsv/.csv file, the bundled ``"partiprompts"`` or ``"shapes"`` sets, or a ``datasets`` hub id
    (``column``, default ``caption``; ``split``). ``max_prompts`` draws a reproducible subsample
    with ``seed`` (kept in file order). Empty prompts and repeats are dropped: the candidates file
    holds one line per distinct prompt."""
    from diffpo.config import ConfigError
    from diffpo.eval.config import PromptSetConfig
    from diffpo.eval.prompts import load_prompts

    if not source:
        raise ValueError("prompt source is empty: pass a .txt/.jsonl file, partiprompts, shapes or a datasets id")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts={max_prompts} must be >= 1 (or None: all)")
    try:
        config = PromptSetConfig(source=str(source), prompt_column=column, split=split, max_prompts=max_prompts,
                                 subsample_seed=seed)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    prompts = list(dict.fromkeys(r.prompt for r in load_prompts(config) if r.prompt))
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no non-empty prompts")
    return prompts
