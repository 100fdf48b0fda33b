"""A hard privacy budget: refuse the step that would take epsilon past it.

The budget only reads an accountant's history, as every analysis does. Its one question,
"does one more step at (sigma, q) keep epsilon within the budget?", is answered without a
composition per step: on the first step at a given (sigma, q) it finds how many more such
steps fit, then counts them down; it searches again only when sigma, q or the history change
in a way it did not foresee.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

from dptorch.accountants import Accountant
from dptorch.accountants._validation import check_delta
from dptorch.accountants.base import HistoryEntry
from dptorch.errors import DPError, DPTypeError, DPValueError, DPWarning, PrivacyBudgetExceededError
from dptorch.validation import check_positive_number

# Beyond this many further steps the budget is treated as unlimited at the current settings;
# the accountants themselves cannot represent much longer runs.
MAX_PLANNED_STEPS = 2**40


@dataclass(frozen=True)
class _Plan:
    """How many steps at ``(sigma, q)`` fit after the history ``base``."""

    sigma: float
    q: float
    base: tuple[HistoryEntry, ...]
    steps_left: int

    def steps_taken(self, history: list[HistoryEntry]) -> int | None:
        """Steps at (sigma, q) recorded since the plan was made, or None if it diverged."""
        if len(history) == len(self.base) and tuple(history) == self.base:
            return 0
        # The accountant run-length encodes its history: steps at the same (sigma, q) as the
        # last entry of ``base`` extend that entry, others open a new one.
        merged = bool(self.base) and self.base[-1][:2] == (self.sigma, self.q)
        prefix = self.base[:-1] if merged else self.base
        offset = self.base[-1][2] if merged else 0
        if len(history) != len(prefix) + 1 or history[-1][:2] != (self.sigma, self.q):
            return None
        if tuple(history[:-1]) != prefix:
            return None
        taken = history[-1][2] - offset
        return taken if taken >= 0 else None


class PrivacyBudget:
    """An epsilon that training may not exceed, measured at a fixed delta.

    Args:
        epsilon: the largest epsilon allowed, finite and > 0.
        delta: the delta at which epsilon is measured, in (0, 1).

    Privacy: :meth:`check_step` refuses a step unless the accountant, having recorded it,
    would report epsilon <= ``epsilon`` at ``delta``. It assumes, as binary search must, that
    the accountant's epsilon does not decrease when a step is added.
    """

    def __init__(self, *, epsilon: float, delta: float) -> None:
        self.epsilon = check_positive_number("max_epsilon", epsilon)
        self.delta = check_delta(delta)
        self._plan: _Plan | None = None

    def __repr__(self) -> str:
        return f"PrivacyBudget(epsilon={self.epsilon!r}, delta={self.delta!r})"

    # -- questions -------------------------------------------------------------------------
    def epsilon_spent(self, accountant: Accountant) -> float:
        """Epsilon spent so far at the budget's delta."""
        return accountant.get_epsilon(self.delta)

    def epsilon_left(self, accountant: Accountant) -> float:
        """``max(0, budget - spent)``: how much epsilon is left."""
        return max(0.0, self.epsilon - self.epsilon_spent(accountant))

    def steps_left(
        self, accountant: Accountant, *, noise_multiplier: float, sample_rate: float
    ) -> int:
        """How many more steps at ``(noise_multiplier, sample_rate)`` fit in the budget.

        Costs a binary search over step counts (about ``2 log2(steps)`` epsilon evaluations)
        the first time it is asked for a given ``(noise_multiplier, sample_rate)``; afterwards
        it only counts the steps the accountant recorded since, while they match.
        """
        sigma, q = float(noise_multiplier), float(sample_rate)
        plan = self._plan
        if plan is not None and (plan.sigma, plan.q) == (sigma, q):
            taken = plan.steps_taken(accountant.history)
            if taken is not None:
                return max(0, plan.steps_left - taken)
        base = tuple(accountant.history)
        plan = _Plan(sigma, q, base, _search_steps_left(accountant, base, sigma, q, self))
        self._plan = plan
        return plan.steps_left

    def check_step(
        self, accountant: Accountant, *, noise_multiplier: float, sample_rate: float
    ) -> None:
        """Raise unless one more step at ``(noise_multiplier, sample_rate)`` fits.

        Raises:
            PrivacyBudgetExceededError: the step would take epsilon past the budget; the
                message says epsilon spent, the budget, and what to do.
        """
        if self.steps_left(accountant, noise_multiplier=noise_multiplier, sample_rate=sample_rate):
            return
        # Only on refusal: two compositions to say how far over the step would go.
        spent = self.epsilon_spent(accountant)
        after = _epsilon_after(
            accountant, tuple(accountant.history), noise_multiplier, sample_rate, 1, self.delta
        )
        raise PrivacyBudgetExceededError(
            f"optimizer.step() refused: one more step at noise_multiplier={noise_multiplier:g}, "
            f"sample_rate={sample_rate:g} would take epsilon from {spent:.4g} to {after:.4g} "
            f"at delta={self.delta:g}, past the budget max_epsilon={self.epsilon:g}. Nothing "
            "was updated: the model keeps its parameters from the last step within budget. "
            "Stop training here (save or evaluate the model), or continue with more noise "
            "(a larger noise_multiplier), or, only if you accept a larger privacy loss, raise "
            "the budget with engine.set_budget(epsilon=..., delta=...).",
            epsilon_spent=spent,
            epsilon_after=after,
            max_epsilon=self.epsilon,
            delta=self.delta,
        )

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"epsilon": ..., "delta": ...}``: plain floats, safe for ``weights_only`` loads.

        The step plan is not saved: it is recomputed from the accountant on the next check.
        """
        return {"epsilon": self.epsilon, "delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a budget saved by :meth:`state_dict`.

        Raises:
            DPTypeError: ``state`` is not a dict.
            DPValueError: a key is missing or a value out of range.
        """
        if not isinstance(state, dict):
            raise DPTypeError(
                f"state has type {type(state).__name__}; pass the dict returned by "
                "PrivacyBudget.state_dict()."
            )
        missing = sorted({"epsilon", "delta"} - set(state))
        if missing:
            raise DPValueError(
                f"state lacks {', '.join(missing)}; pass the dict returned by "
                "PrivacyBudget.state_dict()."
            )
        loaded = PrivacyBudget(epsilon=state["epsilon"], delta=state["delta"])
        self.epsilon, self.delta, self._plan = loaded.epsilon, loaded.delta, None


