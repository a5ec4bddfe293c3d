"""Confidence intervals that mean what they say: Wilson's interval for single proportions, a bootstrap over
questions where samples cluster (checked by simulation), Benjamini-Hochberg across the rows of a table."""

import numpy as np
import pytest
from scipy import stats

from emlens.base.stats import benjamini_hochberg, bootstrap_ci, bootstrap_p, rate, wilson_ci


def test_wilson_is_not_degenerate_at_zero():
    assert wilson_ci(0, 24) == pytest.approx((0.0, 0.1380), abs=1e-4)
    found = rate(np.zeros(24))
    assert (found["rate"], found["n"]) == (0.0, 24)
    assert (found["ci_low"], found["ci_high"]) == pytest.approx((0.0, 0.138), abs=1e-3)
    one = rate([1.0, 0.0, 1.0, float("nan")])
    assert one["n"] == 3 and (one["ci_low"], one["ci_high"]) == pytest.approx(wilson_ci(2, 3))


def test_a_rate_over_few_questions_gets_its_interval_from_the_questions():
    """8 questions x 50 samples: zero misaligned answers bound the rate by 8 questions, not 400 samples."""
    questions = np.repeat(np.arange(8), 50)
    zero = rate(np.zeros(400), clusters=questions)
    assert zero["n"] == 400 and zero["ci_high"] == pytest.approx(wilson_ci(0, 8)[1])
    assert wilson_ci(0, 400)[1] < 0.01 < zero["ci_high"]


def test_the_question_bootstrap_covers_the_true_rate_where_the_sample_bootstrap_does_not():
    """Each question has its own rate (Beta(2, 6), mean 0.25); 8 questions x 50 samples per study. Over 300
    simulated studies the interval over questions covers 0.25 near its 95 %; resampling samples one by one
    covers it far less often (the issue measured 42 %)."""
    rng = np.random.default_rng(0)
    questions = np.repeat(np.arange(8), 50)
    covered = {"questions": 0, "samples": 0}
    for study in range(300):
        flags = (rng.random(400) < np.repeat(rng.beta(2, 6, size=8), 50)).astype(float)
        low, high = bootstrap_ci(flags, clusters=questions, seed=study, n_boot=1000)
        covered["questions"] += low <= 0.25 <= high
        low, high = bootstrap_ci(flags, seed=study, n_boot=1000)
        covered["samples"] += low <= 0.25 <= high
    assert covered["questions"] / 300 > 0.85, covered
    assert covered["samples"] / 300 < 0.65, covered


def test_benjamini_hochberg_matches_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.5, 0.001])
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p))


def test_pairs_that_all_moved_alike_get_the_exact_sign_flip_p():
    """Every pair moved by one: a bootstrap has nothing to resample, and returning 1 called a steering that flipped
    all 40 answers 'not distinguishable from the control' while 40 flips and 10 ties were significant."""
    assert bootstrap_p(np.full(5, 1.0)) == pytest.approx(2 / 2 ** 5)
    assert bootstrap_p(np.full(40, 1.0)) < 1e-6
    assert bootstrap_p(np.full(40, 1.0), clusters=np.repeat(np.arange(4), 10)) == pytest.approx(2 / 2 ** 4)
    assert bootstrap_p(np.zeros(40)) == 1.0 and bootstrap_p(np.ones(1)) == 1.0
    assert bootstrap_p(np.r_[np.full(40, 1.0), np.zeros(10)]) < 0.01
    assert bootstrap_p(np.r_[np.full(10, 1.0), -np.ones(10)]) > 0.5
