"""Datasets that give each example several augmented views (augmentation multiplicity).

Used with ``make_private(..., augmentation_multiplicity=K)``: the Poisson sampler still
samples examples, each sampled example brings ``K`` rows to the batch, and the engine averages
each example's ``K`` row gradients before clipping (see :mod:`dptorch.per_sample.grouping`).

Privacy: the unit of privacy stays the example. All ``K`` views of one example are in or out
of a batch together, and their mean gradient is clipped as one, so the sensitivity and the
accounting are those of one row per example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from dptorch.errors import DPTypeError, DPValueError


class AugmentationMultiplicity(Dataset[tuple[Tensor, Tensor]]):
    """Wrap a ``(input, label)`` dataset: item ``i`` is ``K`` augmented inputs and ``K`` labels.

    Args:
        dataset: the base dataset; ``dataset[i]`` must be ``(input, label)``.
        transform: the random augmentation, applied independently to each of the ``K`` copies
            (it draws from torch's global generator, like torchvision transforms).
        multiplicity: ``K``, the number of views per example.

    Items are ``(inputs [K, ...], labels [K])``; pass ``collate_fn=flatten_views`` to the
    data loader so batches come out as ``[B * K, ...]`` with each example's views adjacent.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        transform: Callable[[Tensor], Tensor],
        multiplicity: int,
    ) -> None:
        if not isinstance(multiplicity, int) or multiplicity < 1:
            raise DPValueError(
                f"multiplicity={multiplicity!r} must be a positive integer (views per example)."
            )
        if not callable(transform):
            raise DPTypeError(f"transform={transform!r} must be callable (an augmentation).")
        self.dataset = dataset
        self.transform = transform
        self.multiplicity = multiplicity

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[index]
        views = torch.stack([self.transform(x) for _ in range(self.multiplicity)])
        labels = torch.as_tensor(y).expand(self.multiplicity).clone()
        return views, labels


def flatten_views(batch: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Collate ``(views [K, ...], labels [K])`` items into ``[B * K, ...]`` and ``[B * K]``."""
    views, labels = default_collate(list(batch))  # [B, K, ...], [B, K]
    return [views.flatten(0, 1), labels.flatten(0, 1)]
