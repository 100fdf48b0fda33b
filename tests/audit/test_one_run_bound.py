"""The one-run bound (arXiv 2305.08846, Theorem 5.2) against closed forms and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptorch.audit import (
    one_run_epsilon_lower_bound,
    one_run_lower_bound_from_scores,
    one_run_p_value,
)
from dptorch.audit.one_run_bound import DEFAULT_GUESS_FRACTIONS, count_correct_guesses
from dptorch.errors import DPValueError


def test_p_value_at_epsilon_zero_is_the_fair_coin_tail() -> None:
    # eps = 0, delta = 0: every guess is a fair coin, P[10 of 10 right] = 2^-10.
    p = one_run_p_value(num_canaries=10, num_guesses=10, num_correct=10, epsilon=0.0, delta=0.0)
    assert p == pytest.approx(2.0**-10, rel=1e-12)
    # P[Bin(10, 1/2) >= 8] = (45 + 10 + 1) / 1024.
    p = one_run_p_value(num_canaries=10, num_guesses=10, num_correct=8, epsilon=0.0, delta=0.0)
    assert p == pytest.approx(56 / 1024, rel=1e-12)


def test_delta_term_matches_the_theorem_by_hand() -> None:
    # r = v = 2, eps = 0: tail 1/4; the max over i of P[2 - i <= Bin < 2] / i is
    # max(P[Bin = 1] / 1, (P[Bin = 1] + P[Bin = 0]) / 2) = max(1/2, 3/8) = 1/2.
    p = one_run_p_value(num_canaries=5, num_guesses=2, num_correct=2, epsilon=0.0, delta=0.01)
    assert p == pytest.approx(0.25 + 2 * 5 * 0.01 * 0.5, rel=1e-12)


def test_perfect_guesses_give_the_closed_form_bound() -> None:
    # delta = 0 and v = r: p-value p_eps^r, so eps_lb = logit(alpha^(1/r)).
    for guesses, confidence in [(100, 0.95), (1000, 0.95), (500, 0.99)]:
        accuracy = (1 - confidence) ** (1 / guesses)
        expected = math.log(accuracy / (1 - accuracy))
        got = one_run_epsilon_lower_bound(
            num_canaries=guesses,
            num_guesses=guesses,
            num_correct=guesses,
            delta=0.0,
            confidence=confidence,
        )
        assert got == pytest.approx(expected, abs=1e-5)


def test_random_guessing_rejects_nothing() -> None:
    assert (
        one_run_epsilon_lower_bound(num_canaries=1000, num_guesses=500, num_correct=250, delta=1e-5)
        == 0.0
    )
    assert (
        one_run_epsilon_lower_bound(num_canaries=10, num_guesses=0, num_correct=0, delta=1e-5)
        == 0.0
    )


def test_bound_grows_with_correct_guesses_and_shrinks_with_confidence() -> None:
    by_correct = [
        one_run_epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=v, delta=1e-5)
        for v in (120, 150, 180, 200)
    ]
    assert by_correct == sorted(by_correct) and by_correct[0] < by_correct[-1]
    by_confidence = [
        one_run_epsilon_lower_bound(
            num_canaries=1000, num_guesses=200, num_correct=180, delta=1e-5, confidence=c
        )
        for c in (0.5, 0.9, 0.95, 0.99, 0.999)
    ]
    assert by_confidence == sorted(by_confidence, reverse=True)
    assert by_confidence[0] > by_confidence[-1]


def test_delta_only_weakens_the_bound() -> None:
    kwargs = {"num_canaries": 1000, "num_guesses": 200, "num_correct": 190}
    assert one_run_epsilon_lower_bound(**kwargs, delta=1e-3) < one_run_epsilon_lower_bound(
        **kwargs, delta=0.0
    )


def test_p_value_is_valid_for_randomized_response() -> None:
    """An exactly eps-DP guesser (each guess right w.p. e^eps / (1 + e^eps)) is rejected at
    its own eps at most 5% of the time. 4000 simulated audits, seed 0: the rejection rate's
    standard error is 0.0035, so 0.065 leaves over 4 of them."""
    rng = np.random.default_rng(0)
    epsilon, guesses = 1.0, 200
    correct = rng.binomial(guesses, 1 / (1 + math.exp(-epsilon)), size=4000)
    p_values = [
        one_run_p_value(
            num_canaries=guesses, num_guesses=guesses, num_correct=int(v), epsilon=epsilon, delta=0
        )
        for v in correct
    ]
    rate = float(np.mean(np.asarray(p_values) < 0.05))
    assert 0.01 < rate <= 0.065  # also not absurdly conservative


def test_count_correct_guesses_by_hand() -> None:
    scores = [5.0, -1.0, 3.0, 0.0, 2.0, -3.0]
    included = [True, False, False, True, True, False]
    # Top 2: ids 0 (in, right), 2 (out, wrong); bottom 2: ids 5 (out, right), 1 (out, right).
    assert count_correct_guesses(scores, included, 2) == (4, 3)
    assert count_correct_guesses(scores, included, 0) == (0, 0)
    with pytest.raises(DPValueError, match="per_side"):
        count_correct_guesses(scores, included, 4)
    with pytest.raises(DPValueError, match="shape"):
        count_correct_guesses(scores, included[:-1], 1)


def test_from_scores_union_bounds_the_guess_counts() -> None:
    m = 1000
    included = np.arange(m) % 2 == 0
    scores = included.astype(float)  # perfectly separated
    bound = one_run_lower_bound_from_scores(scores, included, delta=1e-5)
    per_test = 1 - 0.05 / len(DEFAULT_GUESS_FRACTIONS)
    expected = one_run_epsilon_lower_bound(
        num_canaries=m, num_guesses=900, num_correct=900, delta=1e-5, confidence=per_test
    )
    assert bound.epsilon == pytest.approx(expected)
    assert (bound.num_guesses, bound.num_correct, bound.guesses_per_side) == (900, 900, 450)
    assert bound.alpha == pytest.approx(0.01)


def test_from_scores_of_pure_noise_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    bound = one_run_lower_bound_from_scores(rng.normal(size=1000), included, delta=1e-5)
    assert bound.epsilon < 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": 1.0}, "confidence"),
        ({"guess_fractions": (0.7,)}, "guess_fractions"),
        ({"guess_fractions": ()}, "guess_fractions"),
    ],
)
def test_from_scores_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(DPValueError, match=match):
        one_run_lower_bound_from_scores([1.0, 0.0], [True, False], delta=1e-5, **kwargs)


def test_p_value_refuses_impossible_counts() -> None:
    with pytest.raises(DPValueError, match="num_correct <= num_guesses"):
        one_run_p_value(num_canaries=5, num_guesses=6, num_correct=1, epsilon=1.0, delta=0.0)
    with pytest.raises(DPValueError, match="epsilon"):
        one_run_p_value(num_canaries=5, num_guesses=5, num_correct=1, epsilon=-1.0, delta=0.0)
