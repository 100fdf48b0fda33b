"""Noise calibration: never overshoots, lands within tolerance, and validates its inputs."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptorch.accountants import create_accountant, register_accountant
from dptorch.accountants import registry as registry_module
from dptorch.accountants.calibration import (
    check_delta_against_dataset,
    get_noise_multiplier,
    steps_for_epochs,
)
from dptorch.accountants.gdp import GaussianAccountant
from dptorch.errors import DPTypeError, DPValueError, DPWarning

DELTA = 1e-5


def _epsilon(name: str, sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    accountant = create_accountant(name)
    accountant.load_state_dict(
        {"mechanism": accountant.mechanism(), "history": [(sigma, q, steps)]}
    )
    return accountant.get_epsilon(delta)


@settings(max_examples=25, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(1e-3, 0.1),
    steps=st.integers(10, 2000),
)
def test_never_overshoots_and_is_within_tolerance(target: float, q: float, steps: int) -> None:
    sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
    )
    eps = _epsilon("rdp", sigma, q, steps)
    assert eps <= target
    # Within tolerance, or sigma is pinned to within the bisection's relative precision.
    if eps < target - 0.01:
        assert _epsilon("rdp", sigma * (1 - 1e-5), q, steps) > target


def test_returned_sigma_is_the_smallest_within_tolerance() -> None:
    q, steps = 256 / 60_000, 14_063
    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
    )
    assert 3.0 - 0.01 <= _epsilon("rdp", sigma, q, steps) <= 3.0
    assert _epsilon("rdp", sigma * 0.99, q, steps) > 3.0


def test_tighter_tolerance_gets_closer() -> None:
    kwargs: dict[str, Any] = dict(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, steps=1000
    )
    sigma = get_noise_multiplier(**kwargs, accountant="rdp", epsilon_tolerance=1e-4)
    assert 2.0 - 1e-4 <= _epsilon("rdp", sigma, 0.01, 1000) <= 2.0


def test_epochs_are_converted_to_ceil_epochs_over_q() -> None:
    assert steps_for_epochs(60, 256 / 60_000) == 14_063  # 14062.5 rounds up
    assert steps_for_epochs(3, 0.01) == 300  # 300.00000000000006 is not 301
    assert steps_for_epochs(0.001, 0.5) == 1
    common: dict[str, Any] = dict(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=0.01, accountant="rdp"
    )
    by_epochs = get_noise_multiplier(**common, epochs=2.5)
    by_steps = get_noise_multiplier(**common, steps=250)
    assert by_epochs == by_steps


def test_unreachable_target_raises_naming_what_to_change() -> None:
    with pytest.raises(DPValueError, match=r"target_epsilon=0\.001.*sigma_max") as info:
        get_noise_multiplier(
            target_epsilon=1e-3,
            target_delta=1e-10,
            sample_rate=1.0,
            steps=10**6,
            accountant="rdp",
            sigma_max=100.0,
        )
    assert "Raise target_epsilon" in str(info.value)


def test_sigma_min_is_returned_when_it_already_meets_the_target() -> None:
    # A loose budget that sigma_min=2 already meets: the search goes no lower.
    kwargs: dict[str, Any] = dict(
        target_epsilon=10.0, target_delta=DELTA, sample_rate=0.01, steps=10
    )
    sigma = get_noise_multiplier(**kwargs, accountant="rdp", sigma_min=2.0)
    assert sigma == 2.0
    assert _epsilon("rdp", sigma, 0.01, 10) <= 10.0


@pytest.mark.parametrize(
    ("epochs", "steps", "match"),
    [(None, None, "neither"), (1.0, 100, "both")],
)
def test_exactly_one_of_epochs_and_steps(
    epochs: float | None, steps: int | None, match: str
) -> None:
    with pytest.raises(DPValueError, match=match):
        get_noise_multiplier(
            target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, epochs=epochs, steps=steps
        )


BAD_ARGUMENTS = [
    ({"target_epsilon": 0.0}, "target_epsilon="),
    ({"target_epsilon": math.inf}, "target_epsilon="),
    ({"target_epsilon": math.nan}, "target_epsilon="),
    ({"target_delta": 0.0}, "target_delta="),
    ({"target_delta": 1.0}, "target_delta="),
    ({"sample_rate": 0.0}, "sample_rate="),
    ({"sample_rate": 1.5}, "sample_rate="),
    ({"steps": 0}, "steps="),
    ({"steps": 2.5}, "steps="),
    ({"steps": None, "epochs": -1.0}, "epochs="),
    ({"epsilon_tolerance": 0.0}, "epsilon_tolerance="),
    ({"sigma_min": 0.0}, "sigma_min="),
    ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min="),
]


@pytest.mark.parametrize(("override", "match"), BAD_ARGUMENTS)
def test_bad_inputs_raise_naming_the_argument(override: dict[str, object], match: str) -> None:
    kwargs: dict[str, Any] = dict(
        target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, steps=100, accountant="rdp"
    )
    kwargs.update(override)
    with pytest.raises(DPValueError, match=match):
        get_noise_multiplier(**kwargs)  # type: ignore[arg-type]


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(DPValueError) as info:
        get_noise_multiplier(target_epsilon=-1.0, target_delta=2.0, sample_rate=0.0, steps=0)
    message = str(info.value)
    for name in ("target_epsilon=", "target_delta=", "sample_rate=", "steps="):
        assert name in message


def test_wrong_types_raise_type_error() -> None:
    with pytest.raises(DPTypeError, match="target_epsilon="):
        get_noise_multiplier(
            target_epsilon="3",  # type: ignore[arg-type]
            target_delta=DELTA,
            sample_rate=0.01,
            steps=100,
        )


def test_unknown_accountant_raises() -> None:
    with pytest.raises(DPValueError, match="not a known accountant"):
        get_noise_multiplier(
            target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, steps=10, accountant="x"
        )


def test_works_with_any_registered_accountant(monkeypatch: pytest.MonkeyPatch) -> None:
    if "gdp" not in registry_module._ACCOUNTANTS:
        monkeypatch.setattr(registry_module, "_ACCOUNTANTS", dict(registry_module._ACCOUNTANTS))
        register_accountant("gdp", GaussianAccountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DPWarning)
        sigma = get_noise_multiplier(
            target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, steps=1000, accountant="gdp"
        )
        eps = _epsilon("gdp", sigma, 0.01, 1000)
    assert 1.0 - 0.01 <= eps <= 1.0
    # The approximation under-reports, so it asks for less noise than RDP does.
    assert sigma < get_noise_multiplier(
        target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, steps=1000, accountant="rdp"
    )


def test_opacus_import_path_reexports() -> None:
    from dptorch.accountants.utils import get_noise_multiplier as alias

    assert alias is get_noise_multiplier


@pytest.mark.parametrize(("delta", "size", "warns"), [(1e-5, 1000, False), (1e-3, 1000, True)])
def test_delta_against_dataset_size(delta: float, size: int, warns: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_delta_against_dataset(delta, size)
    found = [w for w in caught if issubclass(w.category, DPWarning)]
    assert len(found) == (1 if warns else 0)
    if warns:
        assert "1/dataset_size" in str(found[0].message)


def test_delta_against_dataset_validates() -> None:
    with pytest.raises(DPValueError, match="dataset_size="):
        check_delta_against_dataset(1e-5, 0)
    with pytest.raises(DPTypeError, match="dataset_size="):
        check_delta_against_dataset(1e-5, 10.5)  # type: ignore[arg-type]
    with pytest.raises(DPValueError, match="delta="):
        check_delta_against_dataset(0.0, 100)


@pytest.mark.parametrize(
    ("target", "q", "steps"), [(3.0, 256 / 60_000, 14_063), (1.0, 0.01, 500), (8.0, 0.1, 300)]
)
def test_prv_calibration_never_overshoots_and_is_within_tolerance(
    target: float, q: float, steps: int
) -> None:
    sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="prv"
    )
    assert target - 0.01 <= _epsilon("prv", sigma, q, steps) <= target
    # The tight accountant needs no more noise than the RDP bound does.
    assert sigma <= get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
    )


def test_bracket_walks_down_to_small_sigmas() -> None:
    # A loose budget over few steps: the answer lies well below sigma = 1.
    kwargs: dict[str, Any] = dict(target_epsilon=20.0, target_delta=DELTA, sample_rate=0.5)
    sigma = get_noise_multiplier(**kwargs, steps=3, accountant="rdp")
    assert sigma < 0.5
    assert 20.0 - 0.01 <= _epsilon("rdp", sigma, 0.5, 3) <= 20.0


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_prior_history_is_composed_with_the_planned_steps(name: str) -> None:
    prior = [(8.0, 1.0, 1), (1.2, 0.01, 300)]
    sigma = get_noise_multiplier(
        target_epsilon=3.0,
        target_delta=DELTA,
        sample_rate=0.02,
        steps=500,
        accountant=name,
        prior_history=prior,
    )
    alone = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=0.02, steps=500, accountant=name
    )
    assert sigma > alone  # the prior spend leaves less for the planned steps
    accountant = create_accountant(name)
    accountant.load_state_dict(
        {"mechanism": accountant.mechanism(), "history": [*prior, (sigma, 0.02, 500)]}
    )
    assert 3.0 - 0.011 <= accountant.get_epsilon(DELTA) <= 3.0


@pytest.mark.parametrize(
    ("prior_history", "error", "named"),
    [
        ([(1.0, 0.5, 2), (1.0, 1.5, 2)], DPValueError, r"history'\]\[1\]"),
        ([1.0], DPValueError, r"history'\]\[0\].*triple"),
        (None, DPTypeError, "prior_history has type NoneType"),
    ],
)
def test_invalid_prior_history_is_refused_naming_the_entry(
    prior_history: Any, error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        get_noise_multiplier(
            target_epsilon=3.0,
            target_delta=DELTA,
            sample_rate=0.02,
            steps=10,
            accountant="rdp",
            prior_history=prior_history,
        )
