"""Rates with sample sizes and bootstrap confidence intervals; correlations with CIs."""

from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_ci(values, statistic=np.mean, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over the values (NaNs dropped)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = statistic(values[rng.integers(0, len(values), size=(n_boot, len(values)))], axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def rate(flags, seed: int = 0) -> dict:
    """A proportion with its n and bootstrap 95 % CI."""
    values = np.asarray(flags, dtype=float)
    values = values[~np.isnan(values)]
    low, high = bootstrap_ci(values, seed=seed)
    return {"rate": float(values.mean()) if len(values) else float("nan"), "n": int(len(values)),
            "ci_low": low, "ci_high": high}


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
