"""Statistics for reward comparisons: bootstrap confidence intervals and paired win rates."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (non-finite values dropped)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    return tuple(_interval(_resample_means(finite, None, resamples, seed), confidence))


def summarize(values, seed: int = 0) -> dict:
    """Mean, std, n and the 95% bootstrap CI of the mean: ``describe`` without the median."""
    described = describe(values, seed=seed)
    return {key: described[key] for key in ("mean", "std", "n", "ci95")}


def paired_win_rate(candidate, baseline, seed: int = 0, tie_tolerance: float = 0.0) -> dict:
    """``win_rate`` with the CI bootstrapped over pairs (shared seeds)."""
    return win_rate(candidate, baseline, tie_tolerance=tie_tolerance, seed=seed)


def _resample_means(values: np.ndarray, groups, resamples: int, seed: int, statistic=np.mean) -> np.ndarray:
    """Bootstrap replicates of ``statistic``: over samples, or over whole groups (a cluster
    bootstrap: all samples of a drawn group enter together, so correlated samples of one prompt do
    not narrow the interval)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
        return statistic(draws, axis=1)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    picks = rng.integers(0, len(members), size=(resamples, len(members)))
    if statistic is np.mean:  # vectorised: a resample's mean is its groups' total over their count
        sums = np.bincount(inverse, weights=values)
        counts = np.bincount(inverse).astype(np.float64)
        return sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    sizes = {len(m) for m in members}
    if len(sizes) == 1:  # equal groups (images per prompt): one fancy-indexing pass
        table = values[np.stack(members)]
        return statistic(table[picks].reshape(resamples, -1), axis=1)
    return np.array([statistic(values[np.concatenate([members[j] for j in row])]) for row in picks])


def _interval(replicates: np.ndarray, confidence: float) -> list[float]:
    alpha = (1 - confidence) / 2
    return [float(np.quantile(replicates, alpha)), float(np.quantile(replicates, 1 - alpha))]


def describe(values, groups=None, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean, median, std (ddof 1), n and percentile-bootstrap CIs of the mean and the median.
    Non-finite values are dropped (with their groups). With ``groups=None`` the mean CI equals
    ``summarize``'s for the same seed."""
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    finite = values[keep]
    groups = None if groups is None else np.asarray(groups)[keep]
    nan = float("nan")
    if len(finite) == 0:
        return {"mean": nan, "median": nan, "std": nan, "n": 0, "ci95": [nan, nan], "median_ci95": [nan, nan]}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)),
            "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0, "n": int(len(finite)),
            "ci95": _interval(_resample_means(finite, groups, resamples, seed), confidence),
            "median_ci95": _interval(_resample_means(finite, groups, resamples, seed, np.median), confidence)}


def win_outcomes(candidate, baseline, tie_tolerance: float = 0.0) -> np.ndarray:
    """Per pair: 1 (candidate higher by more than ``tie_tolerance``), 0.5 (tie), 0 (lower), NaN
    where either score is not finite."""
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    outcome = np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))
    return np.where(np.isfinite(diff), outcome, np.nan)


def win_rate(candidate, baseline, groups=None, tie_tolerance: float = 0.0, confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0) -> dict:
    """Paired win rate of ``candidate`` over ``baseline`` (same seeds, same order): wins count 1,
    ties (|difference| <= ``tie_tolerance``) 1/2, with wins/ties/losses and a bootstrap CI (over
    ``groups`` when given, e.g. prompt indices)."""
    outcome = win_outcomes(candidate, baseline, tie_tolerance)
    keep = np.isfinite(outcome)
    outcome = outcome[keep]
    groups = None if groups is None else np.asarray(groups)[keep]
    nan = float("nan")
    result = {"mean": float(outcome.mean()) if len(outcome) else nan, "n": int(len(outcome)),
              "wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()),
              "losses": int((outcome == 0).sum()),
              "ci95": _interval(_resample_means(outcome, groups, resamples, seed), confidence) if len(outcome) else [nan, nan],
              "tie_rule": f"|candidate - baseline| <= {tie_tolerance:g} is a tie and counts 1/2"}
    return result
