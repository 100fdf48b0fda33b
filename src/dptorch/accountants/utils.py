"""Compatibility alias for code written against Opacus's ``opacus.accountants.utils``.

New code should import from :mod:`dptorch.accountants.calibration`.
"""

from __future__ import annotations

from dptorch.accountants.calibration import get_noise_multiplier

__all__ = ["get_noise_multiplier"]
