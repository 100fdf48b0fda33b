"""The many-run lower bound on epsilon, from Clopper-Pearson intervals on error rates.

Train many models, half with the canary and half without, and score the canary in each. A
threshold test "score > t means included" has a false-positive rate FPR (over runs without
the canary) and a false-negative rate FNR (over runs with it). Every (eps, delta)-DP
training satisfies both (Kairouz, Oh, Viswanath 2015, arXiv 1311.0776)::

    FPR + e^eps FNR >= 1 - delta    and    FNR + e^eps FPR >= 1 - delta

So with one-sided Clopper-Pearson upper bounds FPR_u, FNR_u (exact binomial intervals, each at
level alpha')::

    eps >= max( log((1 - delta - FNR_u) / FPR_u), log((1 - delta - FPR_u) / FNR_u) )

with probability at least 1 - 2 alpha' (Jagielski, Ullman, Oprea 2020, arXiv 2006.07709;
Nasr et al. 2021, arXiv 2101.04535), for a threshold t fixed before the scores are seen.

Picking t by looking at the scores would break that, so the threshold is chosen on one half of
the runs and the bound is computed on the other half (alpha' = (1 - confidence) / 2). Given a
list of K thresholds fixed in advance instead, all runs are used and the best of the K tests is
kept, with alpha' = (1 - confidence) / (2 K) (a union bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dptorch.errors import DPValueError

__all__ = ["ManyRunBound", "clopper_pearson_upper", "many_run_lower_bound_from_scores"]


@dataclass(frozen=True)
class ManyRunBound:
    """A many-run lower bound and the threshold test it came from.

    Attributes:
        epsilon: the lower bound (0.0 when nothing is rejected).
        threshold: t of the best test ("included" iff score > t); NaN if none helped.
        false_positive_upper: FPR_u of that test.
        false_negative_upper: FNR_u of that test.
        alpha: the level of each one-sided interval after the union bound.
    """

    epsilon: float
    threshold: float
    false_positive_upper: float
    false_negative_upper: float
    alpha: float


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson upper bound on a binomial rate.

    Args:
        successes: k observed events.
        trials: n >= 1 trials.
        alpha: error level in (0, 1).

    Returns:
        u such that P[rate > u] <= alpha: the ``1 - alpha`` quantile of Beta(k + 1, n - k),
        or 1.0 when k == n.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise DPValueError(
            f"Need trials >= 1 and 0 <= successes <= trials; got successes={successes}, "
            f"trials={trials}."
        )
    if not 0 < alpha < 1:
        raise DPValueError(f"alpha={alpha!r} must lie in (0, 1).")
    if successes == trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, successes + 1, trials - successes))


def many_run_lower_bound_from_scores(
    scores_in: Sequence[float] | np.ndarray,
    scores_out: Sequence[float] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    thresholds: Sequence[float] | None = None,
) -> ManyRunBound:
    """Lower-bound eps from canary scores of runs with (``scores_in``) and without it.

    Args:
        scores_in: one score per run that included the canary; higher means "included".
            Runs must be independent trainings.
        scores_out: one score per run that did not.
        delta: the delta of the DP claim being audited.
        confidence: the chance that an honest run gives a bound at most its eps.
        thresholds: tests "score > t" fixed without looking at these scores; all runs are
            used and the best test kept (union bound over them). ``None``: the first half of
            each group (in the given order) picks the best threshold among its own scores,
            the second half, unseen by that choice, gives the bound.

    Returns:
        The bound, valid at ``confidence``.

    Privacy: a lower bound only.
    """
    inside = np.asarray(scores_in, dtype=np.float64)
    outside = np.asarray(scores_out, dtype=np.float64)
    if not 0 <= delta < 1:
        raise DPValueError(f"delta={delta!r} must lie in [0, 1).")
    if not 0 < confidence < 1:
        raise DPValueError(f"confidence={confidence!r} must lie in (0, 1), e.g. 0.95.")
    minimum = 1 if thresholds is not None else 2
    if inside.size < minimum or outside.size < minimum:
        raise DPValueError(
            f"Need at least {minimum} runs with and {minimum} without the canary (half of them "
            f"choose the threshold when thresholds=None); got {inside.size} with and "
            f"{outside.size} without."
        )
    if thresholds is not None:
        candidates = np.unique(np.asarray(thresholds, dtype=np.float64))
        return _best_test(
            inside, outside, candidates, delta, (1 - confidence) / (2 * candidates.size)
        )
    pick_in, test_in = np.array_split(inside, 2)
    pick_out, test_out = np.array_split(outside, 2)
    seen = np.unique(np.concatenate([pick_in, pick_out]))
    # Midpoints between neighbouring scores: the threshold least tuned to the scores seen.
    candidates = np.concatenate([[seen[0] - 1.0], 0.5 * (seen[:-1] + seen[1:])])
    chosen = _best_test(pick_in, pick_out, candidates, delta, (1 - confidence) / 2)
    if math.isnan(chosen.threshold):
        return chosen
    return _best_test(test_in, test_out, np.array([chosen.threshold]), delta, (1 - confidence) / 2)


def _best_test(
    inside: np.ndarray, outside: np.ndarray, candidates: np.ndarray, delta: float, alpha: float
) -> ManyRunBound:
    best = ManyRunBound(0.0, math.nan, 1.0, 1.0, alpha)
    for threshold in candidates:
        false_pos = int((outside > threshold).sum())
        false_neg = int((inside <= threshold).sum())
        fpr = clopper_pearson_upper(false_pos, outside.size, alpha)
        fnr = clopper_pearson_upper(false_neg, inside.size, alpha)
        epsilon = max(_log_ratio(1.0 - delta - fnr, fpr), _log_ratio(1.0 - delta - fpr, fnr))
        if epsilon > best.epsilon:
            best = ManyRunBound(epsilon, float(threshold), fpr, fnr, alpha)
    return best


def _log_ratio(numerator: float, denominator: float) -> float:
    """``log(numerator / denominator)`` clipped at 0; 0 when the numerator is not positive."""
    if numerator <= 0 or denominator <= 0:
        return 0.0
    return max(0.0, math.log(numerator / denominator))
