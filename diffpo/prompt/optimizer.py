"""The Python inference API: rewrite prompts with a (Sem-DPO trained) LM, optionally re-rank the
rewrites by rendering them with a diffusion pipeline and scoring the images with reward heads.

    opt = PromptOptimizer.from_pretrained("runs/semdpo/final")      # or "smollm2", "tiny", a hub id
    candidates = opt.optimize("a cat on a sofa", n=4, seed=0)       # list[Candidate]
    ranked = opt.optimize("a cat on a sofa", n=4, seed=0, reranker=Reranker(pipe, diffpo.rewards.load("pickscore")))
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Candidate:
    """One rewrite; ``score`` is set by re-ranking (higher is better), else None."""

    text: str
    score: float | None = None


@dataclass
class Reranker:
    """Render each candidate with ``pipeline`` on the shared ``seeds`` and score the images.

    score = weights[0] · mean_seeds reward(image, original prompt)
          + weights[1] · faithfulness,
    where faithfulness is either a reward head on the same images (e.g. CLIP against the original
    prompt) or an embedder with ``.encode`` giving cos(e(prompt), e(candidate)) (the Sem-DPO
    semantic-consistency term). Images are scored against the *original* prompt: the user's intent
    is the target, so a rewrite cannot win by changing the subject. Heads whose
    ``higher_is_better`` is False are negated so that the best candidate always sorts first.
    """

    pipeline: Any
    reward: Any
    seeds: tuple[int, ...] = (0, 1)
    faithfulness: Any = None
    weights: tuple[float, float] = (1.0, 1.0)
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    batch_size: int = 16

    def __post_init__(self):
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ValueError("Reranker needs at least one seed: pass seeds=(0,) or more")
        if len(self.weights) != 2:
            raise ValueError(f"weights={self.weights!r} must be (reward weight, faithfulness weight)")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be >= 1")

    def score(self, prompt: str, texts: list[str]) -> list[float]:
        """One score per text in ``texts`` (rewrites of ``prompt``)."""
        from diffpo.eval.generate import generate

        if not texts:
            return []
        # every candidate sees the same seeds, so score differences come from the text alone
        render = [t for t in texts for _ in self.seeds]
        seeds = [s for _ in texts for s in self.seeds]
        images = generate(self.pipeline, render, seeds, num_inference_steps=self.num_inference_steps,
                          guidance_scale=self.guidance_scale, batch_size=self.batch_size)
        originals = [prompt] * len(render)
        total = self.weights[0] * _per_text(_oriented(self.reward, images, originals), len(texts))
        if self.faithfulness is not None and self.weights[1] != 0:
            if hasattr(self.faithfulness, "encode"):
                embeddings = self.faithfulness.encode([prompt, *texts]).float()
                faithful = embeddings[1:] @ embeddings[0]  # rows are L2-normalised: cosine
            else:
                faithful = _per_text(_oriented(self.faithfulness, images, originals), len(texts))
            total = total + self.weights[1] * faithful.cpu()
        return [float(v) for v in total]


def _oriented(head, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    scores = head(images, prompts).float().cpu()
    return scores if getattr(head, "higher_is_better", True) else -scores


def _per_text(scores: torch.Tensor, count: int) -> torch.Tensor:
    return scores.view(count, -1).mean(dim=1)


def sort_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Best first; unscored and NaN scores last (stable, so ties keep generation order)."""
    def key(c: Candidate):
        bad = c.score is None or math.isnan(c.score)
        return (bad, 0.0 if bad else -c.score)

    return sorted(candidates, key=key)


