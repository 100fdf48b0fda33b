"""Clipping policies: per-sample norms in, per-sample factors out.

Flat clipping (Abadi et al. 2016, arXiv 1607.00133) scales example ``i``'s whole gradient by
``c_i = min(1, C / ||g_i||)``, so every clipped gradient has norm at most ``C``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dptorch.errors import DPTypeError, DPValueError
from dptorch.noise import gaussian_noise, round_to_noise_grid_
from dptorch.secure_random import SecureRandom
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
        """``[B]`` factors ``min(1, C / n_i)`` of norms ``n_i >= 0``; 0 where ``n_i`` is NaN or
        infinite.

        Computed on the norms' device without reading them back (no host synchronisation):
        ``C / max(n, C)`` equals ``min(1, C / n)``, never divides by zero and is already 0 at
        ``n = inf``; a NaN norm stays NaN through ``clamp`` and is then set to 0.
        """
        factors = self.max_grad_norm / torch.clamp(norms, min=self.max_grad_norm)
        return factors.nan_to_num_(nan=0.0)


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
        """``[B]`` factors ``C / (n_i + gamma)`` of norms ``n_i >= 0``; 0 where ``n_i`` is NaN or
        infinite (``C / inf`` is 0 already; a NaN factor is set to 0)."""
        factors = self.max_grad_norm / (norms + self.stability)
        return factors.nan_to_num_(nan=0.0)


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

    def factors(self, norms: Tensor) -> Tensor:
        raise DPValueError(
            "Per-layer clipping needs each group's norms, not the total; the per-sample "
            "engine calls group_factors for it."
        )

    def group_factors(self, group_norms: Tensor) -> Tensor:
        """``[G, B]`` factors from ``[G, B]`` per-group norms."""
        return torch.stack([p.factors(n) for p, n in zip(self.policies, group_norms, strict=True)])


class AdaptiveClipping:
    """Flat clipping whose norm tracks a quantile of the gradient norms, privately.

    After every releasing step the norm moves geometrically towards the
    ``target_unclipped_quantile`` of the per-example norms (Andrew et al. 2021,
    arXiv 1905.03871): ``C <- C * exp(-lr * (b - target))``, where ``b`` is the NOISED fraction
    of examples that were not clipped,
    ``b = (sum_i (1[n_i <= C] - 1/2) + N(0, count_noise^2)) / (q N) + 1/2``.

    Privacy: the centred count has sensitivity 1/2 under add/remove-one, so together with the
    gradient (sensitivity ``C``, noise ``sigma_grad * C``) one step is a Gaussian mechanism
    with noise multiplier ``z`` where ``z^-2 = sigma_grad^-2 + (2 count_noise)^-2``. The
    optimizer is given ``z`` (that is what the accountant records, and what
    ``make_private_with_epsilon`` calibrates) and adds gradient noise with
    ``sigma_grad = (z^-2 - (2 count_noise)^-2)^(-1/2)``, so the total cost is exactly the
    recorded one. This needs ``2 count_noise > z``.

    Utility: the released gradient, noise included, scales with ``C``, so under a fixed
    learning rate the step size moves as far as ``C`` does. On the Fashion-MNIST recipe
    (docs/accuracy.md, step 9) the median of the norms fell from 0.1 to 0.0006 as examples
    were fitted and training stalled; a 0.9 target drove ``C`` to 76 and training diverged.
    Scale the learning rate by ``C_0 / C`` (or bound ``C``) when the norms move that much.

    Args:
        initial_max_grad_norm: the starting norm ``C_0``.
        target_unclipped_quantile: the fraction of examples meant to be unclipped (0.5 is
            the median).
        learning_rate: the geometric step size (0.2 in the paper).
        count_noise: std of the noise on the unclipped count; the paper suggests the
            expected batch size / 20.
        min_max_grad_norm, max_max_grad_norm: bounds for ``C`` (post-processing, no cost).
    """

    def __init__(
        self,
        initial_max_grad_norm: float,
        *,
        target_unclipped_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise: float,
        min_max_grad_norm: float = 1e-6,
        max_max_grad_norm: float = 1e6,
    ) -> None:
        self.flat = FlatClipping(initial_max_grad_norm)
        quantile = check_number("target_unclipped_quantile", target_unclipped_quantile)
        if not 0.0 < quantile < 1.0:
            raise DPValueError(
                f"target_unclipped_quantile={quantile!r} must be in (0, 1); 0.5 (the median) "
                "is the usual choice."
            )
        rate = check_number("learning_rate", learning_rate)
        noise = check_number("count_noise", count_noise)
        if not (math.isfinite(rate) and rate > 0) or not (math.isfinite(noise) and noise > 0):
            raise DPValueError(
                f"learning_rate={rate!r} and count_noise={noise!r} must be positive and finite."
            )
        self.target_unclipped_quantile = quantile
        self.learning_rate = rate
        self.count_noise = noise
        self.bounds = (float(min_max_grad_norm), float(max_max_grad_norm))

    @property
    def max_grad_norm(self) -> float:
        return self.flat.max_grad_norm

    @property
    def sensitivity(self) -> float:
        return self.flat.sensitivity

    def factors(self, norms: Tensor) -> Tensor:
        return self.flat.factors(norms)

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """``sigma_grad`` such that gradient and count together cost ``noise_multiplier``."""
        if noise_multiplier == 0:
            return 0.0
        count_multiplier = 2.0 * self.count_noise
        remaining = noise_multiplier**-2 - count_multiplier**-2
        if remaining <= 0:
            raise DPValueError(
                f"Adaptive clipping with count_noise={self.count_noise} cannot reach "
                f"noise_multiplier={noise_multiplier}: that needs 2 * count_noise "
                f"(= {count_multiplier}) > noise_multiplier. Raise count_noise "
                "(e.g. expected batch size / 20) or use flat clipping."
            )
        return remaining**-0.5

    def update(
        self,
        norms: Tensor,
        expected_batch_size: float,
        generator: torch.Generator | SecureRandom | None,
    ) -> None:
        """Move ``C`` after a release, from the logical batch's norms and fresh count noise."""
        unclipped = float((norms <= self.flat.max_grad_norm).sum()) - 0.5 * norms.numel()
        device = generator.device if generator is not None else norms.device
        noise = gaussian_noise(
            torch.Size([]),
            std=self.count_noise,
            dtype=torch.float32,
            device=device,
            generator=generator,
        )
        count = noise.to(torch.float64).add_(unclipped)  # as the Python float sum was
        round_to_noise_grid_(count, self.count_noise, generator)  # secure mode only
        fraction = float(count) / expected_batch_size + 0.5
        moved = self.flat.max_grad_norm * math.exp(
            -self.learning_rate * (fraction - self.target_unclipped_quantile)
        )
        low, high = self.bounds
        self.flat = FlatClipping(min(max(moved, low), high))

    def state_dict(self) -> dict[str, float]:
        return {"max_grad_norm": self.flat.max_grad_norm}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.flat = FlatClipping(float(state["max_grad_norm"]))


