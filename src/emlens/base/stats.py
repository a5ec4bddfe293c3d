"""Rates with sample sizes and confidence intervals (Wilson; bootstrap over questions where samples cluster);
correlations with CIs; the Benjamini-Hochberg correction for many rows tested at once."""

from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_ci(values, statistic=np.mean, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, clusters=None) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over the values (NaNs dropped). With `clusters` (a label per value,
    e.g. its question) the clusters are resampled whole and the statistic is the pooled mean: samples of one
    question are not independent, and resampling them one by one would make the interval too narrow."""
    values = np.asarray(values, dtype=float)
    keep = ~np.isnan(values)
    values = values[keep]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    if clusters is not None and _clustered(np.asarray(clusters)[keep]):
        draws = _cluster_means(values, np.asarray(clusters)[keep], rng, n_boot)
    else:
        draws = statistic(values[rng.integers(0, len(values), size=(n_boot, len(values)))], axis=1)
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def _cluster_means(values: np.ndarray, clusters: np.ndarray, rng, n_boot: int) -> np.ndarray:
    """Pooled means of `n_boot` resamples of whole clusters."""
    labels = np.unique(clusters, return_inverse=True)[1]
    sums, counts = np.bincount(labels, weights=values), np.bincount(labels).astype(float)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    return sums[idx].sum(1) / counts[idx].sum(1)


def _clustered(labels: np.ndarray) -> bool:
    """Some cluster holds several values (and there are clusters to resample)."""
    distinct = len(np.unique(labels))
    return 1 < distinct < len(labels)


def wilson_ci(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (not degenerate at 0 / n or n / n: 0 of 24 gives [0, 0.138])."""
    if n == 0:
        return (float("nan"), float("nan"))
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (float(min(p, max(0.0, centre - half))), float(max(p, min(1.0, centre + half))))  # p inside, exactly


def rate(flags, seed: int = 0, clusters=None) -> dict:
    """A proportion with its n and 95 % CI: Wilson's score interval for independent samples. With `clusters`
    (the question of each sample) where a question holds several samples, a bootstrap over questions; at a rate
    of 0 or 1, where that bootstrap has nothing to resample, Wilson's interval with one observation per question
    (the conservative effective sample size)."""
    values = np.asarray(flags, dtype=float)
    keep = ~np.isnan(values)
    values = values[keep]
    n = int(len(values))
    if n == 0:
        return {"rate": float("nan"), "n": 0, "ci_low": float("nan"), "ci_high": float("nan")}
    p = float(values.mean())
    labels = np.asarray(clusters)[keep] if clusters is not None else None
    if labels is None or not _clustered(labels):
        low, high = wilson_ci(values.sum(), n)
    elif p in (0.0, 1.0):
        k = len(np.unique(labels))
        low, high = wilson_ci(p * k, k)
    else:
        low, high = bootstrap_ci(values, seed=seed, clusters=labels)
    return {"rate": p, "n": n, "ci_low": low, "ci_high": high}


def spearman_ci(x, y, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman rho over paired values, with a bootstrap 95 % CI over the pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return {"rho": float("nan"), "n": int(len(x)), "ci_low": float("nan"), "ci_high": float("nan")}
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            draws.append(stats.spearmanr(x[idx], y[idx]).statistic)
    low, high = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    return {"rho": rho, "n": int(len(x)), "ci_low": float(low), "ci_high": float(high)}


def pearson_ci(x, y) -> dict:
    """Pearson r with the Fisher-z 95 % CI."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": float("nan"), "n": int(len(x)), "ci_low": float("nan"), "ci_high": float("nan")}
    r = float(np.corrcoef(x, y)[0, 1])
    z, half = np.arctanh(np.clip(r, -0.999999, 0.999999)), 1.96 / np.sqrt(len(x) - 3)
    return {"r": r, "n": int(len(x)), "ci_low": float(np.tanh(z - half)), "ci_high": float(np.tanh(z + half))}


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (the false discovery rate over the rows tested together)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def bootstrap_p(values, n_boot: int = 2000, seed: int = 0, clusters=None) -> float:
    """Two-sided bootstrap p-value of a mean difference being zero: twice the smaller share of resampled means on
    either side of zero (resampling questions whole with `clusters`). Where every difference is the same there is
    nothing to resample: 1 when they are all 0, else the exact sign-flip test's 2 / 2^units, over the questions
    where clusters hold several pairs (each question's pairs flip together), else over the pairs."""
    values = np.asarray(values, dtype=float)
    keep = ~np.isnan(values)
    values = values[keep]
    clustered = clusters is not None and _clustered(np.asarray(clusters)[keep])
    if len(values) == 0 or np.ptp(values) == 0:
        if len(values) == 0 or values[0] == 0:
            return 1.0
        units = len(np.unique(np.asarray(clusters)[keep])) if clustered else len(values)
        return float(min(1.0, 2 * 0.5 ** units))
    rng = np.random.default_rng(seed)
    if clustered:
        draws = _cluster_means(values, np.asarray(clusters)[keep], rng, n_boot)
    else:
        draws = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    return float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean())))
