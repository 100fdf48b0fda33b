"""Choose the noise for a privacy budget: the smallest sigma whose epsilon meets a target.

Calibration only asks an accountant "what is epsilon for this (sigma, q, steps)?", so it works
with any registered accountant and never overshoots the budget as that accountant measures it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

from dptorch.accountants._validation import (
    as_float,
    check_delta,
    raise_problems,
    sample_rate_problem,
)
from dptorch.accountants.base import Accountant
from dptorch.accountants.registry import create_accountant
from dptorch.errors import DPTypeError, DPValueError, DPWarning

# The search also stops once the bracket is this narrow relative to sigma: the accountant's
# epsilon may jump by more than epsilon_tolerance across an unresolvable change in sigma.
_RELATIVE_PRECISION = 1e-6


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Number of steps in ``epochs`` passes at Poisson rate q: ``ceil(epochs / q)``.

    A ratio within 1e-9 (relative) of an integer is taken as that integer, so that
    ``epochs=3, sample_rate=0.01`` gives 300 steps rather than 301 from rounding error.
    """
    ratio = epochs / sample_rate
    nearest = round(ratio)
    if math.isclose(ratio, nearest, rel_tol=1e-9):
        return max(1, int(nearest))
    return max(1, math.ceil(ratio))


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    epochs: float | None = None,
    steps: int | None = None,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    sigma_min: float = 0.05,
    sigma_max: float = 1e4,
    prior_history: Sequence[tuple[float, float, int]] = (),
) -> float:
    """Smallest noise multiplier whose epsilon, after the given steps, is at most a target.

    Brackets sigma by halving or doubling from 1, then narrows the bracket by regula falsi
    (Illinois variant) on log epsilon against log sigma. The search stops when
    ``target_epsilon - epsilon_tolerance <= epsilon(sigma) <= target_epsilon`` or when the
    bracket is narrower than a millionth of sigma.

    Args:
        target_epsilon: privacy budget epsilon, finite and > 0.
        target_delta: delta in (0, 1).
        sample_rate: Poisson sample rate q in (0, 1].
        epochs: passes over the data; converted to ``steps = ceil(epochs / sample_rate)``
            (see :func:`steps_for_epochs`). Give exactly one of ``epochs`` and ``steps``.
        steps: number of DP-SGD steps, >= 1.
        accountant: name of a registered accountant (see :func:`create_accountant`).
        epsilon_tolerance: how far below the target the returned epsilon may be, > 0.
        sigma_min: smallest sigma searched; returned as is if it already meets the target.
        sigma_max: largest sigma searched before giving up.
        prior_history: releases already spent on the same data, as ``(noise_multiplier,
            sample_rate, steps)`` entries (an accountant's ``history``): the returned sigma
            keeps epsilon of them AND the planned steps together at most the target.

    Returns:
        The noise multiplier sigma.

    Privacy:
        Training ``steps`` Poisson-subsampled Gaussian steps with the returned sigma and
        rate ``sample_rate``, after the releases in ``prior_history``, is (target_epsilon,
        target_delta)-DP as measured by ``accountant``: the returned sigma was itself
        checked, never interpolated.

    Raises:
        DPValueError: an argument is out of range (all are reported together), both or
            neither of ``epochs`` and ``steps`` were given, or even ``sigma_max`` cannot
            meet the target (or ``prior_history`` alone already spends it), or an entry of
            ``prior_history`` is invalid.
        DPTypeError: a numeric argument is not a real number.
    """
    eps_target = as_float("target_epsilon", target_epsilon)
    delta = as_float("target_delta", target_delta)
    q = as_float("sample_rate", sample_rate)
    tolerance = as_float("epsilon_tolerance", epsilon_tolerance)
    low_limit = as_float("sigma_min", sigma_min)
    high_limit = as_float("sigma_max", sigma_max)
    problems: list[str | None] = [sample_rate_problem(q)]
    if not (math.isfinite(eps_target) and eps_target > 0):
        problems.append(f"target_epsilon={target_epsilon!r} must be a finite number > 0.")
    if not 0 < delta < 1:
        problems.append(
            f"target_delta={target_delta!r} must lie in (0, 1); a common choice is below "
            "1 / dataset size, e.g. 1e-5."
        )
    if not (math.isfinite(tolerance) and tolerance > 0):
        problems.append(f"epsilon_tolerance={epsilon_tolerance!r} must be a finite number > 0.")
    if not (math.isfinite(low_limit) and math.isfinite(high_limit) and low_limit > 0):
        problems.append(
            f"sigma_min={sigma_min!r} and sigma_max={sigma_max!r} must be finite and > 0."
        )
    elif not low_limit < high_limit:
        problems.append(f"sigma_min={sigma_min!r} must be smaller than sigma_max={sigma_max!r}.")
    num_steps, steps_message = _resolve_steps(epochs, steps, q)
    problems.append(steps_message)
    raise_problems(problems)
    assert num_steps is not None  # _resolve_steps reports a problem otherwise

    analysis = create_accountant(accountant)
    prior = _checked_prior(analysis, prior_history, delta, eps_target)
    refusals: list[str] = []

    def epsilon_at(sigma: float) -> float:
        # One run-length entry instead of num_steps calls to step(): same history, O(1).
        analysis.load_state_dict(
            {"mechanism": analysis.mechanism(), "history": [*prior, (sigma, q, num_steps)]}
        )
        try:
            return analysis.get_epsilon(delta)
        except DPValueError as error:
            # An accountant may refuse a sigma it cannot analyse (PRV's grid for very little
            # noise): that sigma does not meet the target, and the search moves on. The
            # reason is kept in case no sigma works.
            refusals.append(str(error))
            return math.inf

    def meets(eps: float) -> bool:
        return eps <= eps_target  # False for NaN: an unknown epsilon never meets a budget

    # Bracket: epsilon(low) > target >= epsilon(high). Walk down from sigma = 1 by halving
    # rather than trying sigma_min at once: tiny sigmas are the slowest to analyse.
    high = min(max(1.0, low_limit), high_limit)
    eps_high = epsilon_at(high)
    if meets(eps_high):
        while True:
            if high <= low_limit:
                return low_limit
            low = max(0.5 * high, low_limit)
            eps_low = epsilon_at(low)
            if not meets(eps_low):
                break
            high, eps_high = low, eps_low
    else:
        while not meets(eps_high):
            if high >= high_limit:
                raise DPValueError(
                    f"target_epsilon={eps_target!r} cannot be reached with at most "
                    f"sigma_max={high_limit!r}: epsilon is still {eps_high!r} for "
                    f"{num_steps} steps at sample_rate={q!r}, target_delta={delta!r} "
                    f"(accountant={accountant!r}). Raise target_epsilon or target_delta, "
                    "or train fewer steps or with a smaller sample_rate."
                    + (f" The accountant refused: {refusals[-1]}" if refusals else "")
                )
            low, eps_low = high, eps_high
            high = min(2 * high, high_limit)
            eps_high = epsilon_at(high)

    # Shrink the bracket by regula falsi on log(epsilon) against log(sigma), where epsilon is
    # close to a straight line, aimed at the middle of the accepted band. The Illinois rule
    # (halve the weight of an end kept twice in a row) stops one end from stalling; an end
    # without a finite epsilon (a refusal) falls back to bisection.
    aim = eps_target - 0.5 * tolerance
    weight_low = weight_high = 1.0
    kept = ""
    while eps_target - eps_high > tolerance and high - low > _RELATIVE_PRECISION * high:
        mid = 0.5 * (low + high)
        if 0 < eps_high < aim < eps_low < math.inf:
            f_low = weight_low * math.log(eps_low / aim)  # > 0
            f_high = weight_high * math.log(eps_high / aim)  # < 0
            frac = f_low / (f_low - f_high)
            margin = 1e-3 * (high - low)
            guess = math.exp(math.log(low) + frac * math.log(high / low))
            mid = min(max(guess, low + margin), high - margin)
        eps_mid = epsilon_at(mid)
        if meets(eps_mid):
            high, eps_high, weight_high = mid, eps_mid, 1.0
            weight_low = 0.5 * weight_low if kept == "low" else 1.0
            kept = "low"
        else:
            low, eps_low, weight_low = mid, eps_mid, 1.0
            weight_high = 0.5 * weight_high if kept == "high" else 1.0
            kept = "high"
    return high