def _probe(accountant: Accountant) -> Accountant:
    """An accountant of the same kind, for asking "what if" without touching the real one."""
    with warnings.catch_warnings():
        # A second GaussianAccountant would repeat its construction warning.
        warnings.simplefilter("ignore", DPWarning)
        try:
            return type(accountant)()
        except TypeError:  # a user's accountant that needs constructor arguments
            return copy.deepcopy(accountant)


def _epsilon_after(
    accountant: Accountant,
    base: tuple[HistoryEntry, ...],
    sigma: float,
    q: float,
    steps: int,
    delta: float,
    probe: Accountant | None = None,
) -> float:
    """Epsilon at ``delta`` once ``steps`` more steps at ``(sigma, q)`` follow ``base``."""
    probe = probe if probe is not None else _probe(accountant)
    state = accountant.state_dict()
    state["history"] = [*base, (sigma, q, steps)]
    probe.load_state_dict(state)  # merges a final entry equal to base's last, as step() would
    return probe.get_epsilon(delta)


def _search_steps_left(
    accountant: Accountant,
    base: tuple[HistoryEntry, ...],
    sigma: float,
    q: float,
    budget: PrivacyBudget,
) -> int:
    """Largest k with epsilon(base + k steps at (sigma, q)) <= budget, by doubling and bisection."""
    probe = _probe(accountant)

    def fits(steps: int) -> bool:
        try:
            epsilon = _epsilon_after(accountant, base, sigma, q, steps, budget.delta, probe)
        except DPError:
            return False  # a run the accountant cannot analyse is not one we may allow
        return math.isfinite(epsilon) and epsilon <= budget.epsilon

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low = high
        if high >= MAX_PLANNED_STEPS:
            return MAX_PLANNED_STEPS
        high *= 2
    while high - low > 1:  # invariant: low fits, high does not
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