ClippingPolicy = FlatClipping | AutomaticClipping | PerLayerClipping | AdaptiveClipping


CLIPPING_KINDS = ("flat", "automatic", "per_layer", "adaptive")


def default_count_noise(expected_batch_size: float) -> float:
    """Adaptive clipping's count noise for an expected batch of ``q N`` examples: ``q N / 20``,
    Andrew et al.'s suggestion (``make_private(clipping="adaptive")`` uses it)."""
    return expected_batch_size / 20


def make_clipping_policy(
    kind: str | ClippingPolicy,
    max_grad_norm: float | Sequence[float],
    params: Sequence[Tensor],
    expected_batch_size: float,
) -> ClippingPolicy:
    """The policy ``make_private(clipping=...)`` names.

    Args:
        kind: ``"flat"``, ``"automatic"``, ``"per_layer"``, ``"adaptive"``, or a ready policy.
        max_grad_norm: ``C``; for ``"per_layer"`` either one norm per trainable parameter (in
            the optimizer's order) or one total norm, split evenly as ``C / sqrt(P)`` so the
            sensitivity stays ``C``; for ``"adaptive"`` the initial norm.
        params: the trainable parameters.
        expected_batch_size: ``q N``; adaptive clipping's count noise is ``q N / 20``.
    """
    if not isinstance(kind, str):
        if not isinstance(
            kind, FlatClipping | AutomaticClipping | PerLayerClipping | AdaptiveClipping
        ):
            raise DPTypeError(
                f"clipping={kind!r} must be one of {CLIPPING_KINDS} or a policy from "
                "dptorch.clipping."
            )
        return kind
    if kind not in CLIPPING_KINDS:
        raise DPValueError(f"clipping={kind!r} is not available; use one of {CLIPPING_KINDS}.")
    if kind == "per_layer":
        norms = _per_parameter_norms(max_grad_norm, len(params))
        return PerLayerClipping([[p] for p in params], norms)
    if isinstance(max_grad_norm, str | bytes) or not isinstance(max_grad_norm, Sequence):
        check_number("max_grad_norm", max_grad_norm)  # a string or None: say it is no number
    if not isinstance(max_grad_norm, int | float):
        raise DPTypeError(
            f"max_grad_norm={max_grad_norm!r}: a list of norms is only for clipping='per_layer'."
        )
    if kind == "automatic":
        return AutomaticClipping(float(max_grad_norm))
    if kind == "adaptive":
        return AdaptiveClipping(
            float(max_grad_norm), count_noise=default_count_noise(expected_batch_size)
        )
    return FlatClipping(float(max_grad_norm))


def _per_parameter_norms(max_grad_norm: float | Sequence[float], count: int) -> list[float]:
    if isinstance(max_grad_norm, int | float):
        return [float(max_grad_norm) / math.sqrt(count)] * count
    norms = [float(c) for c in max_grad_norm]
    if len(norms) != count:
        raise DPValueError(
            f"clipping='per_layer' got {len(norms)} norms in max_grad_norm for {count} "
            "trainable parameters; give one per parameter (in the optimizer's order) or one "
            "total norm."
        )
    return norms
