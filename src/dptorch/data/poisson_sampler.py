"""Poisson subsampling of example indices: each example joins each batch independently.

This is the sampling scheme the usual DP-SGD analyses assume (Abadi et al. 2016,
arXiv 1607.00133; Mironov et al. 2019, arXiv 1908.10530): at every step, every example is
included independently with probability ``q``, so batch sizes vary and a batch may be empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from dptorch.errors import DPTypeError, DPValueError, SampleRateError
from dptorch.secure_random import SecureRandom

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
        seed it from a secure source when the batch composition must stay secret, or pass
        a :class:`~dptorch.secure_random.SecureRandom` (secure mode): each inclusion is
        then a CSPRNG Bernoulli with probability ``ceil(q 2^64) / 2^64`` (q itself, or
        less than ``2^-64`` above it), and the batches cannot be replayed by anyone.

    Args:
        num_samples: size N of the dataset the indices refer to (at least 1).
        sample_rate: inclusion probability q, in ``(0, 1]``.
        steps: batches per iteration (``len(sampler)``); defaults to ``round(1 / q)``
            (at least 1), one expected pass over the data.
        generator: source of randomness. Its state alone determines the batches, so equal
            seeds give equal batches. ``None`` uses torch's default (global) generator. A
            :class:`~dptorch.secure_random.SecureRandom` draws secure, unrepeatable batches.

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
        generator: torch.Generator | SecureRandom | None = None,
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
        if generator is not None and not isinstance(generator, torch.Generator | SecureRandom):
            raise DPTypeError(
                f"generator={generator!r} must be a torch.Generator, a SecureRandom or None; "
                "create one with torch.Generator().manual_seed(seed)."
            )
        self.generator = generator
        # The generator's state before the first draw of the latest pass, and a pass to
        # resume (start state, batches to skip); see resume_state / load_resume_state.
        self._pass_start: Tensor | None = None
        self._resume: tuple[Tensor, int] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        if isinstance(self.generator, SecureRandom):
            yield from self._secure_batches(self.generator)
            return
        # This body runs at the first next(), after DataLoader has drawn its worker base seed
        # from the same generator; restoring a saved pass here makes that extra draw harmless.
        generator = self._draw_generator()
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            generator.set_state(state)
        self._pass_start = generator.get_state()
        for index in range(self.steps):
            # One uniform draw per example: comparing against q gives independent
            # Bernoulli(q) inclusions without a Python loop over examples.
            mask = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            if index >= skip:  # a resumed pass replays the draws of the batches already used
                yield mask.nonzero().flatten().tolist()

    def _secure_batches(self, source: SecureRandom) -> Iterator[list[int]]:
        """Fresh CSPRNG batches; a resumed pass yields only the ``steps - skip`` still due."""
        skip = self._resume[1] if self._resume is not None else 0
        self._resume = None
        for _ in range(self.steps - skip):
            yield source.bernoulli(self.num_samples, self.sample_rate).nonzero().flatten().tolist()

    def resume_state(self, *, consumed: int) -> dict[str, Any]:
        """What :meth:`load_resume_state` needs to continue after ``consumed`` batches.

        Args:
            consumed: batches of the current pass that were already used (0 between passes).

        Returns:
            ``{"generator_state": uint8 tensor, "skip": int}``. Mid-pass this is the state at
            the start of the pass and the number of batches to skip, so prefetching workers
            that drew ahead do not matter; otherwise the generator's current state and 0.

        Raises:
            DPValueError: a pass is half used but the sampler draws from torch's global
                generator, whose state at the start of the pass cannot be replayed.
        """
        consumed = int(consumed)
        if isinstance(self.generator, SecureRandom):
            # Nothing that could replay the draws is saved: an empty state and the position.
            skip = consumed if 0 < consumed < self.steps else 0
            return {"generator_state": torch.empty(0, dtype=torch.uint8), "skip": skip}
        if 0 < consumed < self.steps:
            if self.generator is None or self._pass_start is None:
                raise DPValueError(
                    f"Cannot save the position of a pass {consumed}/{self.steps} batches in: "
                    "this sampler draws from torch's global generator, which other code also "
                    "uses. Give it its own generator (generator=torch.Generator()"
                    ".manual_seed(seed)), or save between passes."
                )
            return {"generator_state": self._pass_start.clone(), "skip": consumed}
        return {"generator_state": self._draw_generator().get_state(), "skip": 0}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`resume_state`: the next pass yields the batches not yet used.

        Between passes the generator's state is restored at once. Mid-pass it is restored
        when the next pass starts, which then yields only the last ``steps - skip`` batches,
        exactly those the interrupted pass had not delivered.

        Raises:
            DPValueError: ``state`` is not such a dict, or its skip is not in ``[0, steps)``.
        """
        generator_state = state.get("generator_state") if isinstance(state, dict) else None
        skip = state.get("skip") if isinstance(state, dict) else None
        if not (
            isinstance(generator_state, Tensor)
            and generator_state.dtype == torch.uint8
            and isinstance(skip, int)
            and not isinstance(skip, bool)
            and 0 <= skip < self.steps
        ):
            raise DPValueError(
                f"state={_short(state)} is not a sampler resume state with 0 <= skip < "
                f"steps={self.steps}; pass what PoissonBatchSampler.resume_state() returned "
                "for a sampler with the same steps."
            )
        if isinstance(self.generator, SecureRandom):
            if generator_state.numel():
                raise DPValueError(
                    "state holds a generator state, but this sampler draws from a "
                    "SecureRandom, which cannot replay it; resume a secure run from a secure "
                    "checkpoint, or build the sampler with a torch.Generator."
                )
            self._resume = (generator_state, skip) if skip else None
            return
        if skip == 0:
            self._resume = None
            _set_state(self._draw_generator(), generator_state)
        else:
            _set_state(torch.Generator(), generator_state)  # check it now, not mid-training
            self._resume = (generator_state.clone(), skip)

    def _draw_generator(self) -> torch.Generator:
        """The generator ``torch.rand`` really draws from (torch's default when ``None``)."""
        if isinstance(self.generator, SecureRandom):
            raise DPValueError("a SecureRandom sampler has no torch generator to draw from")
        return self.generator if self.generator is not None else torch.default_generator

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, "
            f"sample_rate={self.sample_rate!r}, steps={self.steps})"
        )


def _set_state(generator: torch.Generator, state: Tensor) -> None:
    try:
        generator.set_state(state)
    except RuntimeError as error:
        raise DPValueError(
            f"The saved sampler generator state ({state.numel()} bytes) does not fit a "
            f"{generator.device} generator: {error}. Resume with the same kind of generator "
            "the state was saved from."
        ) from error


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
