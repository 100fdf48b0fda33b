"""Gaussian-DP accountant: the central-limit approximation for DP-SGD.

Dong, Roth and Su (arXiv 1905.02383) show that composing many Poisson-subsampled Gaussian
steps tends to mu-GDP; Bu et al. (arXiv 1911.11607) apply it to DP-SGD with

    mu = sqrt(sum over steps of q^2 * (exp(1 / sigma^2) - 1)).

This is a limit, not a bound: for few steps or small sigma it can report a much smaller
epsilon than the mechanism actually has. It is offered for comparison with published numbers
and is never the default.
"""

from __future__ import annotations

import math
import warnings

from scipy.optimize import brentq
from scipy.special import log_ndtr

from dptorch.accountants._validation import as_float
from dptorch.accountants.base import Accountant
from dptorch.errors import DPValueError, DPWarning

# Above this epsilon, delta(epsilon) is treated as unreachable and epsilon reported as inf.
_EPSILON_CEILING = 1e12


def gdp_mu(history: list[tuple[float, float, int]]) -> float:
    """The mu of the GDP limit for a run-length encoded ``(sigma, q, steps)`` history.

    Returns 0.0 for an empty history and ``inf`` if any step had sigma == 0 (or so small
    that ``exp(1 / sigma^2)`` overflows).
    """
    total = 0.0
    for sigma, q, steps in history:
        if steps == 0:
            continue
        inverse_variance = math.inf if sigma == 0 else 1.0 / sigma**2
        if inverse_variance > 700:  # exp() overflows float64 just above 709
            return math.inf
        total += steps * q * q * math.expm1(inverse_variance)
    return math.sqrt(total)


def gdp_delta(mu: float, epsilon: float) -> float:
    """Smallest delta with mu-GDP implying (epsilon, delta)-DP (Dong et al., Corollary 2.13).

    delta = Phi(-epsilon / mu + mu / 2) - exp(epsilon) * Phi(-epsilon / mu - mu / 2),
    evaluated as Phi(a) * (1 - exp(epsilon + log Phi(b) - log Phi(a))) so that neither term
    overflows and small deltas keep their relative precision.
    """
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    if math.isinf(epsilon):
        return 0.0
    log_phi_a = float(log_ndtr(-epsilon / mu + mu / 2))
    log_phi_b = float(log_ndtr(-epsilon / mu - mu / 2))
    log_ratio = epsilon + log_phi_b - log_phi_a
    if log_ratio >= 0:  # rounding only: the exact ratio is always below 1
        return 0.0
    return max(0.0, math.exp(log_phi_a) * -math.expm1(log_ratio))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon >= 0 with mu-GDP implying (epsilon, delta)-DP; ``inf`` if none."""
    if mu == 0:
        return 0.0
    if math.isinf(mu) or math.isnan(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    # delta(epsilon) decreases in epsilon; epsilon is near mu^2 / 2 + mu * z for large mu.
    high = max(1.0, mu * mu / 2 + 10 * mu)
    while gdp_delta(mu, high) > delta:
        high *= 2
        if high > _EPSILON_CEILING:
            return math.inf
    return float(brentq(lambda eps: gdp_delta(mu, eps) - delta, 0.0, high, xtol=1e-12, rtol=1e-12))


class GaussianAccountant(Accountant):
    """Reports epsilon from the Gaussian-DP central-limit approximation (not a bound).

    Creating one warns with :class:`~dptorch.errors.DPWarning`, because the approximation
    can under-report epsilon: with q=0.001, sigma=0.6 and 1000 steps it gives epsilon ~0.43
    at delta=1e-5, while an exact (PLD) analysis gives ~1.43. Use ``"rdp"`` or ``"prv"`` to
    claim a guarantee.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     accountant = GaussianAccountant()
        >>> accountant.load_state_dict({"mechanism": "gdp", "history": [(0.6, 0.001, 1000)]})
        >>> round(accountant.get_epsilon(delta=1e-5), 2)
        0.43
    """

    def __init__(self) -> None:
        super().__init__()
        warnings.warn(
            "GaussianAccountant uses the Gaussian-DP central-limit approximation "
            "(arXiv 1911.11607), which can UNDER-report epsilon: it is not an upper bound "
            "on the privacy loss. Use create_accountant('rdp') or 'prv' for a guarantee.",
            DPWarning,
            stacklevel=2,
        )

    @classmethod
    def mechanism(cls) -> str:
        """Returns ``"gdp"``."""
        return "gdp"

    def get_mu(self) -> float:
        """The mu of the mu-GDP limit of all recorded steps (0.0 if none)."""
        return gdp_mu(self.history)

    def get_epsilon(self, delta: float) -> float:
        """Approximate epsilon at ``delta`` from the GDP limit.

        Privacy:
            An approximation that becomes exact only as the number of steps grows with
            q * sqrt(steps) fixed; it is NOT an upper bound and may be far below the true
            epsilon.

        Raises:
            DPValueError: ``delta`` is outside (0, 1).
        """
        delta = self._check_delta(delta)
        if not self.history:
            return 0.0
        return gdp_epsilon(self.get_mu(), delta)

    def get_delta(self, epsilon: float) -> float:
        """Approximate delta at ``epsilon`` from the GDP limit (0.0 if nothing recorded).

        Raises:
            DPValueError: ``epsilon`` is negative or NaN.
            DPTypeError: ``epsilon`` is not a real number.
        """
        value = as_float("epsilon", epsilon)
        if not value >= 0:
            raise DPValueError(
                f"epsilon={epsilon!r} must be >= 0 (it may be inf); pass the privacy budget "
                "whose delta you want."
            )
        if not self.history:
            return 0.0
        return gdp_delta(self.get_mu(), value)
