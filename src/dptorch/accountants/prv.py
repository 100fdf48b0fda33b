"""Privacy loss distribution ("PRV") accountant: tight (epsilon, delta) for DP-SGD.

Where RDP bounds the privacy loss through its moments, this accountant composes the privacy
loss distribution itself (Koskela et al., arXiv 1906.03049; Gopi et al., arXiv 2106.02848),
discretised pessimistically (Doroshenko et al., arXiv 2207.04380), so its epsilon is an upper
bound that is typically within 0.1% of the exact one and below the RDP bound.
"""

from __future__ import annotations

import math

from dptorch.accountants._validation import as_float
from dptorch.accountants.analysis.pld import (
    DEFAULT_POINTS,
    DiscretePLD,
    compose_subsampled_gaussian,
    delta_from_pld,
    epsilon_from_pld,
)
from dptorch.accountants.base import Accountant
from dptorch.errors import DPValueError

_MAX_REFINEMENTS = 4


class PRVAccountant(Accountant):
    """Tracks privacy by composing privacy loss distributions, then reads off (epsilon, delta).

    The composed distribution is cached until the history changes, so asking for several
    deltas, or the same delta twice, costs one composition.

    Example:
        >>> accountant = PRVAccountant()
        >>> for _ in range(1000):
        ...     accountant.step(noise_multiplier=1.0, sample_rate=0.01)
        >>> round(accountant.get_epsilon(delta=1e-5), 2)
        1.83
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[int, tuple[tuple[tuple[float, float, int], ...], tuple[DiscretePLD, ...]]]
        self._cache = {}

    @classmethod
    def mechanism(cls) -> str:
        """Returns ``"prv"``."""
        return "prv"

    def get_epsilon(self, delta: float, *, eps_error: float | None = None) -> float:
        """Epsilon spent so far at ``delta``.

        Args:
            delta: target delta in (0, 1).
            eps_error: if given, refine the grid (doubling its points, at most 4 times)
                until two successive epsilons differ by at most ``eps_error``; both are upper
                bounds, the finer one is returned. By default one grid of
                ``DEFAULT_POINTS`` cells is used.

        Returns:
            Epsilon >= 0; 0.0 with no recorded step; ``inf`` if a step had sigma == 0.

        Privacy:
            All recorded steps together are (epsilon, delta)-DP under add/remove-one
            adjacency, assuming each step is the Poisson-subsampled Gaussian mechanism it
            was recorded as; the value is an upper bound up to FFT round-off.

        Raises:
            DPValueError: ``delta`` is outside (0, 1), ``eps_error`` is not > 0, or the
                history's loss range cannot be represented on the grid.
        """
        delta = self._check_delta(delta)
        if eps_error is not None:
            eps_error = as_float("eps_error", eps_error)
            if not eps_error > 0:
                raise DPValueError(
                    f"eps_error={eps_error!r} must be > 0: it is the largest change in "
                    "epsilon accepted between two grid refinements (e.g. 0.01)."
                )
        if not self.history:
            return 0.0
        points = DEFAULT_POINTS
        epsilon = epsilon_from_pld(self._plds(points), delta)
        if eps_error is None or not math.isfinite(epsilon):
            return epsilon
        for _ in range(_MAX_REFINEMENTS):
            points *= 2
            finer = epsilon_from_pld(self._plds(points), delta)
            if abs(epsilon - finer) <= eps_error:
                return min(epsilon, finer)
            epsilon = finer
        return epsilon

    def get_delta(self, epsilon: float) -> float:
        """Smallest delta such that all recorded steps are (epsilon, delta)-DP.

        Raises:
            DPValueError: ``epsilon`` is negative or NaN.
        """
        epsilon = as_float("epsilon", epsilon)
        if not epsilon >= 0:
            raise DPValueError(f"epsilon={epsilon!r} must be >= 0 (use e.g. 1.0).")
        if not self.history:
            return 0.0
        return delta_from_pld(self._plds(DEFAULT_POINTS), epsilon)

    def _plds(self, points: int) -> tuple[DiscretePLD, ...]:
        """Composed PLDs of the current history on a grid of ``points`` cells (cached)."""
        key = tuple(self.history)
        if any(cached_key != key for cached_key, _ in self._cache.values()):
            self._cache = {}  # the history changed since these were composed
        if points not in self._cache:
            self._cache[points] = (key, compose_subsampled_gaussian(key, points=points))
        return self._cache[points][1]
