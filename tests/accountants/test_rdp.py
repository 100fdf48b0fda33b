"""RDP accountant: closed forms, dp_accounting and quadrature oracles, state, validation."""

from __future__ import annotations

import ast
import doctest
import io
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import dptorch.accountants
import dptorch.accountants.rdp
from dptorch.accountants import Accountant, RDPAccountant, create_accountant, register_accountant
from dptorch.accountants import registry as registry_module
from dptorch.accountants.analysis import DEFAULT_ORDERS, compute_rdp, rdp_to_epsilon
from dptorch.errors import DPTypeError, DPValueError

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.rdp import RdpAccountant as ReferenceRdpAccountant  # noqa: E402

DELTA = 1e-5
# dp_accounting's fractional-order series stops at a fixed absolute cutoff and drops orders
# where it does not converge, so it is only an exact oracle at integer orders; fractional
# orders are checked against numerical integration below instead.
INTEGER_ORDERS = [*range(2, 65), 80, 128, 256, 512]
GRID_Q = [1e-4, 1e-3, 0.01, 0.1, 0.5]
GRID_SIGMA = [0.5, 0.8, 1.0, 2.0, 5.0]
GRID_STEPS = [1, 100, 10_000]


@pytest.fixture(autouse=True)
def _quiet_dp_accounting() -> Iterator[None]:
    # dp_accounting logs a warning per fractional order its series fails to converge on.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _reference(events: list[tuple[float, float, int]], orders: list[float]):
    """dp_accounting's accountant after composing (sigma, q, steps) events in order."""
    reference = ReferenceRdpAccountant(orders)
    for sigma, q, steps in events:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        reference.compose(event, steps)
    return reference


def _accountant_with(history: list[tuple[float, float, int]]) -> RDPAccountant:
    accountant = RDPAccountant()
    accountant.load_state_dict({"mechanism": "rdp", "history": history})
    return accountant


# --- analysis: closed forms and oracles ---------------------------------------------------


@pytest.mark.parametrize("sigma", [0.3, 1.0, 7.5])
def test_no_subsampling_is_the_gaussian_mechanism(sigma: float) -> None:
    orders = [1.05, 1.5, 2, 2.5, 3, 10, 33.3, 64, 256, 1024]
    rdp = compute_rdp(sample_rate=1.0, noise_multiplier=sigma, steps=7, orders=orders)
    np.testing.assert_allclose(rdp, 7 * np.array(orders) / (2 * sigma**2), rtol=1e-14)


@pytest.mark.parametrize("q", GRID_Q)
@pytest.mark.parametrize("sigma", GRID_SIGMA)
def test_matches_dp_accounting_at_integer_orders(q: float, sigma: float) -> None:
    reference = _reference([(sigma, q, 1)], INTEGER_ORDERS)
    rdp = compute_rdp(sample_rate=q, noise_multiplier=sigma, steps=1, orders=INTEGER_ORDERS)
    # Both sum the same finite binomial series; ours keeps more digits when q is tiny.
    np.testing.assert_allclose(rdp, reference.rdp, rtol=1e-6, atol=1e-300)
    for steps in GRID_STEPS:
        eps, order = rdp_to_epsilon(orders=INTEGER_ORDERS, rdp=steps * rdp, delta=DELTA)
        ref_eps, ref_order = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(
            INTEGER_ORDERS, steps * reference.rdp, DELTA
        )
        assert eps == pytest.approx(ref_eps, rel=1e-3), (q, sigma, steps)
        assert order == ref_order


