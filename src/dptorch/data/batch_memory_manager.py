"""``BatchMemoryManager``: train on large logical batches with bounded memory.

Each Poisson-sampled logical batch is split into physical batches of at most
``max_physical_batch_size`` examples. The optimizer clips and accumulates every physical batch
and releases the logical batch's sum with one noise draw and one accounting step when its
last physical batch steps. Memory then follows the physical size, while privacy (sigma, q, the
divisor ``q * N``) is that of the logical batch, exactly as without splitting.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from torch.utils.data import DataLoader, Sampler

from dptorch.data.distributed_sampler import DistributedPoissonBatchSampler
from dptorch.data.dp_data_loader import DPDataLoader
from dptorch.errors import DPTypeError, DPValueError, DPWarning
from dptorch.optimizers import DPOptimizer

__all__ = ["BatchMemoryManager"]

# Loader settings that only change how batches are loaded; the physical loader keeps them.
_LOADING_ATTRS = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
)


class _PhysicalBatchSampler(Sampler[list[int]]):
    """Splits each batch of ``batch_sampler`` into runs of at most ``max_size`` indices.

    For every physical batch it yields, it appends to :attr:`ends` whether that batch ends
    its logical batch. The DataLoader pulls indices ahead of the training loop (workers
    prefetch), so the loader consumes these flags in the same order as the batches come out.
    An empty logical batch gives one empty physical batch.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], max_size: int) -> None:
        self.batch_sampler = batch_sampler
        self.max_size = max_size
        self.ends: deque[bool] = deque()

    def __len__(self) -> int:
        """The EXPECTED number of physical batches (the real one is random)."""
        logical = len(self.batch_sampler)  # type: ignore[arg-type]
        expected = getattr(self.batch_sampler, "sample_rate", None)
        num_samples = getattr(self.batch_sampler, "num_samples", None)
        if expected is None or num_samples is None:
            return logical
        return logical * max(1, math.ceil(expected * num_samples / self.max_size))

    def __iter__(self) -> Iterator[list[int]]:
        self.ends = deque()
        return self._split(self.ends)

    def _split(self, ends: deque[bool]) -> Iterator[list[int]]:
        for pieces in self._logical_batches():
            for i, piece in enumerate(pieces):
                ends.append(i == len(pieces) - 1)
                yield piece

    def _logical_batches(self) -> Iterator[list[list[int]]]:
        """Each logical batch as its physical batches (one empty one for an empty batch)."""
        sampler = self.batch_sampler
        if isinstance(sampler, DistributedPoissonBatchSampler):
            # Split the common batch into pieces of W * max_size and give each rank its rows
            # of every piece, so that every rank runs the same number of physical batches:
            # with FSDP2 each forward all-gathers parameters, a collective on all ranks.
            step, rank, world = sampler.world_size * self.max_size, sampler.rank, sampler.world_size
            for batch in super(DistributedPoissonBatchSampler, sampler).__iter__():
                yield [batch[s : s + step][rank::world] for s in range(0, len(batch), step)] or [[]]
            return
        for batch in sampler:
            indices = list(batch)
            starts = range(0, len(indices), self.max_size) if indices else range(1)
            yield [indices[start : start + self.max_size] for start in starts]


class _PhysicalBatchLoader(DataLoader):
    """A DataLoader over physical batches that tells the optimizer which step releases."""

    batch_sampler: _PhysicalBatchSampler

    def __init__(
        self, source: DataLoader[Any], sampler: _PhysicalBatchSampler, optimizer: DPOptimizer
    ) -> None:
        loading = {name: getattr(source, name) for name in _LOADING_ATTRS if hasattr(source, name)}
        super().__init__(
            source.dataset,
            batch_sampler=sampler,
            collate_fn=source.collate_fn,
            generator=source.generator,
            **loading,
        )
        self.optimizer = optimizer
        self.logical_loader = source

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # The logical loader counts the logical batches handed out, so a checkpoint taken
        # between logical steps resumes the pass at the right batch (see DPDataLoader).
        source = self.logical_loader if isinstance(self.logical_loader, DPDataLoader) else None
        if source is not None:
            source._position, source._resume_position = source._resume_position, 0
        batches = super().__iter__()
        ends = self.batch_sampler.ends  # created by the sampler's __iter__ just now
        try:
            for batch in batches:
                last = ends.popleft()
                self.optimizer.set_accumulating(not last)
                if source is not None and last:
                    source._position += 1
                yield batch
        finally:
            self.optimizer.set_accumulating(False)


