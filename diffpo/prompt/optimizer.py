"""The Python inference API: rewrite prompts with a (Sem-DPO trained) LM, optionally re-rank the
rewrites by rendering them with a diffusion pipeline and scoring the images with reward heads.

    opt = PromptOptimizer.from_pretrained("runs/semdpo/final")      # or "smollm2", "tiny", a hub id
    candidates = opt.optimize("a cat on a sofa", n=4, seed=0)       # list[Candidate]
    ranked = opt.optimize("a cat on a sofa", n=4, seed=0, rerank=Reranker(pipe, diffpo.rewards.load("pickscore")))
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
    is the target, so a rewrite cannot win by changing the subject. With ``against="candidate"``
    the head scores each image with the rewrite that was rendered (does the model render this text
    well?), for heads that only understand the model's own caption language (``meaning-match`` on
    the shapes world); faithfulness to the user then comes from the embedder term. Heads whose
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
    against: str = "original"  # the text the reward head scores each image with: "original" or "candidate"

    def __post_init__(self):
        if self.against not in ("original", "candidate"):
            raise ValueError(f"against={self.against!r} must be 'original' (the user's prompt) or 'candidate' "
                             "(the rewrite that was rendered)")
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
        originals = [prompt] * len(render) if self.against == "original" else render
        total = self.weights[0] * _per_text(_oriented(self.reward, images, originals), len(texts))
        if self.faithfulness is not None and self.weights[1] != 0:
            if hasattr(self.faithfulness, "encode"):
                embeddings = self.faithfulness.encode([prompt, *texts]).float()
                faithful = embeddings[1:] @ embeddings[0]  # rows are L2-normalised: cosine
            else:
                faithful = _per_text(_oriented(self.faithfulness, images, [prompt] * len(render)), len(texts))
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


@dataclass
class OptimizeJob:
    """One ``optimize`` call's worth of work, so that several calls can share one LM batch."""

    prompts: list[str]
    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0
    include_original: bool = False
    rerank: Any = None  # None: the optimizer's configured reranker (if any); False: none; a Reranker / tuple

    @property
    def rows(self) -> int:
        """LM rows this job samples: one per prompt when greedy, else ``n`` per prompt."""
        return len(self.prompts) * (1 if self.temperature == 0 else self.n)


class PromptOptimizer:
    """A rewriter LM with its tokenizer and template, and optionally a configured ``reranker`` that
    ``optimize`` uses unless told otherwise. Not thread-safe: callers that share one (the HTTP
    server) call it from one thread, batching concurrent requests with ``optimize_jobs``."""

    def __init__(self, model, tokenizer, template=None, name: str = "rewriter", reranker: Reranker | None = None):
        from diffpo.prompt.lm import RewriteTemplate

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template or RewriteTemplate()
        self.name = name
        self.reranker = as_reranker(reranker)

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        template=None, reranker: Reranker | None = None) -> PromptOptimizer:
        """``"smollm2"`` (the packaged SmolLM2-135M-Instruct), ``"tiny"`` (a random tiny LM for tests),
        a hub id, a local transformers / GGUF folder, or a ``diffpo prompt-train`` output folder.
        Without ``template``, a trained folder's stored template is used (it was trained with it)."""
        from diffpo.prompt.lm import load_rewriter, rewriter_template

        model, tokenizer = load_rewriter(str(path_or_id), device=device, dtype=dtype)
        return cls(model, tokenizer, template or rewriter_template(str(path_or_id)), name=str(path_or_id),
                   reranker=reranker)

    def optimize(self, prompt_or_list: str | list[str], n: int = 4, temperature: float = 0.8, top_p: float = 0.95,
                 max_new_tokens: int = 64, seed: int | None = None, include_original: bool = False,
                 rerank: Reranker | tuple | bool | None = None, batch_size: int = 64,
                 reranker: Reranker | tuple | None = None):
        """``n`` rewrites per prompt: list[Candidate] for a str, list[list[Candidate]] for a list.

        ``seed`` makes the sampling reproducible (None: a fresh random seed); ``temperature=0``
        decodes greedily. ``include_original`` puts the prompt itself first among its candidates
        (so re-ranking can keep it when no rewrite beats it). ``rerank`` (a Reranker or a
        ``(pipeline, reward_head)`` tuple; None: the optimizer's configured ``reranker``, if any;
        False: none) scores every candidate and sorts them best first. ``reranker`` is the older
        name of ``rerank``. ``batch_size``: LM rows (prompt x sample) per forward batch.
        """
        single = isinstance(prompt_or_list, str)
        prompts = check_prompts(prompt_or_list)
        check_sampling(n, temperature, top_p, max_new_tokens)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)  # no global RNG touched
        job = OptimizeJob(prompts, n, temperature, top_p, max_new_tokens, int(seed), include_original,
                          rerank if rerank is not None else reranker)
        results = self.optimize_jobs([job], max_rows=batch_size)[0]
        return results[0] if single else results

    def optimize_jobs(self, jobs: list[OptimizeJob], max_rows: int = 64) -> list[list[list[Candidate]]]:
        """Several ``optimize`` calls at once: every job's sampled rows go through the LM together
        (``max_rows`` per forward batch), each row with its own seed, so each job gets exactly what
        ``optimize`` alone gives it; then each job's candidates are re-ranked as it asks."""
        from diffpo.prompt.lm import group_rewrites, rewrite_rows, sample_in_batches

        rows, offsets = [], []
        for job in jobs:
            offsets.append(len(rows))
            rows.extend(rewrite_rows(self.tokenizer, job.prompts, self.template, job.n, job.temperature, job.top_p,
                                     job.max_new_tokens, job.seed))
        texts = sample_in_batches(self.model, self.tokenizer, rows, max_rows)
        results = []
        for job, offset in zip(jobs, offsets):
            reranker = self.reranker if job.rerank is None or (job.rerank is True and self.reranker) \
                else as_reranker(job.rerank)
            groups = group_rewrites(texts[offset:offset + job.rows], len(job.prompts), job.n, job.temperature == 0)
            job_results = []
            for prompt, group in zip(job.prompts, groups):
                candidates = [Candidate(t) for t in ([prompt] if job.include_original else []) + group]
                if reranker is not None:
                    candidates = self._ranked(prompt, candidates, reranker)
                job_results.append(candidates)
            results.append(job_results)
        return results

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
    if reranker is None or reranker is False or isinstance(reranker, Reranker):
        return reranker or None
    if reranker is True:
        raise ValueError("rerank=True needs a configured reranker: pass PromptOptimizer(..., reranker=Reranker(...)) "
                         "or rerank=Reranker(pipeline, reward_head)")
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


__all__ = ["Candidate", "OptimizeJob", "PromptOptimizer", "Reranker", "sort_candidates"]
