"""PRV (privacy loss distribution) accountant: dp_accounting oracle, RDP bound, edge cases."""

from __future__ import annotations

import math

import pytest

from dptorch.accountants.analysis.pld import (
    compose_subsampled_gaussian,
    delta_from_pld,
    epsilon_from_pld,
)
from dptorch.accountants.prv import PRVAccountant
from dptorch.accountants.rdp import RDPAccountant
from dptorch.errors import DPValueError

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import PLDAccountant as ReferencePLDAccountant  # noqa: E402

# Stated error: ours is at most 1% above dp_accounting's fine pessimistic PLD, and below it
# by no more than dp_accounting's own discretisation slack (its grid of 1e-4 is pessimistic
# too, so the exact value may lie up to about one of its grid steps below it).
MAX_ABOVE = 0.01
MAX_BELOW = 2e-3
REFERENCE_INTERVAL = 1e-4  # dp_accounting's loss grid: its absolute slack

# (sigma, q, steps), pruned from q in {1e-3, 1e-2, 0.1, 1}, sigma in {0.6, 1, 2},
# steps in {1, 100, 1000, 10000} to keep dp_accounting's runtime small.
GRID = [
    (0.6, 0.001, 1),
    (0.6, 0.001, 10000),
    (1.0, 0.001, 1000),
    (2.0, 0.001, 100),
    (0.6, 0.01, 100),
    (1.0, 0.01, 10000),
    (2.0, 0.01, 1000),
    (0.6, 0.1, 1),
    (1.0, 0.1, 1000),
    (2.0, 0.1, 10000),
    (0.6, 1.0, 100),
    (1.0, 1.0, 1),
    (2.0, 1.0, 1000),
]


def reference_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = ReferencePLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def prv(history: list[tuple[float, float, int]]) -> PRVAccountant:
    accountant = PRVAccountant()
    accountant.load_state_dict({"mechanism": "prv", "history": history})
    return accountant


def assert_close_above(ours: float, reference: float) -> None:
    assert ours <= reference * (1 + MAX_ABOVE) + 1e-9, (ours, reference)
    assert ours >= reference * (1 - MAX_BELOW) - REFERENCE_INTERVAL, (ours, reference)


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_matches_dp_accounting(sigma: float, q: float, steps: int) -> None:
    accountant = prv([(sigma, q, steps)])
    for delta in (1e-5, 1e-7):
        assert_close_above(
            accountant.get_epsilon(delta), reference_epsilon([(sigma, q, steps)], delta)
        )


def test_heterogeneous_history_matches_dp_accounting() -> None:
    history = [(1.0, 0.01, 300), (0.8, 0.02, 200), (2.0, 0.05, 50), (1.0, 0.01, 100)]
    for delta in (1e-5, 1e-7):
        assert_close_above(prv(history).get_epsilon(delta), reference_epsilon(history, delta))


def test_opacus_gdp_counterexample_point() -> None:
    # Opacus's GDP accountant underestimates here; the tight value is about 1.43.
    ours = prv([(0.6, 0.001, 1000)]).get_epsilon(1e-5)
    assert ours == pytest.approx(1.4253, abs=2e-3)
    assert_close_above(ours, reference_epsilon([(0.6, 0.001, 1000)], 1e-5))


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_tighter_than_rdp(sigma: float, q: float, steps: int) -> None:
    rdp = RDPAccountant()
    rdp.load_state_dict({"mechanism": "rdp", "history": [(sigma, q, steps)]})
    for delta in (1e-5, 1e-7):
        assert prv([(sigma, q, steps)]).get_epsilon(delta) <= rdp.get_epsilon(delta)


def test_empty_and_noiseless() -> None:
    accountant = PRVAccountant()
    assert accountant.get_epsilon(1e-5) == 0.0
    assert accountant.get_delta(1.0) == 0.0
    assert PRVAccountant.mechanism() == "prv"
    accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    accountant.step(noise_multiplier=0.0, sample_rate=0.01)
    assert accountant.get_epsilon(1e-5) == math.inf
    assert accountant.get_delta(10.0) == 1.0


def test_state_dict_round_trip_keeps_counting() -> None:
    accountant = PRVAccountant()
    for _ in range(50):
        accountant.step(noise_multiplier=1.0, sample_rate=0.02)
    restored = PRVAccountant()
    restored.load_state_dict(accountant.state_dict())
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    for _ in range(50):
        restored.step(noise_multiplier=1.0, sample_rate=0.02)
    assert restored.history == [(1.0, 0.02, 100)]
    assert restored.get_epsilon(1e-5) == prv([(1.0, 0.02, 100)]).get_epsilon(1e-5)
    assert restored.get_epsilon(1e-5) > accountant.get_epsilon(1e-5)


