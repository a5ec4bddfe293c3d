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


def test_auroc_is_sklearns_with_ties():
    from sklearn.metrics import roc_auc_score

    from emlens.directions.fitting import auroc

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 30)
        y[:2] = [0, 1]
        scores = rng.integers(0, 6, 30).astype(float)  # many ties
        assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_layers_fitted_across_processes_give_what_a_loop_gives(monkeypatch):
    """fit_sites spreads the layers over the cores; every fit is seeded by its own arguments, so one process gives
    the same tensors and table."""
    from emlens.directions import fitting

    rng = np.random.default_rng(0)
    y, groups = np.repeat([1, 0], 20), np.arange(40)
    acts = {f"blocks.{layer}.hook_resid_post": rng.normal(size=(40, 8)) + layer * y[:, None] for layer in range(4)}
    monkeypatch.setattr(fitting.os, "sched_getaffinity", lambda pid: {0, 1})
    spread = fitting.fit_sites(acts, y, groups, None, "logistic")
    monkeypatch.setattr(fitting, "MAX_FIT_WORKERS", 1)
    looped = fitting.fit_sites(acts, y, groups, None, "logistic")
    assert all(np.array_equal(spread[0][key], looped[0][key]) for key in looped[0])
    assert spread[1].equals(looped[1]) and spread[1].auroc.iloc[-1] > 0.9
