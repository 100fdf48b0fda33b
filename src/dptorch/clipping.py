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


@dataclass(frozen=True)
class AutomaticClipping:
    """Normalise instead of clip: ``c_i = C / (||g_i|| + gamma)`` (Bu et al. 2022, arXiv 2206.07136).

    Every example's contribution has norm ``C ||g_i|| / (||g_i|| + gamma) < C``, so no
    threshold needs tuning beyond the learning rate; ``gamma`` keeps small gradients from
    being blown up.

    Privacy: the clipped sum has L2 sensitivity ``max_grad_norm`` under add/remove-one
    adjacency (each term's norm is below it); non-finite norms get factor 0.
    """

    max_grad_norm: float
    stability: float = 0.01

    def __post_init__(self) -> None:
        FlatClipping(self.max_grad_norm)  # the same checks on C
        gamma = check_number("stability", self.stability)
        if not (math.isfinite(gamma) and gamma > 0):
            raise DPValueError(
                f"stability={gamma!r} must be positive and finite: it is gamma in "
                "C / (||g|| + gamma), which would divide by a zero norm otherwise. Try 0.01."
            )

    @property
    def sensitivity(self) -> float:
        return float(self.max_grad_norm)

    def factors(self, norms: Tensor) -> Tensor:
        finite = torch.isfinite(norms)
        safe = torch.where(finite, norms, torch.zeros_like(norms))
        factors = self.max_grad_norm / (safe + self.stability)
        return torch.where(finite, factors, torch.zeros_like(factors))


class PerLayerClipping:
    """Clip each group of parameters (e.g. each layer) to its own norm ``C_g``.

    Example ``i``'s gradient restricted to group ``g`` is scaled by ``min(1, C_g / n_{i,g})``.

    Privacy: the clipped sum has L2 sensitivity ``sqrt(sum_g C_g^2)`` under add/remove-one
    adjacency (the groups are disjoint, each contributes at most ``C_g``); the noise std is
    scaled to that, so the accounting is the same as flat clipping at that norm.

    Args:
        groups: disjoint lists of parameters; every trainable parameter must be in one.
        max_grad_norms: ``C_g`` per group, positive and finite.
    """

    def __init__(self, groups: list[list[Tensor]], max_grad_norms: list[float]) -> None:
        if len(groups) != len(max_grad_norms) or not groups:
            raise DPValueError(
                f"per-layer clipping needs one max_grad_norm per parameter group: got "
                f"{len(groups)} groups and {len(max_grad_norms)} norms."
            )
        self.policies = [FlatClipping(float(c)) for c in max_grad_norms]
        self._group_of: dict[Tensor, int] = {}
        for index, group in enumerate(groups):
            for param in group:
                if param in self._group_of:
                    raise DPValueError(
                        "A parameter appears in two clipping groups; the groups must be "
                        "disjoint or its gradient would be clipped twice and counted once."
                    )
                self._group_of[param] = index

    @property
    def max_grad_norms(self) -> list[float]:
        return [p.max_grad_norm for p in self.policies]

    @property
    def sensitivity(self) -> float:
        return math.sqrt(sum(c * c for c in self.max_grad_norms))

    def group_of(self, param: Tensor) -> int:
        """The index of ``param``'s group; a clear error for a parameter in none."""
        try:
            return self._group_of[param]
        except KeyError:
            raise DPValueError(
                "A trainable parameter is in no per-layer clipping group; pass every "
                "parameter the optimizer trains in exactly one group."
            ) from None

    def group_factors(self, group_norms: Tensor) -> Tensor:
        """``[G, B]`` factors from ``[G, B]`` per-group norms."""
        return torch.stack([p.factors(n) for p, n in zip(self.policies, group_norms, strict=True)])
