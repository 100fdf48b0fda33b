"""Poisson sampling split over the ranks of a ``torch.distributed`` run.

Every rank draws the SAME Poisson logical batch (the sampler's generator has the same state
on every rank) and keeps every ``world_size``-th index of it, starting at its rank. So:

- the union of the ranks' batches is exactly one Poisson sample of the whole dataset at rate
  q, the batch one process would draw with the same seed;
- every example of that batch is on exactly one rank;
- local batch sizes differ by at most one, and every rank yields the same number of
  batches (empty local batches included), so no rank skips a collective;
- the sampler state is the same on every rank, so one rank's checkpoint resumes them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Integral
from typing import Any

import torch
from torch.utils.data import Dataset

from dptorch.data.dp_data_loader import DPDataLoader
from dptorch.data.poisson_sampler import PoissonBatchSampler
from dptorch.distributed import GradientSync
from dptorch.errors import DPValueError

__all__ = ["DistributedDPDataLoader", "DistributedPoissonBatchSampler"]


class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """A :class:`PoissonBatchSampler` that yields rank ``rank``'s share of every batch.

    Args:
        num_samples: size N of the WHOLE dataset (not of a shard).
        sample_rate: inclusion probability q of every example, in ``(0, 1]``.
        steps: batches per pass; defaults to ``round(1 / q)``.
        generator: must have the same state on every rank (see
            :class:`DistributedDPDataLoader`, which broadcasts it).
        rank: this process's rank, in ``[0, world_size)``.
        world_size: the number of ranks sharing each batch.

    Privacy: the union over ranks of batch t is ``{i : u_t[i] < q}`` for one common uniform
    draw ``u_t``, i.e. a Poisson sample at rate q, as the accountant assumes; the split
    between ranks depends only on that batch, so it changes nothing in the analysis.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        *,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(num_samples, sample_rate, steps, generator)
        if not _is_int(world_size) or world_size < 1:
            raise DPValueError(f"world_size={world_size!r} must be a positive int.")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise DPValueError(
                f"rank={rank!r} must be an int in [0, world_size={world_size}); pass "
                "torch.distributed.get_rank()."
            )
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield batch[self.rank :: self.world_size]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, sample_rate="
            f"{self.sample_rate!r}, steps={self.steps}, rank={self.rank}, "
            f"world_size={self.world_size})"
        )


class DistributedDPDataLoader(DPDataLoader):
    """A :class:`DPDataLoader` whose batches are this rank's share of a common Poisson batch.

    Build it on every rank with the full dataset and the same settings (``from_data_loader``
    works too). The sampler generator's state is broadcast from rank 0 when the loader is
    built, so every rank draws the same logical batches whatever its global RNG.

    Args:
        dataset: the whole map-style dataset (every rank holds it).
        sample_rate: q, the inclusion probability of each example in the GLOBAL batch.
        group: the ``torch.distributed`` process group (``None``: the default group); its
            rank and size decide the split.
        **kwargs: as for :class:`DPDataLoader` (``steps``, ``generator``, ``collate_fn``,
            ``num_workers``, ...).

    Privacy: as :class:`DPDataLoader`, for the union of the ranks' batches.
    :attr:`expected_batch_size` is the GLOBAL ``q * N``, the divisor of the all-reduced sum.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        sample_rate: float,
        group: Any = None,
        **kwargs: Any,
    ) -> None:
        self._sync = GradientSync.from_group(group)
        super().__init__(dataset, sample_rate=sample_rate, **kwargs)
        assert self.generator is not None  # DPDataLoader always makes one
        self._sync.broadcast_generator(self.generator)

    def _batch_sampler(
        self, num_samples: int, sample_rate: float, steps: int | None, generator: torch.Generator
    ) -> PoissonBatchSampler:
        return DistributedPoissonBatchSampler(
            num_samples,
            sample_rate,
            steps,
            generator,
            rank=self._sync.rank,
            world_size=self._sync.world_size,
        )

    @property
    def rank(self) -> int:
        return self._sync.rank

    @property
    def world_size(self) -> int:
        return self._sync.world_size


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)