def _quadrature_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP of one step by 30-digit integration of the defining expectation minus 1."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(30):
        q_, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)
        z0 = s**2 * mp.log((1 - q_) / q_) + mp.mpf(0.5)

        def integrand(z):
            ratio = mp.exp((2 * z - 1) / (2 * s**2))  # mu1(z) / mu0(z)
            return mp.npdf(z, 0, s) * (((1 - q_) + q_ * ratio) ** a - 1)

        # Break points at the kink z0 and around where the integrand's mass sits.
        points = sorted({-mp.inf, z0 - 20 * s, z0, z0 + 20 * s, 1 + 4 * a * s**2, mp.inf})
        a_minus_1 = mp.quad(integrand, points)
        return float(mp.log1p(a_minus_1) / (a - 1))


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [
        (1e-4, 0.5, 1.05),
        (1e-3, 0.5, 1.05),
        (0.01, 5.0, 1.05),
        (0.1, 2.0, 1.5),
        (0.1, 1.0, 2.5),
        (0.5, 0.8, 3.3),
        (0.01, 1.0, 7.7),
        (0.02, 1.1, 33.3),
    ],
)
def test_fractional_orders_match_quadrature(q: float, sigma: float, alpha: float) -> None:
    exact = _quadrature_rdp(q, sigma, alpha)
    rdp = compute_rdp(sample_rate=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    assert rdp == pytest.approx(exact, rel=1e-9, abs=1e-300)
    assert rdp >= exact * (1 - 1e-12)  # the truncated series is padded into an upper bound


@pytest.mark.parametrize(("q", "sigma"), [(1e-3, 1.0), (0.1, 0.8), (0.5, 2.0)])
def test_fractional_orders_never_looser_than_dp_accounting(q: float, sigma: float) -> None:
    orders = [1.25, 1.5, 1.75, 2.25, 2.5, 3.5, 4.5, 7.7, 20.5]
    reference = _reference([(sigma, q, 1)], orders).rdp
    rdp = compute_rdp(sample_rate=q, noise_multiplier=sigma, steps=1, orders=orders)
    finite = np.isfinite(reference)  # dp_accounting marks orders it gave up on as inf
    assert np.all(rdp[finite] <= reference[finite] * (1 + 1e-6))


@pytest.mark.parametrize("alpha", [2, 3, 10, 64])
def test_fractional_series_agrees_with_binomial_sum_near_integers(alpha: int) -> None:
    orders = [alpha - 1e-9, alpha, alpha + 1e-9]
    rdp = compute_rdp(sample_rate=0.05, noise_multiplier=0.9, steps=1, orders=orders)
    np.testing.assert_allclose(rdp, rdp[1], rtol=1e-7)


@pytest.mark.parametrize(("q", "sigma"), [(1e-5, 0.6), (0.01, 1.0), (0.3, 0.3), (0.5, 50.0)])
def test_rdp_never_decreases_with_the_order(q: float, sigma: float) -> None:
    # Renyi divergence is nondecreasing in its order; a jump between the integer and the
    # fractional code paths would show up here.
    orders = sorted([*DEFAULT_ORDERS, 1000.5, 2048])
    rdp = compute_rdp(sample_rate=q, noise_multiplier=sigma, steps=1, orders=orders)
    assert np.all(np.isfinite(rdp)) and np.all(rdp > 0)
    assert np.all(np.diff(rdp) >= -1e-12 * rdp[1:])


def test_conversion_is_never_looser_than_the_classic_bound() -> None:
    orders = np.array(DEFAULT_ORDERS)
    rdp = compute_rdp(sample_rate=0.01, noise_multiplier=1.0, steps=1000, orders=orders)
    eps, order = rdp_to_epsilon(orders=orders, rdp=rdp, delta=DELTA)
    classic = np.min(rdp + math.log(1 / DELTA) / (orders - 1))
    assert 0 < eps < classic
    assert order in orders


def test_conversion_is_clipped_at_zero() -> None:
    # With no privacy loss and a large delta the formula goes negative at every order.
    assert rdp_to_epsilon(orders=[2.0, 512.0], rdp=[0.0, 0.0], delta=0.9) == (0.0, 2.0)


# --- the accountant -------------------------------------------------------------------------


def test_heterogeneous_history_matches_dp_accounting() -> None:
    schedule = [(1.0, 0.01, 300), (0.8, 0.02, 200), (2.0, 0.1, 50), (1.0, 0.01, 10)]
    accountant = RDPAccountant()
    for sigma, q, steps in schedule:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert accountant.history == schedule
    reference = _reference(schedule, INTEGER_ORDERS)
    eps, order = accountant.get_privacy_spent(delta=DELTA, orders=INTEGER_ORDERS)
    ref_eps, ref_order = reference.get_epsilon_and_optimal_order(DELTA)
    assert eps == pytest.approx(ref_eps, rel=1e-6)
    assert order == ref_order
    # The default orders include fractional ones, so can only be tighter.
    assert accountant.get_epsilon(DELTA) <= eps


def test_history_is_run_length_encoded() -> None:
    accountant = RDPAccountant()
    for sigma, q in [(1.0, 0.01)] * 3 + [(1.0, 0.02)] * 2 + [(1.0, 0.01)]:
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert accountant.history == [(1.0, 0.01, 3), (1.0, 0.02, 2), (1.0, 0.01, 1)]
    assert len(accountant) == 6


def test_empty_history_spends_nothing() -> None:
    accountant = RDPAccountant()
    assert len(accountant) == 0
    assert accountant.get_epsilon(DELTA) == 0.0


def test_state_dict_round_trips_through_torch_save() -> None:
    torch = pytest.importorskip("torch")
    accountant = _accountant_with([(1.0, 0.01, 500), (0.7, 0.05, 20)])
    buffer = io.BytesIO()
    torch.save(accountant.state_dict(), buffer)
    buffer.seek(0)
    restored = create_accountant("rdp")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.history == accountant.history
    assert restored.get_epsilon(DELTA) == accountant.get_epsilon(DELTA)
    for acc in (accountant, restored):
        acc.step(noise_multiplier=0.7, sample_rate=0.05)
    assert restored.history[-1] == (0.7, 0.05, 21)
    assert len(restored) == len(accountant) == 521
    assert restored.get_epsilon(DELTA) == accountant.get_epsilon(DELTA)


def test_state_of_another_mechanism_is_refused() -> None:
    with pytest.raises(DPValueError, match="'prv'"):
        RDPAccountant().load_state_dict({"mechanism": "prv", "history": [(1.0, 0.01, 5)]})


def test_create_accountant_and_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RDPAccountant.mechanism() == "rdp"
    assert isinstance(create_accountant("rdp"), RDPAccountant)
    monkeypatch.setattr(registry_module, "_ACCOUNTANTS", dict(registry_module._ACCOUNTANTS))

    class Constant(Accountant):
        @classmethod
        def mechanism(cls) -> str:
            return "constant"

        def get_epsilon(self, delta: float) -> float:
            self._check_delta(delta)
            return float(len(self))

    register_accountant("constant", Constant)
    assert isinstance(create_accountant("constant"), Constant)
    with pytest.raises(DPValueError, match="overwrite=True"):
        register_accountant("constant", RDPAccountant)
    register_accountant("constant", RDPAccountant, overwrite=True)
    assert isinstance(create_accountant("constant"), RDPAccountant)


# --- validation -----------------------------------------------------------------------------

BAD_CALLS = [
    ("noise_multiplier=-1", lambda: RDPAccountant().step(noise_multiplier=-1, sample_rate=0.1)),
    (
        "noise_multiplier=nan",
        lambda: RDPAccountant().step(noise_multiplier=math.nan, sample_rate=0.1),
    ),
    (
        "noise_multiplier=inf",
        lambda: RDPAccountant().step(noise_multiplier=math.inf, sample_rate=0.1),
    ),
    ("sample_rate=0", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=0)),
    ("sample_rate=-0.1", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=-0.1)),
    ("sample_rate=1.5", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=1.5)),
    ("sample_rate=nan", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=math.nan)),
    ("delta=0", lambda: RDPAccountant().get_epsilon(0.0)),
    ("delta=1", lambda: RDPAccountant().get_epsilon(1.0)),
    ("delta=nan", lambda: RDPAccountant().get_privacy_spent(delta=math.nan)),
    ("orders", lambda: RDPAccountant().get_epsilon(DELTA, orders=[1.0, 2.0])),
    ("orders", lambda: compute_rdp(sample_rate=0.1, noise_multiplier=1, steps=1, orders=[])),
    (
        "orders",
        lambda: compute_rdp(sample_rate=0.1, noise_multiplier=1, steps=1, orders=[math.inf]),
    ),
    ("steps=-1", lambda: compute_rdp(sample_rate=0.1, noise_multiplier=1, steps=-1, orders=[2])),
    ("steps=2.5", lambda: compute_rdp(sample_rate=0.1, noise_multiplier=1, steps=2.5, orders=[2])),  # type: ignore[arg-type]
    ("sample_rate=2", lambda: compute_rdp(sample_rate=2, noise_multiplier=1, steps=1, orders=[2])),
    ("delta=2", lambda: rdp_to_epsilon(orders=[2], rdp=[0.1], delta=2)),
    ("rdp", lambda: rdp_to_epsilon(orders=[2], rdp=[-0.1], delta=DELTA)),
    ("rdp", lambda: rdp_to_epsilon(orders=[2, 3], rdp=[0.1], delta=DELTA)),
    ("name='gdp2'", lambda: create_accountant("gdp2")),
    ("name='rdp'", lambda: register_accountant("rdp", RDPAccountant)),
    ("state['history'][1]", lambda: _accountant_with([(1.0, 0.1, 3), (1.0, 0.1, -3)])),
    ("state['history']", lambda: RDPAccountant().load_state_dict({"mechanism": "rdp"})),
]


