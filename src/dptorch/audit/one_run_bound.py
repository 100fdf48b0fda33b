"""The one-run lower bound on epsilon (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846).

The game: ``m`` canaries, each put in the training set independently with probability 1/2;
train once; score every canary; guess "in" for the ``k_in`` highest scores, "out" for the
``k_out`` lowest, abstain on the rest. If training is (epsilon, delta)-DP with respect to
every single canary, then the number ``W`` of correct guesses among the ``r = k_in + k_out``
made satisfies, for every ``v`` (their Theorem 5.2)::

    P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i

with ``p = e^eps / (1 + e^eps)``, the accuracy of eps-DP randomized response. So an observed
``v`` whose right-hand side is below ``1 - confidence`` rejects (eps, delta)-DP; the largest
eps rejected is the lower bound reported.

Trying several guess counts and keeping the best is a multiple test: the candidates share the
error level by a union (Bonferroni) bound, so the stated confidence holds for the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dptorch.errors import DPValueError

__all__ = [
    "DEFAULT_GUESS_FRACTIONS",
    "OneRunBound",
    "count_correct_guesses",
    "one_run_epsilon_lower_bound",
    "one_run_lower_bound_from_scores",
    "one_run_p_value",
]

# Fractions of m guessed "in" (and as many "out"): small ones win when only the extreme
# scores are telling (a correct run), large ones when almost every canary is (a broken run).
# Each candidate costs a factor in the union bound, so the list is short.
DEFAULT_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.45)

# Bisection stops when the bracket is this narrow (in epsilon); far below any audit's noise.
_EPSILON_TOLERANCE = 1e-6


@dataclass(frozen=True)
class OneRunBound:
    """A one-run lower bound and the guesses it came from.

    Attributes:
        epsilon: the lower bound (0.0 when nothing can be rejected).
        num_guesses: r, guesses made (the others abstained).
        num_correct: v, correct guesses among them.
        guesses_per_side: k, how many were guessed "in" (and as many "out").
        alpha: the error level each candidate was tested at (after the union bound).
    """

    epsilon: float
    num_guesses: int
    num_correct: int
    guesses_per_side: int
    alpha: float


def one_run_p_value(
    *, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """The chance of ``num_correct`` or more correct guesses if training is (eps, delta)-DP.

    Args:
        num_canaries: m, canaries each included with probability 1/2.
        num_guesses: r <= m, guesses made (abstentions excluded); fixed before training.
        num_correct: v <= r, correct guesses.
        epsilon: eps >= 0 of the hypothesis tested.
        delta: delta in [0, 1] of the hypothesis tested.

    Returns:
        The bound of Steinke et al. 2023 (arXiv 2305.08846, Theorem 5.2) on
        ``P[W >= num_correct]``, capped at 1.

    Privacy: a value below ``1 - confidence`` shows, at that confidence, that training is NOT
    (epsilon, delta)-DP with respect to one canary.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise DPValueError(f"epsilon={epsilon!r} must be a finite number >= 0.")
    if not 0 <= delta <= 1:
        raise DPValueError(f"delta={delta!r} must lie in [0, 1].")
    if num_correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # e^eps / (1 + e^eps), overflow-free
    tail = float(stats.binom.sf(num_correct - 1, num_guesses, p))  # P[Bin >= v]
    # P[v - i <= Bin < v] for i = 1..v: cumulative sums of the pmf from v - 1 downwards.
    below = stats.binom.pmf(np.arange(num_correct - 1, -1, -1), num_guesses, p)
    window = np.cumsum(below) / np.arange(1, num_correct + 1)
    return min(1.0, tail + 2.0 * num_canaries * delta * float(window.max()))