class PromptOptimizer:
    """A rewriter LM with its tokenizer and template. Not thread-safe: callers that share one
    (the HTTP server) serialise calls themselves."""

    def __init__(self, model, tokenizer, template=None, name: str = "rewriter"):
        from diffpo.prompt.lm import RewriteTemplate

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template or RewriteTemplate()
        self.name = name

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        template=None) -> PromptOptimizer:
        """``"smollm2"`` (the packaged SmolLM2-135M-Instruct), ``"tiny"`` (a random tiny LM for tests),
        a hub id, a local transformers / GGUF folder, or a ``diffpo prompt-train`` output folder.
        Without ``template``, a trained folder's stored template is used (it was trained with it)."""
        from diffpo.prompt.lm import load_rewriter, rewriter_template

        model, tokenizer = load_rewriter(str(path_or_id), device=device, dtype=dtype)
        return cls(model, tokenizer, template or rewriter_template(str(path_or_id)), name=str(path_or_id))

    def optimize(self, prompt_or_list: str | list[str], n: int = 4, temperature: float = 0.8, top_p: float = 0.95,
                 max_new_tokens: int = 64, seed: int | None = None, include_original: bool = False,
                 reranker: Reranker | tuple | None = None, batch_size: int = 16):
        """``n`` rewrites per prompt: list[Candidate] for a str, list[list[Candidate]] for a list.

        ``seed`` makes the sampling reproducible (None: a fresh random seed); ``temperature=0``
        decodes greedily. ``include_original`` puts the prompt itself first among its candidates
        (so re-ranking can keep it when no rewrite beats it). ``reranker`` (a Reranker or a
        ``(pipeline, reward_head)`` tuple) scores every candidate and sorts them best first.
        """
        from diffpo.prompt.lm import generate_rewrites

        single = isinstance(prompt_or_list, str)
        prompts = check_prompts(prompt_or_list)
        check_sampling(n, temperature, top_p, max_new_tokens)
        reranker = as_reranker(reranker)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)  # no global RNG touched
        rewrites = generate_rewrites(self.model, self.tokenizer, prompts, n=n, template=self.template,
                                     temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                     seed=int(seed), batch_size=batch_size)
        results = []
        for prompt, texts in zip(prompts, rewrites):
            candidates = [Candidate(t) for t in ([prompt] if include_original else []) + list(texts)]
            if reranker is not None:
                candidates = self._ranked(prompt, candidates, reranker)
            results.append(candidates)
        return results[0] if single else results

    def rank(self, prompt: str, candidates: list[Candidate | str], pipeline=None, reward=None,
             seeds: tuple[int, ...] = (0, 1), faithfulness=None, weights: tuple[float, float] = (1.0, 1.0),
             num_inference_steps: int = 25, guidance_scale: float = 5.0,
             reranker: Reranker | None = None) -> list[Candidate]:
        """Score ``candidates`` (rewrites of ``prompt``) by rendering them with ``pipeline`` on shared
        ``seeds`` and scoring with ``reward`` (see Reranker); returns new Candidates, best first."""
        if reranker is None:
            if pipeline is None or reward is None:
                raise ValueError("rank() needs pipeline= and reward= (e.g. diffpo.rewards.load('pickscore')), or reranker=")
            reranker = Reranker(pipeline, reward, seeds=seeds, faithfulness=faithfulness, weights=weights,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        (prompt,) = check_prompts([prompt])
        items = [Candidate(c) if isinstance(c, str) else Candidate(c.text) for c in candidates]
        return self._ranked(prompt, items, reranker)

    @staticmethod
    def _ranked(prompt: str, candidates: list[Candidate], reranker: Reranker) -> list[Candidate]:
        for candidate, score in zip(candidates, reranker.score(prompt, [c.text for c in candidates])):
            candidate.score = score
        return sort_candidates(candidates)

    def __repr__(self) -> str:
        return f"PromptOptimizer({self.name!r})"


def as_reranker(reranker) -> Reranker | None:
    if reranker is None or isinstance(reranker, Reranker):
        return reranker
    if isinstance(reranker, tuple) and len(reranker) == 2:
        return Reranker(*reranker)
    raise ValueError(f"reranker must be a Reranker or a (pipeline, reward_head) tuple, got {type(reranker).__name__}")


def check_prompts(prompt_or_list) -> list[str]:
    """The prompts as a list; one-line errors for empty or non-string input."""
    prompts = [prompt_or_list] if isinstance(prompt_or_list, str) else prompt_or_list
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"pass a prompt (str) or a list of prompts, got {type(prompt_or_list).__name__}")
    if not prompts:
        raise ValueError("the list of prompts is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, not a str")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty: pass a non-empty text-to-image prompt")
    return [p.strip() for p in prompts]


def check_sampling(n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1 (rewrites per prompt)")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0: greedy, n identical rewrites)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")


__all__ = ["Candidate", "PromptOptimizer", "Reranker", "sort_candidates"]
