"""Checks of scalar arguments, shared by the parts that take them."""

from __future__ import annotations

import math

from dptorch.errors import DPValueError


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_noise_multiplier(value: object) -> float:
    """sigma must be a finite number >= 0 (0 means no privacy and is allowed for tests)."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 0:  # type: ignore[arg-type]
        raise DPValueError(
            f"noise_multiplier={value!r} must be a finite number >= 0: the noise std is "
            "noise_multiplier * max_grad_norm. Typical values are 0.5 to 2; use "
            "make_private_with_epsilon to pick one for a target epsilon."
        )
    return float(value)  # type: ignore[arg-type]


def check_positive_number(name: str, value: object) -> float:
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise DPValueError(f"{name}={value!r} must be a positive finite number.")
    return float(value)  # type: ignore[arg-type]