def test_cache_is_invalidated_by_new_steps() -> None:
    accountant = prv([(1.0, 0.01, 100)])
    first = accountant.get_epsilon(1e-5)
    assert accountant.get_epsilon(1e-5) == first
    accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    assert accountant.get_epsilon(1e-5) > first


@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_get_delta_inverts_get_epsilon(delta: float) -> None:
    accountant = prv([(1.0, 0.01, 1000)])
    assert accountant.get_delta(accountant.get_epsilon(delta)) == pytest.approx(delta, rel=1e-6)


def test_eps_error_refines_and_stays_pessimistic() -> None:
    accountant = prv([(1.0, 0.01, 1000)])
    coarse = accountant.get_epsilon(1e-5)
    fine = accountant.get_epsilon(1e-5, eps_error=1e-4)
    assert coarse - 1e-3 <= fine <= coarse
    with pytest.raises(DPValueError, match="eps_error"):
        accountant.get_epsilon(1e-5, eps_error=0.0)


def test_invalid_arguments() -> None:
    accountant = prv([(1.0, 0.01, 10)])
    with pytest.raises(DPValueError, match="delta"):
        accountant.get_epsilon(0.0)
    with pytest.raises(DPValueError, match="epsilon"):
        accountant.get_delta(-1.0)


def check_edge(sigma: float, q: float, steps: int) -> None:
    plds = compose_subsampled_gaussian([(sigma, q, steps)])
    previous = math.inf
    for delta in (1e-12, 1e-9, 1e-5, 0.1):  # epsilon must not increase with delta
        try:
            epsilon = epsilon_from_pld(plds, delta)
        except DPValueError as exc:
            assert "numerical floor" in str(exc)
            continue
        assert epsilon >= 0 and not math.isnan(epsilon)
        assert epsilon <= previous * (1 + 1e-9)
        previous = epsilon
        if math.isfinite(epsilon):
            assert 0 <= delta_from_pld(plds, epsilon) <= delta * (1 + 1e-6)


EDGE_FAST = [
    (0.3, 1e-6, 1),
    (0.3, 1e-3, 1000),
    (0.3, 1.0, 1),
    (0.3, 1.0, 1000),
    (1.0, 1e-3, 1),
    (1.0, 1.0, 1000),
    (50.0, 1e-6, 1),
    (50.0, 1e-6, 1000),
    (50.0, 1e-3, 1_000_000),
    (50.0, 1.0, 1_000_000),
    (0.3, 1e-3, 1_000_000),
]
EDGE_SLOW = [
    (0.3, 1.0, 1_000_000),
    (1.0, 1.0, 1_000_000),
    (1.0, 1e-6, 1_000_000),
    (50.0, 1e-6, 1_000_000),
]


@pytest.mark.parametrize(("sigma", "q", "steps"), EDGE_FAST)
def test_edge_cases_finite_or_clear_error(sigma: float, q: float, steps: int) -> None:
    check_edge(sigma, q, steps)


@pytest.mark.slow
@pytest.mark.parametrize(("sigma", "q", "steps"), EDGE_SLOW)
def test_edge_cases_long_histories(sigma: float, q: float, steps: int) -> None:
    check_edge(sigma, q, steps)


def test_no_subsampling_matches_gaussian_closed_form() -> None:
    # q = 1: T steps of N(0, sigma^2) are one Gaussian mechanism with mu = sqrt(T) / sigma,
    # delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (arXiv 1905.02383).
    mu = math.sqrt(100) / 2.0
    epsilon = prv([(2.0, 1.0, 100)]).get_epsilon(1e-5)

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    exact = phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * phi(-epsilon / mu - mu / 2)
    assert exact <= 1e-5 * (1 + 1e-6)
    assert exact >= 1e-5 * 0.95  # tight: epsilon is barely above the exact one


def test_composition_is_the_same_however_the_history_is_split_or_ordered() -> None:
    # One circular FFT composes the whole history: splitting a run into pieces, or
    # reordering entries, multiplies the same spectra and must not move epsilon.
    whole = prv([(1.0, 0.01, 300), (2.0, 0.05, 40)]).get_epsilon(1e-6)
    split = prv([(2.0, 0.05, 20), (1.0, 0.01, 100), (2.0, 0.05, 20), (1.0, 0.01, 200)])
    assert split.get_epsilon(1e-6) == pytest.approx(whole, rel=1e-9)