@pytest.mark.parametrize(("fragment", "call"), BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
def test_bad_input_raises_dp_value_error_naming_it(fragment: str, call) -> None:
    with pytest.raises(DPValueError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert fragment in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(DPValueError) as info:
        RDPAccountant().step(noise_multiplier=-1.0, sample_rate=3.0)
    assert "noise_multiplier=-1.0" in str(info.value)
    assert "sample_rate=3.0" in str(info.value)


def test_non_numbers_raise_dp_type_error() -> None:
    with pytest.raises(DPTypeError, match="noise_multiplier='1'"):
        RDPAccountant().step(noise_multiplier="1", sample_rate=0.1)  # type: ignore[arg-type]
    with pytest.raises(DPTypeError, match="Accountant"):
        register_accountant("x", dict)  # type: ignore[arg-type]


def test_known_accountants_are_listed_for_unknown_names() -> None:
    with pytest.raises(DPValueError, match="'rdp'"):
        create_accountant("renyi")


# --- behaviour over ranges ------------------------------------------------------------------


def _epsilon(sigma: float, q: float, steps: int) -> float:
    return _accountant_with([(sigma, q, steps)]).get_epsilon(DELTA)


def test_epsilon_grows_with_steps_and_q_and_shrinks_with_sigma() -> None:
    by_steps = [_epsilon(1.0, 0.01, n) for n in (1, 10, 100, 1000, 10_000)]
    by_q = [_epsilon(1.0, q, 1000) for q in (1e-4, 1e-3, 0.01, 0.1, 1.0)]
    by_sigma = [_epsilon(s, 0.01, 1000) for s in (0.5, 0.8, 1.0, 2.0, 5.0)]
    assert np.all(np.diff(by_steps) > 0)
    assert np.all(np.diff(by_q) > 0)
    assert np.all(np.diff(by_sigma) < 0)


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [
        (50.0, 1e-6, 1_000_000),
        (0.3, 1.0, 1),
        (0.3, 1.0, 1_000_000),
        (0.3, 0.5, 1000),
        (50.0, 1.0, 1),
    ],
)
def test_edge_cases_are_finite_and_non_negative(sigma: float, q: float, steps: int) -> None:
    rdp = compute_rdp(sample_rate=q, noise_multiplier=sigma, steps=steps, orders=DEFAULT_ORDERS)
    assert np.all(np.isfinite(rdp)) and np.all(rdp >= 0)
    eps, order = _accountant_with([(sigma, q, steps)]).get_privacy_spent(delta=DELTA)
    assert math.isfinite(eps) and eps >= 0 and order in DEFAULT_ORDERS


def test_a_step_without_noise_makes_epsilon_infinite() -> None:
    accountant = _accountant_with([(1.0, 0.01, 100)])
    accountant.step(noise_multiplier=0.0, sample_rate=0.01)
    assert accountant.get_epsilon(DELTA) == math.inf


# --- packaging ------------------------------------------------------------------------------


def test_package_never_imports_torch() -> None:
    root = Path(dptorch.accountants.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "torch" for m in modules), path


def test_docstring_examples_run() -> None:
    result = doctest.testmod(dptorch.accountants.rdp)
    assert result.attempted > 0 and result.failed == 0
