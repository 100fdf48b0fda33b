"""Poisson subsampling of example indices: each example joins each batch independently.

This is the sampling scheme the usual DP-SGD analyses assume (Abadi et al. 2016,
arXiv 1607.00133; Mironov et al. 2019, arXiv 1908.10530): at every step, every example is
included independently with probability ``q``, so batch sizes vary and a batch may be empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from numbers import Integral, Real

import torch
from torch.utils.data import Sampler

from dptorch.errors import DPTypeError, DPValueError, SampleRateError

__all__ = ["PoissonBatchSampler", "check_sample_rate", "default_steps"]


def check_sample_rate(sample_rate: float, *, name: str = "sample_rate") -> float:
    """Return ``sample_rate`` as a float after checking ``0 < q <= 1``.

    Args:
        sample_rate: the Poisson inclusion probability q.
        name: the argument name to quote in error messages.

    Returns:
        ``float(sample_rate)``.

    Raises:
        DPTypeError: ``sample_rate`` is not a real number (``bool`` is refused too).
        SampleRateError: ``sample_rate`` is not in ``(0, 1]``.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, Real):
        raise DPTypeError(
            f"{name}={sample_rate!r} must be a real number in (0, 1], the probability that "
            f"each example joins a batch; pass e.g. {name}=batch_size / len(dataset)."
        )
    q = float(sample_rate)
    if not (math.isfinite(q) and 0.0 < q <= 1.0):
        raise SampleRateError(
            f"{name}={sample_rate!r} is outside (0, 1]; it is the probability that each "
            f"example joins a batch, so pass a value such as {name}=batch_size / len(dataset)."
        )
    return q


def default_steps(sample_rate: float) -> int:
    """Number of Poisson batches in one *expected* epoch: ``round(1 / q)``, at least 1."""
    return max(1, round(1.0 / sample_rate))


def _check_positive_int(value: int | None, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise DPTypeError(f"{name}={value!r} must be an int; {fix}")
    if value < 1:
        raise DPValueError(f"{name}={value!r} must be at least 1; {fix}")
    return int(value)


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches of indices, each a Poisson subsample of ``range(num_samples)``.

    Every index joins every batch independently with probability ``sample_rate``; batch sizes
    therefore follow ``Binomial(num_samples, sample_rate)`` and a batch may be empty. Indices
    within a batch are in increasing order.

    Privacy:
        Privacy amplification by subsampling (and so every accountant in ``dptorch``)
        assumes exactly this scheme with this ``sample_rate``: each example included
        independently, with the same probability, at every step. Batches are drawn from
        ``generator`` only, so anyone who knows its seed knows which examples were used;
        seed it from a secure source when the batch composition must stay secret.

    Args:
        num_samples: size N of the dataset the indices refer to (at least 1).
        sample_rate: inclusion probability q, in ``(0, 1]``.
        steps: batches per iteration (``len(sampler)``); defaults to ``round(1 / q)``
            (at least 1), one expected pass over the data.
        generator: source of randomness. Its state alone determines the batches, so equal
            seeds give equal batches. ``None`` uses torch's default (global) generator.

    Raises:
        DPTypeError: an argument has the wrong type.
        DPValueError: ``num_samples`` or ``steps`` is below 1.
        SampleRateError: ``sample_rate`` is not in ``(0, 1]``.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.num_samples = _check_positive_int(
            num_samples, "num_samples", "pass the dataset size, e.g. num_samples=len(dataset)."
        )
        self.sample_rate = check_sample_rate(sample_rate)
        if steps is None:
            self.steps = default_steps(self.sample_rate)
        else:
            self.steps = _check_positive_int(
                steps, "steps", "pass the number of batches wanted, or steps=None for one epoch."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DPTypeError(
                f"generator={generator!r} must be a torch.Generator or None; create one with "
                "torch.Generator().manual_seed(seed)."
            )
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            # One uniform draw per example: comparing against q gives independent
            # Bernoulli(q) inclusions without a Python loop over examples.
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, "
            f"sample_rate={self.sample_rate!r}, steps={self.steps})"
        )