def _checked_prior(
    analysis: Accountant,
    prior_history: Sequence[tuple[float, float, int]],
    delta: float,
    target_epsilon: float,
) -> list[tuple[float, float, int]]:
    """``prior_history`` as a list, validated by the accountant; refused if it alone already
    spends ``target_epsilon`` (no noise could then keep the total within it)."""
    if not isinstance(prior_history, list | tuple):
        raise DPTypeError(
            f"prior_history has type {type(prior_history).__name__}; pass a list of "
            "(noise_multiplier, sample_rate, steps) entries, e.g. accountant.history."
        )
    if not prior_history:
        return []
    # The accountant validates every entry (and names the bad ones) as it loads them.
    analysis.load_state_dict({"mechanism": analysis.mechanism(), "history": list(prior_history)})
    prior = list(analysis.history)
    spent = analysis.get_epsilon(delta)
    if not spent < target_epsilon:
        raise DPValueError(
            f"The releases already recorded (prior_history: for "
            f"PrivacyEngine.make_private_with_epsilon, the engine's accountant history, "
            f"{len(prior)} entries) spend epsilon={spent!r} at delta={delta!r}, at least "
            f"target_epsilon={target_epsilon!r}: no noise multiplier keeps the total within "
            "the target. Raise target_epsilon, or train on data this budget was not spent on."
        )
    return prior


