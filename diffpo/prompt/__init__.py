"""Sem-DPO prompt optimizer: a small LM that rewrites text-to-image prompts, trained with
semantically weighted DPO (Mohamed et al., 2025). Heavy modules load on first use."""

from __future__ import annotations

__all__ = ["PromptOptimizer", "Candidate"]


def __getattr__(name: str):
    # Lazy so that `import diffpo.prompt` does not pull in transformers / peft.
    if name in __all__:
        from diffpo.prompt import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module 'diffpo.prompt' has no attribute {name!r}")
