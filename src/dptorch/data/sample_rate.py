"""Which Poisson rate q describes a user's ``DataLoader``, and when that cannot be known.

The accountant charges every step as a Poisson subsample with rate q. When an ordinary
loader is converted to Poisson sampling, q is read off its batch size only where that is what
the user clearly meant: uniform sampling over the whole dataset, ``batch_size`` examples per
batch. Anything else (weighted or subset samplers, custom batch samplers, streams) is refused
rather than guessed, because a wrong q silently yields a wrong epsilon.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from dptorch.data.poisson_sampler import PoissonBatchSampler, check_sample_rate
from dptorch.errors import SampleRateError

__all__ = ["dataset_length", "infer_sample_rate", "resolve_sample_rate"]

_FIX = (
    "If you know the loader's sampling is Poisson with rate q, pass sample_rate=q explicitly; "
    "otherwise build the loader with the default sampler (shuffle=True or False, no sampler= "
    "or batch_sampler=) and an int batch_size, so that q = batch_size / len(dataset)."
)


def dataset_length(dataset: Any, *, where: str = "data_loader.dataset") -> int:
    """Length of a map-style dataset that Poisson sampling can index, or a SampleRateError.

    Privacy:
        Poisson sampling draws indices ``0..N-1``; it needs a map-style dataset whose length
        N is fixed. A stream (``IterableDataset``) yields whatever it yields, so no
        subsampling rate can be guaranteed for it and it is always refused.

    Raises:
        SampleRateError: the dataset is an ``IterableDataset``, has no ``len()``, or is empty.
    """
    kind = type(dataset).__name__
    if isinstance(dataset, IterableDataset):
        raise SampleRateError(
            f"{where} ({kind}) is an IterableDataset: its examples cannot be drawn by index, "
            "so they cannot be Poisson-sampled and no sample rate q would be true, which "
            "would make the privacy accounting wrong. Use a map-style Dataset with "
            "__getitem__ and __len__ (e.g. load the stream into a TensorDataset)."
        )
    try:
        n = len(dataset)
    except TypeError:
        raise SampleRateError(
            f"{where} ({kind}) has no len(): Poisson sampling needs the dataset size N to "
            "draw indices 0..N-1 and to know q. Give the dataset a __len__ method."
        ) from None
    if n < 1:
        raise SampleRateError(
            f"{where} ({kind}) is empty (len 0): there is nothing to sample, and the "
            "rate q = batch_size / len(dataset) is undefined. Pass a non-empty dataset."
        )
    return int(n)


def _sampler_problem(sampler: Any, n: int) -> str | None:
    """Why ``sampler`` is not a uniform pass over all ``n`` examples, or None if it is."""
    kind = type(sampler).__name__
    # Exact types: a subclass may override __iter__ and sample anything at all.
    if type(sampler) is SequentialSampler:
        if len(sampler) != n:
            return (
                f"its SequentialSampler walks {len(sampler)} examples, not "
                f"len(dataset)={n}, so batch_size / len(dataset) is not the rate at which "
                "examples are used"
            )
        return None
    if type(sampler) is RandomSampler:
        if sampler.replacement:
            return (
                "its RandomSampler draws with replacement (replacement=True), so examples "
                "repeat within an epoch and batches are not Poisson subsamples"
            )
        if sampler.num_samples != n:
            return (
                f"its RandomSampler draws num_samples={sampler.num_samples} examples per "
                f"epoch, not len(dataset)={n}, so batch_size / len(dataset) is not the rate "
                "at which examples are used"
            )
        return None
    return (
        f"it uses a custom sampler ({kind}); it may sample examples with unequal "
        "probabilities or from a subset (as WeightedRandomSampler and SubsetRandomSampler "
        "do), so batch_size / len(dataset) need not be any example's sampling rate"
    )


def infer_sample_rate(data_loader: DataLoader) -> float:
    """Infer the Poisson rate ``q = batch_size / len(dataset)`` that a loader stands for.

    A ``DPDataLoader`` (or any loader whose ``batch_sampler`` is a
    :class:`PoissonBatchSampler` over the whole dataset) reports its sampler's own rate.

    Privacy:
        The returned q is what the accountant will charge per step. It is inferred only from
        loaders that draw uniformly over the whole dataset (``RandomSampler`` without
        replacement or ``SequentialSampler``, wrapped in torch's default ``BatchSampler``),
        where each example's chance of being in a Poisson batch of the same expected size is
        exactly ``batch_size / len(dataset)``. Every other loader is refused, since a guessed
        q would understate the privacy cost.

    Args:
        data_loader: the user's ``torch.utils.data.DataLoader``.

    Returns:
        q in ``(0, 1]``.

    Raises:
        SampleRateError: q cannot be inferred; the message lists every reason at once.
    """
    n = dataset_length(data_loader.dataset)
    batch_sampler = data_loader.batch_sampler
    if isinstance(batch_sampler, PoissonBatchSampler):
        if batch_sampler.num_samples == n:
            return batch_sampler.sample_rate
        problems = [
            f"its PoissonBatchSampler draws from num_samples={batch_sampler.num_samples} "
            f"indices but len(dataset)={n}"
        ]
    elif batch_sampler is None:
        problems = [
            "batch_size=None (automatic batching is off), so there is no batch size to "
            "divide by len(dataset)"
        ]
    elif type(batch_sampler) is not BatchSampler:
        problems = [
            f"it uses a custom batch_sampler ({type(batch_sampler).__name__}), which may "
            "form batches of any size from any examples, so no single rate q describes it"
        ]
    else:
        problems = []
        sampler_problem = _sampler_problem(batch_sampler.sampler, n)
        if sampler_problem is not None:
            problems.append(sampler_problem)
        batch_size = batch_sampler.batch_size
        if batch_size > n:
            problems.append(
                f"batch_size={batch_size} is larger than len(dataset)={n}, which would "
                "give a sample rate above 1"
            )
        if not problems:
            return batch_size / n
    reasons = "; ".join(problems)
    raise SampleRateError(
        f"Cannot infer the Poisson sample rate q of this DataLoader: {reasons}. The accountant "
        f"needs the true q, and a wrong one would report a smaller epsilon than the training "
        f"really spent. {_FIX}"
    )


def resolve_sample_rate(data_loader: DataLoader, sample_rate: float | None) -> float:
    """``sample_rate`` if given (after validation), else :func:`infer_sample_rate`.

    Privacy:
        An explicit ``sample_rate`` is trusted: the sampler checks are skipped, and the
        caller asserts that q is the rate the new Poisson sampler should use. The dataset
        must still be map-style with a length, as Poisson sampling draws indices.

    Raises:
        SampleRateError: the rate is outside ``(0, 1]``, the dataset cannot be indexed, or
            (without ``sample_rate``) q cannot be inferred.
    """
    if sample_rate is None:
        return infer_sample_rate(data_loader)
    dataset_length(data_loader.dataset)
    return check_sample_rate(sample_rate)
