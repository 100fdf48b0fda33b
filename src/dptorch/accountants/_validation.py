"""Argument checks shared by the accountants and their analysis functions.

Each ``*_problem`` function returns a message (or ``None``) instead of raising, so that a
caller checking several arguments can report every problem at once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from dptorch.errors import DPTypeError, DPValueError


def as_float(name: str, value: object) -> float:
    """Converts ``value`` to a Python float, or raises DPTypeError naming ``name``."""
    # float() would accept these, but a bool or a string here is always a slip.
    if not isinstance(value, bool | str | bytes):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    raise DPTypeError(
        f"{name}={value!r} has type {type(value).__name__}; pass a real number (a float)."
    )


# Outside these a noise multiplier's square under- or overflows float64 somewhere in the
# accountants' arithmetic (found by hypothesis: 1e-292 and 1.8e308 crashed get_epsilon).
_SMALLEST_NOISE, _LARGEST_NOISE = 1e-150, 1e150


def noise_multiplier_problem(value: float) -> str | None:
    """Says what is wrong with a noise multiplier, or returns None if it is usable."""
    if value == 0 or _SMALLEST_NOISE <= value <= _LARGEST_NOISE:
        return None
    if math.isfinite(value) and value > 0:
        return (
            f"noise_multiplier={value!r} is outside [{_SMALLEST_NOISE:g}, {_LARGEST_NOISE:g}] "
            "(or 0): its square under- or overflows in the accounting, and no real run uses "
            "one (typical values are 0.3 to 20); check how it was computed."
        )
    return (
        f"noise_multiplier={value!r} must be a finite number >= 0: it is the ratio of the "
        "Gaussian noise standard deviation to the clipping norm (0 records a non-private "
        "step, which makes epsilon infinite)."
    )


def sample_rate_problem(value: float) -> str | None:
    """Says what is wrong with a Poisson sample rate, or returns None if it is usable."""
    if 0 < value <= 1:
        return None
    return (
        f"sample_rate={value!r} must lie in (0, 1]: it is the probability q that each example "
        "joins a batch, i.e. expected batch size / dataset size."
    )


def steps_problem(value: object) -> str | None:
    """Says what is wrong with a step count, or returns None if it is usable."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0:
        return None
    return f"steps={value!r} must be a non-negative integer (the number of composed steps)."


def raise_problems(problems: Sequence[str | None]) -> None:
    """Raises one DPValueError listing every non-None problem."""
    found = [p for p in problems if p is not None]
    if len(found) == 1:
        raise DPValueError(found[0])
    if found:
        raise DPValueError("\n".join(["Invalid arguments:"] + [f"  - {p}" for p in found]))


def check_delta(delta: object) -> float:
    """Returns ``delta`` as a float after checking it lies in (0, 1)."""
    value = as_float("delta", delta)
    if not 0 < value < 1:
        raise DPValueError(
            f"delta={delta!r} must lie in the open interval (0, 1); a common choice is "
            "smaller than 1 / dataset size, e.g. 1e-5."
        )
    return value


def check_orders(orders: object) -> np.ndarray:
    """Returns ``orders`` as a 1-D float array after checking each is finite and > 1."""
    try:
        array = np.asarray(orders, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DPTypeError(
            f"orders={orders!r} cannot be read as a sequence of numbers; pass e.g. "
            "dptorch.accountants.analysis.DEFAULT_ORDERS."
        ) from exc
    if array.ndim != 1 or array.size == 0:
        raise DPValueError(
            f"orders must be a non-empty 1-D sequence of Renyi orders, got shape {array.shape}; "
            "pass e.g. dptorch.accountants.analysis.DEFAULT_ORDERS."
        )
    bad = array[~(np.isfinite(array) & (array > 1))]
    if bad.size:
        raise DPValueError(
            f"orders contains {bad.tolist()!r}; every Renyi order must be finite and > 1 "
            "(RDP is undefined at order <= 1)."
        )
    return array
