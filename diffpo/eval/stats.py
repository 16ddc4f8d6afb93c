"""Statistics for reward comparisons: bootstrap confidence intervals and paired win rates."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarize(values, seed: int = 0) -> dict:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if len(finite) else float("nan"),
            "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
            "n": int(len(finite)), "ci95": list(bootstrap_ci(finite, seed=seed))}


def paired_win_rate(candidate, baseline, seed: int = 0, tie_tolerance: float = 0.0) -> dict:
    """Fraction of shared-seed pairs where ``candidate`` scores higher than ``baseline``; a tie
    (|difference| <= ``tie_tolerance``) counts one half. CI: bootstrap over pairs."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    outcome = np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))
    return {"mean": float(outcome.mean()) if len(outcome) else float("nan"),
            "ci95": list(bootstrap_ci(outcome, seed=seed)), "n": int(len(outcome)),
            "ties": int((outcome == 0.5).sum()), "tie_rule": f"|difference| <= {tie_tolerance} counts 0.5"}