class BatchMemoryManager:
    """Context manager that splits Poisson logical batches into bounded physical batches.

    Inside the ``with`` block the training loop is unchanged::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=32,
                                optimizer=optimizer) as physical_loader:
            for x, y in physical_loader:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()   # releases only at the end of each logical batch

    ``optimizer.is_accumulating`` is True while the current physical batch is not the last of
    its logical batch, and ``optimizer.logical_steps`` counts released steps, so schedulers
    and callbacks can act on logical steps only.

    Args:
        data_loader: the loader ``make_private`` returned (usually a
            :class:`~dptorch.data.DPDataLoader`); its batch sampler draws the logical batches.
        max_physical_batch_size: most examples per forward/backward pass.
        optimizer: the :class:`~dptorch.optimizers.DPOptimizer` ``make_private`` returned.

    Privacy: splitting changes nothing the guarantee depends on. Logical batches are drawn by
    the same sampler with the same generator; the physical batches of a logical batch are
    disjoint, their clipped sums add up to the logical batch's sum, and that sum gets one
    ``N(0, (sigma C)^2)`` draw, one division by the expected LOGICAL batch size ``q * N`` and
    one accounting step. Leaving the block mid-way through a logical batch discards its
    pending sum unreleased.

    Raises:
        DPTypeError: ``optimizer`` is not a DPOptimizer, or ``data_loader`` has no batch
            sampler.
        DPValueError: ``max_physical_batch_size`` is not a positive int, or the loader
            returns batches out of order (``in_order=False`` with workers).
    """

    def __init__(
        self,
        *,
        data_loader: DataLoader[Any],
        max_physical_batch_size: int,
        optimizer: DPOptimizer,
    ) -> None:
        if not isinstance(optimizer, DPOptimizer):
            raise DPTypeError(
                f"optimizer={type(optimizer).__name__} is not a DPOptimizer; pass the optimizer "
                "returned by PrivacyEngine.make_private, which accumulates physical batches."
            )
        if not isinstance(data_loader, DataLoader) or data_loader.batch_sampler is None:
            raise DPTypeError(
                f"data_loader={type(data_loader).__name__} must be a DataLoader with a batch "
                "sampler; pass the loader returned by PrivacyEngine.make_private."
            )
        size = max_physical_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DPValueError(
                f"max_physical_batch_size={size!r} must be a positive int: the most examples "
                "one forward/backward pass may hold, e.g. max_physical_batch_size=32."
            )
        if data_loader.num_workers > 0 and getattr(data_loader, "in_order", True) is False:
            raise DPValueError(
                "data_loader has in_order=False, so its workers may return batches out of "
                "order and a physical batch could be counted in the wrong logical batch. "
                "Build the loader with in_order=True (the default)."
            )
        self.data_loader = data_loader
        self.max_physical_batch_size = size
        self.optimizer = optimizer

    def __enter__(self) -> DataLoader[Any]:
        sampler = _PhysicalBatchSampler(
            self.data_loader.batch_sampler,  # type: ignore[arg-type]
            self.max_physical_batch_size,
        )
        return _PhysicalBatchLoader(self.data_loader, sampler, self.optimizer)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        unfinished = self.optimizer.discard_accumulated()
        if unfinished and exc_type is None:
            warnings.warn(
                "BatchMemoryManager exited in the middle of a logical batch; its physical "
                "batches so far were discarded without an update (nothing was released or "
                "accounted). Leave the loop only after a step with "
                "optimizer.is_accumulating == False.",
                DPWarning,
                stacklevel=2,
            )
