"""``DPDataLoader``: a ``DataLoader`` whose batches are Poisson subsamples of the dataset."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_convert

from dptorch.data.empty_batch import CollateFn, EmptyBatchCollate
from dptorch.data.poisson_sampler import PoissonBatchSampler, check_sample_rate
from dptorch.data.sample_rate import dataset_length, resolve_sample_rate
from dptorch.errors import DPValueError
from dptorch.secure_random import SecureRandom

__all__ = ["DPDataLoader"]

# DataLoader arguments that choose which examples form a batch; Poisson sampling decides
# that alone, so accepting them would silently sample differently from what is accounted.
_SAMPLING_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")

# Settings of a user's loader that only affect how batches are loaded, not which examples
# are in them; from_data_loader carries them over.
_LOADING_ATTRS = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


class DPDataLoader(DataLoader):
    """A ``DataLoader`` that draws each batch by Poisson sampling with rate ``sample_rate``.

    Each of the ``steps`` batches holds every example independently with probability q
    (see :class:`PoissonBatchSampler`), so batch sizes vary around
    :attr:`expected_batch_size` and a batch may be empty; an empty batch comes out with the
    usual structure and batch dimension 0 (see :func:`empty_batch_like`).

    Privacy:
        ``sample_rate`` is the q the accountant must charge per step, and it is the rate the
        sampler really uses. Empty batches still yield a batch so the step still runs,
        adds noise and is accounted. Normalise the noisy gradient sum by
        :attr:`expected_batch_size`, never by the realised batch size, which depends on the
        data.

    Args:
        dataset: a map-style dataset with ``__len__`` (``IterableDataset`` is refused).
        sample_rate: inclusion probability q in ``(0, 1]``.
        steps: batches per pass (``len(loader)``); defaults to ``round(1 / q)``.
        collate_fn: merges a list of examples into a batch; ``None`` means
            ``default_collate``. It is wrapped to handle empty batches.
        generator: drives the sampler (and worker seeds); equal seeds give equal batches.
            ``None`` makes a new generator seeded from torch's global RNG, so
            ``torch.manual_seed`` still fixes the batches, and dropout or noise drawn during
            training does not change them. A :class:`~dptorch.secure_random.SecureRandom`
            (secure mode) draws the batches from a CSPRNG; they cannot be replayed.
        num_workers: as in ``DataLoader``.
        pin_memory: as in ``DataLoader``.
        **kwargs: other ``DataLoader`` arguments that do not select examples
            (``timeout``, ``worker_init_fn``, ``prefetch_factor``, ...).

    Raises:
        SampleRateError: ``sample_rate`` is outside ``(0, 1]`` or the dataset cannot be
            indexed (iterable, no length, empty).
        DPValueError: a sampling argument (``batch_size``, ``shuffle``, ``sampler``,
            ``batch_sampler``, ``drop_last``) was passed.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        sample_rate: float,
        steps: int | None = None,
        collate_fn: CollateFn | None = None,
        generator: torch.Generator | SecureRandom | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        **kwargs: Any,
    ) -> None:
        clashing = sorted(k for k in _SAMPLING_KWARGS if k in kwargs)
        if clashing:
            names = ", ".join(f"{k}={kwargs[k]!r}" for k in clashing)
            raise DPValueError(
                f"DPDataLoader got {names}, but Poisson sampling alone decides which examples "
                "form each batch (each joins with probability sample_rate), so these would be "
                "ignored or contradict the accounting. Remove them; use sample_rate= for the "
                "expected batch size (sample_rate * len(dataset))."
            )
        num_samples = dataset_length(dataset, where="dataset")
        q = check_sample_rate(sample_rate)
        secure = None
        if isinstance(generator, SecureRandom):
            # The CSPRNG draws the batches; DataLoader's own generator (worker seeds) only
            # needs to be unpredictable.
            secure, generator = generator, torch.Generator().manual_seed(generator.seed())
        if generator is None:
            # A generator of its own lets a checkpoint replay the sampler mid-pass without
            # rewinding the global RNG that the model and the noise also draw from.
            seed = int(torch.empty((), dtype=torch.int64).random_())
            generator = torch.Generator().manual_seed(seed)
        batch_sampler = self._batch_sampler(num_samples, q, steps, generator)
        if secure is not None:
            if type(batch_sampler) is not PoissonBatchSampler:
                raise DPValueError(
                    f"{type(self).__name__} does not support a SecureRandom generator yet; "
                    "use DPDataLoader, or a torch.Generator."
                )
            batch_sampler.generator = secure
        self.secure_generator = secure
        if isinstance(collate_fn, EmptyBatchCollate):
            collate_fn = collate_fn.collate_fn  # never wrap twice
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=EmptyBatchCollate(dataset, collate_fn),
            generator=generator,
            num_workers=num_workers,
            pin_memory=pin_memory,
            **kwargs,
        )
        self.sample_rate = q
        self._sampler = batch_sampler
        self._position = 0  # batches of the current pass handed out
        self._resume_position = 0  # where the next pass starts (after load_state_dict)

    def _batch_sampler(
        self, num_samples: int, sample_rate: float, steps: int | None, generator: torch.Generator
    ) -> PoissonBatchSampler:
        """The sampler of index batches (a distributed loader yields a rank's share)."""
        return PoissonBatchSampler(
            num_samples=num_samples, sample_rate=sample_rate, steps=steps, generator=generator
        )

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._position, self._resume_position = self._resume_position, 0
        return _CountingIterator(super().__iter__(), self)

    def state_dict(self) -> dict[str, Any]:
        """Where sampling stands: enough to continue the same batches after a restart.

        Returns:
            Plain types and a uint8 tensor only (``torch.load(weights_only=True)`` reads it):
            the sampler's generator state, how many batches of the current pass were used,
            and the rate, steps and dataset size to check the resumed loader against.
        """
        state = self._sampler.resume_state(consumed=self._position)
        return {
            "generator_state": state["generator_state"],
            "position": state["skip"],
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "num_samples": dataset_length(self.dataset, where="dataset"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next pass yields only the unused batches.

        After loading a mid-pass state, the next ``iter(loader)`` yields the last
        ``steps - position`` batches of the interrupted pass, identical to those it would
        have yielded; later passes are full.

        Raises:
            DPValueError: the state was saved by a loader with another sample rate, number
                of steps or dataset size (all differences are reported), or is malformed.
        """
        if not isinstance(state, dict):
            raise DPValueError(
                f"state has type {type(state).__name__}; pass the dict returned by "
                "DPDataLoader.state_dict()."
            )
        ours = {
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "num_samples": dataset_length(self.dataset, where="dataset"),
        }
        differ = [
            f"{key}: saved {state.get(key)!r}, this loader {value!r}"
            for key, value in ours.items()
            if state.get(key) != value
        ]
        if differ:
            raise DPValueError(
                "The saved loader state does not match this DPDataLoader ("
                + "; ".join(differ)
                + "). Resume with a loader built from the same dataset, sample_rate and steps."
            )
        position = state.get("position")
        self._sampler.load_resume_state(
            {"generator_state": state.get("generator_state"), "skip": position}
        )
        self._resume_position = int(position)  # type: ignore[arg-type]

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * len(dataset)``: the mean batch size, and the DP-SGD normaliser."""
        return self.sample_rate * dataset_length(self.dataset, where="dataset")

    @property
    def steps(self) -> int:
        """Number of batches per pass over the loader (``len(self)``)."""
        return len(self)

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        generator: torch.Generator | SecureRandom | None = None,
        sample_rate: float | None = None,
        steps: int | None = None,
    ) -> DPDataLoader:
        """Make a Poisson-sampled copy of ``data_loader``.

        The dataset, collate function and loading settings (``num_workers``, ``pin_memory``,
        ``worker_init_fn``, ``multiprocessing_context``, ``timeout``, ``prefetch_factor``,
        ``persistent_workers``, ``pin_memory_device``, ``in_order``) are kept. ``batch_size``,
        ``shuffle``, ``sampler`` and ``drop_last`` are dropped: Poisson sampling replaces them.

        Privacy:
            Without ``sample_rate``, q is inferred by :func:`infer_sample_rate` as
            ``batch_size / len(dataset)`` and loaders whose sampling is not uniform over the
            whole dataset are refused. A given ``sample_rate`` skips those checks: it is
            trusted as the rate the new loader samples with. A ``DPDataLoader`` keeps its
            own rate and steps unless they are given.

        Args:
            data_loader: the user's loader (a ``DPDataLoader`` too).
            generator: drives the sampler; ``None`` reuses ``data_loader.generator``, so a
                seeded loader stays reproducible (torch's default generator if that is
                ``None`` too).
            sample_rate: q to use instead of inferring it.
            steps: batches per pass; defaults to the loader's own for a ``DPDataLoader``,
                else ``round(1 / q)``.

        Returns:
            A new :class:`DPDataLoader`.

        Raises:
            SampleRateError: q cannot be inferred, the given q is outside ``(0, 1]``, or the
                dataset is iterable, has no length, or is empty.
        """
        if isinstance(data_loader, DPDataLoader):
            if sample_rate is None:
                sample_rate = data_loader.sample_rate
            if steps is None:
                steps = data_loader.steps
        q = resolve_sample_rate(data_loader, sample_rate)
        collate_fn: CollateFn | None = data_loader.collate_fn
        if data_loader.batch_sampler is None and collate_fn is default_convert:
            # torch's stand-in when batch_size=None turned batching off; Poisson batches
            # need real collation.
            collate_fn = None
        loading = {
            name: getattr(data_loader, name)
            for name in _LOADING_ATTRS
            if hasattr(data_loader, name)
        }
        return cls(
            data_loader.dataset,
            sample_rate=q,
            steps=steps,
            collate_fn=collate_fn,
            generator=generator
            if generator is not None
            else getattr(data_loader, "secure_generator", None) or data_loader.generator,
            **loading,
        )


class _CountingIterator:
    """Passes a loader iterator's batches through, counting them on the loader.

    Counting what the consumer received (not what the sampler drew) keeps the position
    right when worker processes prefetch batches ahead.
    """

    def __init__(self, inner: Iterator[Any], loader: DPDataLoader) -> None:
        self._inner = inner
        self._loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._inner)
        self._loader._position += 1
        return batch

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]
