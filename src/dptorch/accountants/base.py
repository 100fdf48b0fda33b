"""The accountant interface: record what ran, then answer "how much privacy was spent?".

Training describes each step by the values that determine its privacy (noise multiplier and
Poisson sample rate); an accountant only records them. Any analysis (RDP, PRV, GDP) then reads
the same history, so accountants can be swapped or tested without a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from dptorch.accountants._validation import (
    as_float,
    check_delta,
    noise_multiplier_problem,
    raise_problems,
    sample_rate_problem,
    steps_problem,
)
from dptorch.errors import DPTypeError, DPValueError

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: ``steps`` consecutive identical steps."""


class Accountant(ABC):
    """Records the steps of a subsampled Gaussian mechanism and bounds their privacy loss.

    Attributes:
        history: run-length encoded steps, oldest first: consecutive steps with the same
            ``(noise_multiplier, sample_rate)`` share one ``(sigma, q, steps)`` entry.

    Subclasses implement :meth:`mechanism` and :meth:`get_epsilon`; the latter should call
    :meth:`_check_delta` first and return 0.0 for an empty history.
    """

    def __init__(self) -> None:
        self.history: list[HistoryEntry] = []

    @classmethod
    @abstractmethod
    def mechanism(cls) -> str:
        """Name of the analysis, stored in state dicts (e.g. ``"rdp"``)."""

    @abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """Smallest epsilon such that all recorded steps together are (epsilon, delta)-DP.

        Args:
            delta: target delta in (0, 1).

        Returns:
            Epsilon >= 0; 0.0 if no step was recorded, ``inf`` if a step had no noise.

        Raises:
            DPValueError: ``delta`` is outside (0, 1).
        """

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Records one step of the Poisson-subsampled Gaussian mechanism.

        Args:
            noise_multiplier: noise standard deviation over the clipping norm, sigma >= 0.
                A step with sigma == 0 is recorded, and makes epsilon infinite.
            sample_rate: probability q in (0, 1] that each example is in the batch.

        Privacy:
            The recorded step is analysed as adding N(0, sigma^2 C^2) noise to a sum of
            per-example terms each clipped to L2 norm C, over a Poisson sample with rate q.

        Raises:
            DPValueError: an argument is out of range (both are checked, and reported
                together).
            DPTypeError: an argument is not a real number.
        """
        sigma = as_float("noise_multiplier", noise_multiplier)
        q = as_float("sample_rate", sample_rate)
        raise_problems([noise_multiplier_problem(sigma), sample_rate_problem(q)])
        self._append(sigma, q, 1)

    def __len__(self) -> int:
        """Total number of recorded steps."""
        return sum(steps for _, _, steps in self.history)

    def state_dict(self) -> dict[str, Any]:
        """Returns the accountant's state as plain Python types.

        The result holds only str, float, int, list and tuple, so ``torch.save`` it and load
        it back with ``torch.load(..., weights_only=True)``.
        """
        return {"mechanism": self.mechanism(), "history": [tuple(e) for e in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replaces the history with the one in ``state`` (from :meth:`state_dict`).

        Raises:
            DPValueError: ``state`` was saved by another mechanism, or its history holds an
                invalid entry (every problem is reported).
            DPTypeError: ``state`` is not a dict.
        """
        if not isinstance(state, dict):
            raise DPTypeError(
                f"state has type {type(state).__name__}; pass the dict returned by "
                "Accountant.state_dict()."
            )
        mechanism = state.get("mechanism")
        if mechanism != self.mechanism():
            raise DPValueError(
                f"state['mechanism']={mechanism!r} but this is a {type(self).__name__} "
                f"(mechanism {self.mechanism()!r}); load it into "
                f"create_accountant({mechanism!r}) instead."
            )
        history = state.get("history")
        if not isinstance(history, list | tuple):
            raise DPValueError(
                f"state['history']={history!r} must be a list of (noise_multiplier, "
                "sample_rate, steps) entries, as written by Accountant.state_dict()."
            )
        entries: list[HistoryEntry] = []
        problems: list[str | None] = []
        for index, entry in enumerate(history):
            parsed = _parse_entry(entry)
            if isinstance(parsed, str):
                problems.append(f"state['history'][{index}]: {parsed}")
            else:
                entries.append(parsed)
        raise_problems(problems)
        self.history = []
        for sigma, q, steps in entries:
            self._append(sigma, q, steps)

    @staticmethod
    def _check_delta(delta: float) -> float:
        """Returns ``delta`` as a float, raising DPValueError unless it lies in (0, 1)."""
        return check_delta(delta)

    def _append(self, sigma: float, q: float, steps: int) -> None:
        if steps == 0:
            return
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))


def _parse_entry(entry: object) -> HistoryEntry | str:
    """Validates one saved history entry; returns it, or a message saying what is wrong."""
    if not isinstance(entry, list | tuple) or len(entry) != 3:
        return f"{entry!r} is not a (noise_multiplier, sample_rate, steps) triple."
    raw_sigma, raw_q, steps = entry
    try:
        sigma = as_float("noise_multiplier", raw_sigma)
        q = as_float("sample_rate", raw_q)
    except DPTypeError as exc:
        return str(exc)
    found = [noise_multiplier_problem(sigma), sample_rate_problem(q), steps_problem(steps)]
    messages = [m for m in found if m is not None]
    if messages:
        return " ".join(messages)
    return (sigma, q, int(steps))  # type: ignore[call-overload]
