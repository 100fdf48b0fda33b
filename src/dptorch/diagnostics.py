"""Clipping diagnostics, and a sweep to pick ``max_grad_norm`` before private training.

Everything here is computed from raw per-example gradient norms, so NONE of it is covered by
the differential privacy guarantee: the names say ``nonprivate``. Use these numbers to tune
and debug on data you may look at; do not publish them for private data.

A noised clipped fraction (counted by the accountant) is deliberately not offered: it is
released from the same Poisson batch as the gradient, so the exact accounting is ONE
subsampled step with the combined noise ``(sigma^-2 + sigma_count^-2)^(-1/2)``, not a second,
separately subsampled step (which would under-report epsilon). The accountants record one
``(sigma, q)`` per step, and that combined charge belongs in the optimizer's step, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dptorch.clipping import FlatClipping
from dptorch.errors import DPTypeError, DPValueError, UnsupportedModuleError
from dptorch.optimizers import DPOptimizer
from dptorch.per_sample import PerSampleEngine
from dptorch.per_sample.capture import is_captured
from dptorch.validators import find_problems

__all__ = [
    "DEFAULT_QUANTILES",
    "MaxGradNormSweep",
    "NonPrivateClippingStats",
    "nonprivate_clipping_stats",
    "nonprivate_step_stats",
    "sweep_max_grad_norm",
]

DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class NonPrivateClippingStats:
    """How clipping acted on one batch. NOT private: computed from raw per-example norms.

    Attributes:
        batch_size: examples in the batch.
        max_grad_norm: the clipping norm C the fraction refers to.
        clipped_fraction: share of examples whose gradient norm exceeded C (a non-finite
            norm counts as clipped: its factor is 0). NaN for an empty batch.
        norm_quantiles: quantile -> per-example gradient norm before clipping, over the
            finite norms (linear interpolation; NaN when there are none).
        nonfinite: examples whose gradient norm was NaN or infinite.
    """

    batch_size: int
    max_grad_norm: float
    clipped_fraction: float
    norm_quantiles: dict[float, float]
    nonfinite: int


def nonprivate_clipping_stats(
    norms: Tensor, max_grad_norm: float, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> NonPrivateClippingStats:
    """Clipping statistics of per-example gradient norms ``norms`` (``[B]``) at ``C``.

    Privacy: NOT private. The result is an exact function of each example's gradient; it
    is for tuning and monitoring, not for release.
    """
    levels = _check_quantiles(quantiles)
    clipping = FlatClipping(max_grad_norm)
    norms = norms.detach().reshape(-1).to(torch.float64)  # [B]
    finite = norms[torch.isfinite(norms)]
    batch = norms.numel()
    if finite.numel():
        values = torch.quantile(finite, torch.tensor(levels, dtype=torch.float64)).tolist()
    else:
        values = [math.nan] * len(levels)
    clipped = float((clipping.factors(norms) < 1).double().mean()) if batch else math.nan
    return NonPrivateClippingStats(
        batch_size=batch,
        max_grad_norm=clipping.max_grad_norm,
        clipped_fraction=clipped,
        norm_quantiles=dict(zip(levels, values, strict=True)),
        nonfinite=batch - finite.numel(),
    )


def nonprivate_step_stats(
    optimizer: DPOptimizer, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> NonPrivateClippingStats | None:
    """Clipping statistics of the optimizer's last step (``None`` before the first step).

    Call it right after ``optimizer.step()``: the fraction is taken at the optimizer's
    current ``max_grad_norm``. With BatchMemoryManager it covers the whole logical batch.

    Privacy: NOT private (see :func:`nonprivate_clipping_stats`).
    """
    stats = optimizer.last_step_stats
    if stats is None:
        return None
    return nonprivate_clipping_stats(stats.norms, optimizer.max_grad_norm, quantiles)


@dataclass(frozen=True)
class MaxGradNormSweep:
    """What :func:`sweep_max_grad_norm` found. NOT private: computed from raw gradients.

    Attributes:
        candidates: the clipping norms tried, as given.
        nonprivate_clipped_fraction: candidate -> share of the examples seen it would clip.
        nonprivate_norm_quantiles: quantile -> per-example gradient norm over those examples.
        examples: how many examples were looked at.
        target: the ``(low, high)`` clipped fraction aimed at.
        recommended: the candidate whose clipped fraction is closest to the middle of
            ``target`` among those inside it; if none is inside, the one closest to it
            (ties go to the smaller norm).
        in_target: whether ``recommended`` is inside ``target``; if not, widen the candidates.
    """

    candidates: tuple[float, ...]
    nonprivate_clipped_fraction: dict[float, float]
    nonprivate_norm_quantiles: dict[float, float]
    examples: int
    target: tuple[float, float]
    recommended: float
    in_target: bool


def sweep_max_grad_norm(
    model: nn.Module,
    data_loader: Iterable[Any],
    criterion: Callable[[Tensor, Tensor], Tensor],
    candidates: Sequence[float] = (0.1, 0.5, 1.0, 1.5, 2.0),
    *,
    batches: int = 4,
    target: tuple[float, float] = (0.5, 0.8),
    loss_reduction: str | None = None,
    batch_first: bool = True,
) -> MaxGradNormSweep:
    """Try clipping norms on a few batches and recommend one that clips 50-80% of examples.

    Per-example gradient norms are computed on the first ``batches`` ``(inputs, targets)``
    batches, with the same hooks as private training but no noise and no update: the model's
    parameters, ``.grad``, training mode and torch's global RNG are as before afterwards
    (the loader's own sampling RNG does advance). Run it before ``make_private``.

    Args:
        model: the model to train (not yet made private).
        data_loader: yields ``(inputs, targets)``.
        criterion: the training loss, e.g. ``nn.CrossEntropyLoss()``.
        candidates: clipping norms to try.
        batches: how many batches to look at.
        target: the clipped fraction aimed at, ``(low, high)``.
        loss_reduction: ``"mean"`` or ``"sum"``, as in ``make_private``; if None, read from
            ``criterion.reduction``, or ``"mean"`` when the criterion has no such attribute.
        batch_first: ``False`` if sequence inputs are ``[T, B, ...]``.

    Privacy: NOT private. This looks at the training data without any protection; the
    recommended norm depends on it. Tune on public or held-out data where you can, or
    account for the tuning separately; the guarantee of the later private run does not
    cover the choice made here.

    Raises:
        DPValueError: a bad argument, an already private model, or no example seen.
        UnsupportedModuleError: the model has a layer that mixes examples.
    """
    tried = _check_candidates(candidates)
    low, high = _check_target(target)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise DPValueError(f"batches={batches!r} must be a positive int, e.g. batches=4.")
    if is_captured(model):
        raise DPValueError(
            f"model ({type(model).__name__}) was already made private; run "
            "sweep_max_grad_norm on the model before make_private (or after engine.detach)."
        )
    modes = [(m, m.training) for m in model.modules()]
    model.train()  # the sweep runs in training mode, so only training-mode problems count
    try:
        problems = find_problems(model)
    finally:
        _restore_modes(modes)
    if problems:
        raise UnsupportedModuleError([str(p) for p in problems])
    reduction = (
        loss_reduction if loss_reduction is not None else getattr(criterion, "reduction", "mean")
    )
    if reduction not in ("mean", "sum"):
        raise DPValueError(
            f"loss_reduction={reduction!r} must be 'mean' or 'sum' (how the loss combines a "
            "batch); pass loss_reduction= or a criterion with reduction='mean' or 'sum'."
        )
    norms = torch.cat(_norms(model, data_loader, criterion, batches, reduction, batch_first))
    if norms.numel() == 0:
        raise DPValueError(
            f"The first {batches} batch(es) held no example; pass more batches= or a loader "
            "with a larger batch size."
        )
    fractions = {c: nonprivate_clipping_stats(norms, c).clipped_fraction for c in tried}
    middle = (low + high) / 2
    inside = [c for c in tried if low <= fractions[c] <= high]
    if inside:
        recommended = min(inside, key=lambda c: (abs(fractions[c] - middle), c))
    else:
        recommended = min(tried, key=lambda c: (max(low - fractions[c], fractions[c] - high), c))
    return MaxGradNormSweep(
        candidates=tried,
        nonprivate_clipped_fraction=fractions,
        nonprivate_norm_quantiles=nonprivate_clipping_stats(norms, tried[0]).norm_quantiles,
        examples=norms.numel(),
        target=(low, high),
        recommended=recommended,
        in_target=bool(inside),
    )


def _norms(
    model: nn.Module,
    data_loader: Iterable[Any],
    criterion: Callable[[Tensor, Tensor], Tensor],
    batches: int,
    reduction: str,
    batch_first: bool,
) -> list[Tensor]:
    """Per-example gradient norms of the first ``batches`` batches, leaving no trace."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = PerSampleEngine(
        model,
        trainable,
        batch_first=batch_first,
        loss_reduction=reduction,  # type: ignore[arg-type]
    )
    saved_grads = [(p, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    # The norms do not depend on C; any policy works, and this one clips nothing away.
    policy = FlatClipping(1.0)
    found: list[Tensor] = [torch.zeros(0, dtype=torch.float64)]
    engine.attach()
    try:
        with torch.random.fork_rng(devices=[]):  # dropout must not move the caller's RNG
            model.train()
            for index, batch in enumerate(data_loader):
                if index == batches:
                    break
                inputs, targets = _split(batch)
                for param, _ in saved_grads:
                    param.grad = None
                criterion(model(inputs), targets).backward()
                found.append(engine.clip(policy).result.norms.detach().to(torch.float64).cpu())
                engine.clear()
    finally:
        engine.detach()
        _restore_modes(modes)
        for param, grad in saved_grads:
            param.grad = grad
    return found


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _split(batch: Any) -> tuple[Any, Tensor]:
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        raise DPTypeError(
            f"sweep_max_grad_norm needs batches of (inputs, targets); got a "
            f"{type(batch).__name__}. Wrap the loader to yield such pairs."
        )
    return batch[0], batch[1]


def _check_candidates(candidates: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(c) for c in candidates)
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(c) and c > 0 for c in values):
        raise DPValueError(
            f"candidates={candidates!r} must be a non-empty sequence of positive, finite "
            "clipping norms, e.g. (0.1, 0.5, 1.0, 1.5, 2.0)."
        )
    return values


def _check_target(target: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(t) for t in target)
    except (TypeError, ValueError):
        low, high = math.nan, math.nan
    if not 0 <= low <= high <= 1:
        raise DPValueError(
            f"target={target!r} must be (low, high) with 0 <= low <= high <= 1, the clipped "
            "fraction aimed at, e.g. (0.5, 0.8)."
        )
    return low, high


def _check_quantiles(quantiles: Sequence[float]) -> list[float]:
    levels = [float(q) for q in quantiles]
    if not all(0 <= q <= 1 for q in levels):
        raise DPValueError(
            f"quantiles={tuple(quantiles)!r} must lie in [0, 1], e.g. (0.1, 0.5, 0.9)."
        )
    return levels
