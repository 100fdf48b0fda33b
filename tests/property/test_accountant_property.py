"""Hypothesis: accountants over their arguments.

Epsilon must be a finite, non-negative number that grows with the steps and the sample
rate and shrinks with the noise and delta; the order of the steps must not matter; state
dicts must round-trip; calibration must meet its target; and every out-of-range argument
must be refused with a DPError, never answered.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dptorch.accountants import create_accountant, get_noise_multiplier
from dptorch.errors import DPError

sigmas = st.floats(0.5, 5.0)
rates = st.floats(1e-4, 0.5)
steps = st.integers(1, 2_000)
deltas = st.floats(1e-9, 1e-3)
pytestmark = pytest.mark.filterwarnings("ignore:GaussianAccountant:dptorch.DPWarning")
# PRV's epsilon is a numerical upper bound on a grid: allow it a small relative slack.
SLACK = {"rdp": 1e-9, "prv": 2e-3}


def _epsilon(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = create_accountant(mechanism)
    accountant.load_state_dict({"mechanism": mechanism, "history": history})
    return accountant.get_epsilon(delta)


def _leq(a: float, b: float, mechanism: str) -> bool:
    return a <= b * (1 + SLACK[mechanism]) + 1e-9


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
@settings(max_examples=25, deadline=None)
@given(sigma=sigmas, q=rates, n=steps, delta=deltas)
def test_epsilon_is_monotone_in_every_argument(
    mechanism: str, sigma: float, q: float, n: int, delta: float
) -> None:
    eps = _epsilon(mechanism, [(sigma, q, n)], delta)
    assert math.isfinite(eps) and eps >= 0
    assert _leq(eps, _epsilon(mechanism, [(sigma, q, 2 * n)], delta), mechanism)
    assert _leq(_epsilon(mechanism, [(sigma * 1.5, q, n)], delta), eps, mechanism)
    assert _leq(_epsilon(mechanism, [(sigma, q / 2, n)], delta), eps, mechanism)
    assert _leq(_epsilon(mechanism, [(sigma, q, n)], min(delta * 10, 0.5)), eps, mechanism)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
@settings(max_examples=15, deadline=None)
@given(a=st.tuples(sigmas, rates, steps), b=st.tuples(sigmas, rates, steps), delta=deltas)
def test_the_order_of_steps_does_not_matter(
    mechanism: str, a: tuple[float, float, int], b: tuple[float, float, int], delta: float
) -> None:
    forward = _epsilon(mechanism, [a, b], delta)
    backward = _epsilon(mechanism, [b, a], delta)
    assert forward == pytest.approx(backward, rel=SLACK[mechanism], abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(sigma=sigmas, q=rates, n=st.integers(1, 50), delta=deltas)
def test_stepping_one_by_one_equals_loading_the_history(
    sigma: float, q: float, n: int, delta: float
) -> None:
    accountant = create_accountant("rdp")
    for _ in range(n):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert accountant.history == [(sigma, q, n)]
    again = create_accountant("rdp")
    again.load_state_dict(accountant.state_dict())
    assert again.get_epsilon(delta) == accountant.get_epsilon(delta)


@settings(max_examples=15, deadline=None)
@given(target=st.floats(0.5, 10.0), q=st.floats(1e-3, 0.1), n=st.integers(10, 3_000), delta=deltas)
def test_calibrated_noise_meets_the_target(target: float, q: float, n: int, delta: float) -> None:
    try:
        sigma = get_noise_multiplier(
            target_epsilon=target, target_delta=delta, sample_rate=q, steps=n, accountant="rdp"
        )
    except DPError:
        return  # a target out of reach is refused, which is also a correct answer
    assert _epsilon("rdp", [(sigma, q, n)], delta) <= target * (1 + 1e-9)


bad_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 < v <= 1),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(
    mechanism=st.sampled_from(["rdp", "prv", "gdp"]),
    sigma=st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.none()),
    q=bad_floats,
)
def test_out_of_range_steps_are_refused_with_a_dp_error(
    mechanism: str, sigma: object, q: object
) -> None:
    accountant = create_accountant(mechanism)
    with pytest.raises(DPError):
        accountant.step(noise_multiplier=sigma, sample_rate=q)  # type: ignore[arg-type]
    assert accountant.history == []


@settings(max_examples=40, deadline=None)
@given(
    mechanism=st.sampled_from(["rdp", "prv", "gdp"]),
    delta=st.one_of(st.floats().filter(lambda d: not 0 < d < 1), st.text(max_size=2), st.none()),
)
def test_out_of_range_deltas_are_refused(mechanism: str, delta: object) -> None:
    accountant = create_accountant(mechanism)
    accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    with pytest.raises(DPError):
        accountant.get_epsilon(delta)  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(
    history=st.one_of(
        st.text(max_size=5),
        st.lists(st.tuples(st.floats(), st.floats(), st.integers()), max_size=3),
    )
)
def test_damaged_histories_are_refused_or_valid(history: object) -> None:
    accountant = create_accountant("rdp")
    try:
        accountant.load_state_dict({"mechanism": "rdp", "history": history})
    except DPError:
        assert accountant.history == []  # refused: nothing loaded
        return
    assume(accountant.history)
    eps = accountant.get_epsilon(1e-5)
    assert not math.isnan(eps) and eps >= 0  # inf only for a step with sigma = 0


@pytest.mark.parametrize("mechanism", ["rdp", "prv", "gdp"])
@pytest.mark.parametrize("sigma", [5e-324, 8.819375589417794e-292, 1.7976931348623157e308])
def test_noise_multipliers_whose_square_under_or_overflows_are_refused(
    mechanism: str, sigma: float
) -> None:
    # Found by hypothesis in test_damaged_histories_are_refused_or_valid: such a sigma in a
    # loaded history made get_epsilon raise ZeroDivisionError or OverflowError.
    accountant = create_accountant(mechanism)
    with pytest.raises(DPError, match="noise_multiplier"):
        accountant.step(noise_multiplier=sigma, sample_rate=0.5)
    with pytest.raises(DPError, match="noise_multiplier"):
        accountant.load_state_dict({"mechanism": mechanism, "history": [(sigma, 0.5, 1)]})
    assert accountant.history == []
