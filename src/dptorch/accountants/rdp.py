"""Renyi DP accountant for DP-SGD with Poisson sampling (Mironov, arXiv 1702.07476)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dptorch.accountants._validation import check_orders
from dptorch.accountants.analysis.rdp import DEFAULT_ORDERS, compute_rdp, rdp_to_epsilon
from dptorch.accountants.base import Accountant


class RDPAccountant(Accountant):
    """Tracks privacy with Renyi DP, then converts to (epsilon, delta).

    RDP composes by addition at each order, so heterogeneous steps (sigma or q changing
    during training) are summed exactly; the conversion to (epsilon, delta) is done once, on
    the total, at the best order.

    Example:
        >>> accountant = RDPAccountant()
        >>> for _ in range(1000):
        ...     accountant.step(noise_multiplier=1.0, sample_rate=0.01)
        >>> round(accountant.get_epsilon(delta=1e-5), 2)
        2.1
    """

    @classmethod
    def mechanism(cls) -> str:
        """Returns ``"rdp"``."""
        return "rdp"

    def get_privacy_spent(
        self, *, delta: float, orders: Sequence[float] | np.ndarray | None = None
    ) -> tuple[float, float]:
        """Epsilon spent so far at ``delta``, and the Renyi order that certifies it.

        Args:
            delta: target delta in (0, 1).
            orders: Renyi orders to search; defaults to
                :data:`dptorch.accountants.analysis.DEFAULT_ORDERS`.

        Returns:
            ``(epsilon, best_order)``. With no recorded step this is ``(0.0, nan)``: nothing
            was released, and no order is needed to say so.

        Privacy:
            All recorded steps together are (epsilon, delta)-DP under add/remove-one
            adjacency, assuming each step is the Poisson-subsampled Gaussian mechanism it
            was recorded as (see :meth:`Accountant.step`).

        Raises:
            DPValueError: ``delta`` is outside (0, 1) or an order is <= 1.
        """
        delta = self._check_delta(delta)
        alphas = check_orders(DEFAULT_ORDERS if orders is None else orders)
        if not self.history:
            return 0.0, float("nan")
        rdp = np.zeros_like(alphas)
        for sigma, q, steps in self.history:
            rdp += compute_rdp(sample_rate=q, noise_multiplier=sigma, steps=steps, orders=alphas)
        return rdp_to_epsilon(orders=alphas, rdp=rdp, delta=delta)

    def get_epsilon(
        self, delta: float, orders: Sequence[float] | np.ndarray | None = None
    ) -> float:
        """Epsilon spent so far at ``delta`` (see :meth:`get_privacy_spent`)."""
        return self.get_privacy_spent(delta=delta, orders=orders)[0]