def _resolve_steps(
    epochs: float | None, steps: int | None, sample_rate: float
) -> tuple[int | None, str | None]:
    """Returns ``(steps, None)``, or ``(None, problem)`` if the arguments do not give one."""
    if (epochs is None) == (steps is None):
        given = "both" if epochs is not None else "neither"
        return None, (
            f"epochs={epochs!r} and steps={steps!r}: {given} given; pass exactly one of "
            "them to say how long training runs."
        )
    if steps is not None:
        if isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 1:
            return int(steps), None
        return None, f"steps={steps!r} must be an integer >= 1 (the number of DP-SGD steps)."
    value = as_float("epochs", epochs)
    if not (math.isfinite(value) and value > 0):
        return None, f"epochs={epochs!r} must be a finite number > 0."
    if sample_rate_problem(sample_rate) is not None:
        return None, None  # reported already; no step count without a valid rate
    return steps_for_epochs(value, sample_rate), None


def check_delta_against_dataset(delta: float, dataset_size: int) -> None:
    """Warns if ``delta >= 1 / dataset_size``.

    A mechanism that publishes one random example outright is (0, 1/N)-DP, so a delta of
    1/N or more permits leaking whole records; delta should be well below 1/N.

    Raises:
        DPValueError: ``delta`` is outside (0, 1) or ``dataset_size`` is not >= 1.
        DPTypeError: ``dataset_size`` is not an integer, or ``delta`` not a number.
    """
    value = check_delta(delta)
    if not isinstance(dataset_size, numbers.Integral) or isinstance(dataset_size, bool):
        raise DPTypeError(
            f"dataset_size={dataset_size!r} has type {type(dataset_size).__name__}; pass "
            "the number of examples as an int."
        )
    if dataset_size < 1:
        raise DPValueError(f"dataset_size={dataset_size!r} must be >= 1 (number of examples).")
    if value >= 1 / int(dataset_size):
        warnings.warn(
            f"delta={value!r} is >= 1/dataset_size = 1/{int(dataset_size)}: a mechanism "
            "that leaks one whole example at random satisfies such a delta. Choose delta "
            f"well below {1 / int(dataset_size):.3g}.",
            DPWarning,
            stacklevel=2,
        )
