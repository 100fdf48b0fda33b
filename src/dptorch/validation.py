"""Checks of scalar arguments, shared by the parts that take them."""

from __future__ import annotations

import math

from dptorch.errors import DPTypeError, DPValueError


def check_number(name: str, value: object) -> float:
    """``value`` as a float; a non-number (a string, a bool, None) is a DPTypeError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DPTypeError(f"{name}={value!r} ({type(value).__name__}) must be a number.")
    return float(value)


def check_noise_multiplier(value: object) -> float:
    """sigma must be a finite number >= 0 (0 means no privacy and is allowed for tests)."""
    sigma = check_number("noise_multiplier", value)
    if not math.isfinite(sigma) or sigma < 0:
        raise DPValueError(
            f"noise_multiplier={value!r} must be a finite number >= 0: the noise std is "
            "noise_multiplier * max_grad_norm. Typical values are 0.5 to 2."
        )
    return sigma


def check_positive_number(name: str, value: object) -> float:
    number = check_number(name, value)
    if not math.isfinite(number) or number <= 0:
        raise DPValueError(f"{name}={value!r} must be a positive finite number.")
    return number


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``; a bool, float or string is a DPTypeError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DPTypeError(f"{name}={value!r} must be an int >= {minimum}.")
    if value < minimum:
        raise DPValueError(f"{name}={value!r} must be >= {minimum}.")
    return value