def one_run_epsilon_lower_bound(
    *,
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The largest eps that ``num_correct`` of ``num_guesses`` rejects at ``confidence``.

    Args:
        num_canaries: m, canaries each included with probability 1/2.
        num_guesses: r, guesses made; chosen before seeing the scores.
        num_correct: v, correct guesses.
        delta: the delta of the DP claim being audited.
        confidence: e.g. 0.95; the chance that an honest (eps, delta)-DP run would NOT
            give a bound above its eps.

    Returns:
        eps_lb >= 0: with probability at least ``confidence``, training is not
        (eps, delta)-DP for any eps below ``eps_lb``. 0.0 when nothing is rejected.

    Privacy: a lower bound only. It never certifies that training IS private.
    """
    alpha = _alpha_of(confidence)
    _check_counts(num_canaries, num_guesses, num_correct)

    def rejected(eps: float) -> bool:
        return (
            one_run_p_value(
                num_canaries=num_canaries,
                num_guesses=num_guesses,
                num_correct=num_correct,
                epsilon=eps,
                delta=delta,
            )
            < alpha
        )

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # ends: as eps grows, P[Bin(r, p) >= v] -> 1 for v <= r
        low, high = high, 2.0 * high
    # Invariant: `low` is rejected, `high` is not; report `low` so the bound always holds.
    while high - low > _EPSILON_TOLERANCE:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def count_correct_guesses(
    scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, per_side: int
) -> tuple[int, int]:
    """Guess "in" for the ``per_side`` highest scores and "out" for the ``per_side`` lowest.

    Ties are broken by canary index (stable sort), never by membership.

    Returns:
        ``(num_guesses, num_correct)``.
    """
    score_array = np.asarray(scores, dtype=np.float64)
    member = np.asarray(included, dtype=bool)
    m = score_array.shape[0]
    if member.shape != score_array.shape:
        raise DPValueError(
            f"scores has shape {score_array.shape} but included has {member.shape}; give one "
            "membership flag per canary score."
        )
    if not 0 <= 2 * per_side <= m:
        raise DPValueError(f"per_side={per_side} must lie in [0, m/2] with m={m} canaries.")
    order = np.argsort(score_array, kind="stable")
    guessed_out = order[:per_side]
    guessed_in = order[m - per_side :]
    correct = int(member[guessed_in].sum()) + int((~member[guessed_out]).sum())
    return 2 * per_side, correct


def one_run_lower_bound_from_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> OneRunBound:
    """The best one-run bound over a few guess counts, valid at ``confidence`` for the best.

    Higher scores must mean "more likely included". For each fraction f, ``k = floor(f m)``
    canaries are guessed in and k out; each candidate is tested at level
    ``(1 - confidence) / len(guess_fractions)`` (a union bound), so reporting the maximum
    keeps the stated confidence.

    Privacy: see :func:`one_run_epsilon_lower_bound`; the guess counts depend only on m,
    never on the scores or the memberships, as the theorem requires.
    """
    member = np.asarray(included, dtype=bool)
    m = member.shape[0]
    if not guess_fractions or not all(0 < f <= 0.5 for f in guess_fractions):
        raise DPValueError(
            f"guess_fractions={tuple(guess_fractions)!r} must be a non-empty list of numbers "
            "in (0, 0.5]: the share of canaries guessed 'in' (and as many 'out')."
        )
    family_alpha = _alpha_of(confidence)
    alpha = family_alpha / len(guess_fractions)
    best = OneRunBound(0.0, 0, 0, 0, alpha)
    for per_side in sorted({int(f * m) for f in guess_fractions}):
        if per_side == 0:
            continue
        guesses, correct = count_correct_guesses(scores, member, per_side)
        epsilon = one_run_epsilon_lower_bound(
            num_canaries=m,
            num_guesses=guesses,
            num_correct=correct,
            delta=delta,
            confidence=1.0 - alpha,
        )
        if epsilon > best.epsilon or best.num_guesses == 0:
            best = OneRunBound(epsilon, guesses, correct, per_side, alpha)
    return best


def _alpha_of(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise DPValueError(
            f"confidence={confidence!r} must lie in (0, 1), e.g. 0.95 for a bound that an "
            "honest run exceeds at most 5% of the time."
        )
    return 1.0 - confidence


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise DPValueError(
            f"Need 0 <= num_correct <= num_guesses <= num_canaries; got num_correct="
            f"{num_correct}, num_guesses={num_guesses}, num_canaries={num_canaries}."
        )
