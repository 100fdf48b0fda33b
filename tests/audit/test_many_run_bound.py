"""The many-run Clopper-Pearson bound against closed forms and scipy's exact intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dptorch.audit import clopper_pearson_upper, many_run_lower_bound_from_scores
from dptorch.errors import DPValueError


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (7, 50), (49, 50)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int) -> None:
    # A two-sided 90% exact interval's upper end is the one-sided 95% upper bound.
    reference = stats.binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high
    assert clopper_pearson_upper(k, n, 0.05) == pytest.approx(reference, rel=1e-9)


def test_clopper_pearson_closed_forms() -> None:
    assert clopper_pearson_upper(0, 20, 0.05) == pytest.approx(1 - 0.05 ** (1 / 20))
    assert clopper_pearson_upper(20, 20, 0.05) == 1.0
    with pytest.raises(DPValueError, match="successes"):
        clopper_pearson_upper(3, 2, 0.05)
    with pytest.raises(DPValueError, match="alpha"):
        clopper_pearson_upper(1, 2, 1.5)


def test_perfect_separation_with_a_fixed_threshold() -> None:
    # No errors on n runs per side: FPR_u = FNR_u = 1 - alpha'^(1/n), alpha' = 0.05 / 2.
    n, delta = 100, 1e-5
    bound = many_run_lower_bound_from_scores(
        np.ones(n), np.zeros(n), delta=delta, confidence=0.95, thresholds=[0.5]
    )
    rate = 1 - 0.025 ** (1 / n)
    assert bound.epsilon == pytest.approx(math.log((1 - delta - rate) / rate))
    assert bound.threshold == 0.5 and bound.alpha == pytest.approx(0.025)


def test_union_bound_over_given_thresholds_costs_confidence() -> None:
    one = many_run_lower_bound_from_scores(np.ones(100), np.zeros(100), delta=0, thresholds=[0.5])
    many = many_run_lower_bound_from_scores(
        np.ones(100), np.zeros(100), delta=0, thresholds=[0.2, 0.5, 0.8, 2.0]
    )
    assert many.epsilon < one.epsilon
    assert many.alpha == pytest.approx(0.05 / 8)


def test_default_picks_the_threshold_on_half_and_tests_on_the_other_half() -> None:
    # Perfect separation: the bound is that of a fixed threshold on the second halves.
    rng = np.random.default_rng(0)
    inside, outside = rng.uniform(10, 11, 100), rng.uniform(0, 1, 100)
    bound = many_run_lower_bound_from_scores(inside, outside, delta=0)
    rate = 1 - 0.025 ** (1 / 50)
    assert bound.epsilon == pytest.approx(math.log((1 - rate) / rate))
    # The midpoint between the largest "out" and smallest "in" score of the first halves.
    assert bound.threshold == pytest.approx((outside[:50].max() + inside[:50].min()) / 2)


def test_same_distribution_gives_no_bound() -> None:
    rng = np.random.default_rng(0)
    bound = many_run_lower_bound_from_scores(rng.normal(size=500), rng.normal(size=500), delta=1e-5)
    assert bound.epsilon < 0.3


def test_bound_stays_below_the_true_epsilon_of_a_gaussian_mechanism() -> None:
    """Scores N(mu, 1) vs N(0, 1) are a Gaussian mechanism; mu = 1 is (1.0, 0.127)-DP
    (Balle & Wang 2018 exact curve), so no honest bound at delta = 0.127 exceeds 1.0."""
    mu, epsilon = 1.0, 1.0
    delta = stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(
        -epsilon / mu - mu / 2
    )
    for seed in range(3):
        rng = np.random.default_rng(seed)
        bound = many_run_lower_bound_from_scores(
            rng.normal(mu, 1, 2000), rng.normal(0, 1, 2000), delta=delta
        )
        assert 0.2 < bound.epsilon <= epsilon


def test_refuses_too_few_runs_and_bad_levels() -> None:
    with pytest.raises(DPValueError, match="at least 2 runs"):
        many_run_lower_bound_from_scores([1.0], [0.0, 1.0], delta=0)
    with pytest.raises(DPValueError, match="confidence"):
        many_run_lower_bound_from_scores([1.0, 2.0], [0.0, 1.0], delta=0, confidence=0)
    with pytest.raises(DPValueError, match="delta"):
        many_run_lower_bound_from_scores([1.0, 2.0], [0.0, 1.0], delta=1.0)
