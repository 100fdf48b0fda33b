"""Clipping policies: per-sample norms in, per-sample factors out.

Flat clipping (Abadi et al. 2016, arXiv 1607.00133) scales example ``i``'s whole gradient by
``c_i = min(1, C / ||g_i||)``, so every clipped gradient has norm at most ``C``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dptorch.errors import DPValueError
from dptorch.validation import check_number


@dataclass(frozen=True)
class FlatClipping:
    """Clip each example's full gradient to L2 norm ``max_grad_norm``.

    Privacy: with these factors the clipped sum has L2 sensitivity ``max_grad_norm`` under
    add/remove-one adjacency. Examples whose norm is not finite get factor 0 (they contribute
    nothing), which keeps that bound.
    """

    max_grad_norm: float

    def __post_init__(self) -> None:
        value = check_number("max_grad_norm", self.max_grad_norm)
        if not (math.isfinite(value) and value > 0):
            raise DPValueError(
                f"max_grad_norm={value!r} must be positive and finite: it bounds each "
                "example's influence, and the noise is calibrated to it. Try 1.0."
            )

    @property
    def sensitivity(self) -> float:
        return float(self.max_grad_norm)

    def factors(self, norms: Tensor) -> Tensor:
        """``[B]`` factors ``min(1, C / n_i)``; 0 where ``n_i`` is NaN or infinite."""
        finite = torch.isfinite(norms)
        safe = torch.where(finite, norms, torch.ones_like(norms))
        # C / max(n, C) == min(1, C / n) and never divides by zero.
        factors = self.max_grad_norm / torch.clamp(safe, min=self.max_grad_norm)
        return torch.where(finite, factors, torch.zeros_like(factors))
