"""Every direction's per-layer metric has a shuffled-label null beside it, and the report draws every model's
curve over that band in one figure."""

import numpy as np
import pytest
import torch

from emlens.analysis.direction_figures import layer_metrics_figure
from emlens.directions.fit import fit_direction
from emlens.directions.fitting import shuffled_labels


def activations(n: int = 40, d: int = 16, signal: float = 3.0, seed: int = 0):
    """Layer 0 holds the label along one axis; layer 1 is noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat([1, 0], n // 2)
    noise = rng.normal(size=(2, n, d))
    noise[0, :, 0] += signal * y
    return {f"blocks.{layer}.hook_resid_post": torch.tensor(noise[layer]) for layer in (0, 1)}, y


@pytest.mark.parametrize("method", ["diff_of_means", "logistic"])
def test_a_planted_signal_clears_the_shuffled_null_and_noise_stays_in_it(method):
    acts, y = activations()
    metrics = fit_direction(acts, y, method=method).metrics().set_index("layer")
    assert metrics.loc[0, "auroc"] > 0.95 > metrics.loc[0, "auroc_null_high"]
    assert metrics.loc[1, "auroc_null_low"] < 0.5 < metrics.loc[1, "auroc_null_high"]
    assert metrics.loc[0, "auroc_null_low"] <= metrics.loc[0, "auroc_null"] <= metrics.loc[0, "auroc_null_high"]


def test_a_regression_has_an_r2_null():
    acts, y = activations()
    score = y * 50.0 + np.random.default_rng(1).normal(size=len(y))
    metrics = fit_direction(acts, score, method="ridge", regularization=1.0).metrics().set_index("layer")
    assert metrics.loc[0, "r2"] > 0.5 > metrics.loc[0, "r2_null_high"]


def test_paired_labels_are_shuffled_within_their_pairs():
    y = np.array([1, 0] * 6)
    pairs = np.repeat(np.arange(6), 2)
    shuffled = shuffled_labels(y, pairs, np.random.default_rng(0))
    assert (shuffled.reshape(6, 2).sum(1) == 1).all() and not (shuffled == y).all()
    assert sorted(shuffled_labels(y, np.arange(12), np.random.default_rng(0))) == sorted(y)


def test_every_model_is_one_curve_of_one_figure(tmp_path):
    fits = {name: fit_direction(*activations(seed=seed)) for seed, name in enumerate(["base", "insecure", "secure"])}
    path = layer_metrics_figure(fits, tmp_path / "direction.png", "planted")
    assert path.stat().st_size > 5000
