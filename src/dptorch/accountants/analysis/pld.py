"""Privacy loss distributions (PLDs) of composed Poisson-subsampled Gaussian mechanisms.

A step adds N(0, sigma^2) noise to a sum of sensitivity 1 over a Poisson sample with rate q.
Under add/remove-one adjacency its two dominating pairs are ("remove") P = (1-q) N(0, s^2) +
q N(1, s^2) against Q = N(0, s^2), and ("add") the same pair swapped. For each direction we

1. discretise the PLD of one step on the grid ``{i * h}`` by "connecting the dots" of its exact
   hockey-stick curve delta(eps) (Doroshenko et al., arXiv 2207.04380): the chord of a convex
   curve lies above it, so the discrete PLD *dominates* the exact one (pessimistic);
2. compose the whole history in one go on a circle of cells: each step's PLD is wrapped
   modulo the circle's size, the real FFTs are raised to their step counts and multiplied,
   and one inverse FFT gives the composed PLD modulo the size (Koskela et al., arXiv
   1906.03049). The circle spans a Chernoff window of the *discretised* composition, so
   at most ``2 * TAIL_MASS`` of its mass wraps onto wrong cells; moving mass m changes
   delta(eps) by at most m, so that much is added to the infinity atom and the result
   still dominates. The measured FFT round-off (size times the largest negative cell) is
   added the same way.

Epsilon at a delta is then the largest over the two directions.

Grid (chosen per history): a Chernoff bound from the exact log-moment generating function K
of one step's loss gives, for the composed history, a window [lo, hi] outside which at most
``TAIL_MASS`` of the loss lies. The interval is h = (hi - lo) / ``points`` for the whole
history, so h scales with the spread of the total loss (tiny for sigma = 50, large for
sigma = 0.3 over 1e6 steps) and the grid always has about ``points`` cells.

Numerical error: every step above rounds towards a larger epsilon. With the default
``points`` the reported epsilon exceeds dp_accounting's PLD accountant (fine grid) by < 1%
on the grid q in {1e-3 .. 1}, sigma in {0.6 .. 2}, steps in {1 .. 1e4}, delta in {1e-5,
1e-7} (see tests/accountants/test_prv.py), and is never below the exact value beyond float
error. Deltas below about 1e-11 reach the floor of truncated tails and round-off, where
:func:`epsilon_from_pld` refuses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.fft import irfft, next_fast_len, rfft
from scipy.signal import lfilter
from scipy.special import log_ndtr

from dptorch.errors import DPValueError

DEFAULT_POINTS = 1 << 15
"""Grid cells spanning the total loss window; accuracy grows with it, cost ~ linearly."""
TAIL_MASS = 1e-20
"""Chernoff bound on the loss mass cut off by each window (it goes to the infinity atom)."""
MAX_POINTS = 1 << 24
_T = np.geomspace(1e-3, 400.0, 48)  # Chernoff exponents t at which K(t) is evaluated


@dataclass(frozen=True)
class DiscretePLD:
    """A PLD on the grid ``(offset + i) * interval``, plus an atom at infinite loss.

    Attributes:
        interval: grid spacing h of the privacy loss.
        offset: grid index of ``masses[0]``.
        masses: ``[n]`` probability of each grid loss (under the first distribution).
        infinity_mass: probability of infinite loss (includes ``truncated_mass``).
        truncated_mass: part of ``infinity_mass`` that only comes from window truncation.
    """

    interval: float
    offset: int
    masses: np.ndarray
    infinity_mass: float
    truncated_mass: float = 0.0

    def losses(self) -> np.ndarray:
        """``[n]`` privacy loss of each entry of ``masses``."""
        return (self.offset + np.arange(self.masses.size)) * self.interval

    def delta(self, epsilon: float) -> float:
        """Hockey-stick divergence ``E[(1 - exp(epsilon - L))_+] + P(L = inf)``."""
        losses = self.losses()
        above = losses > epsilon
        tail = float(np.sum(self.masses[above] * -np.expm1(epsilon - losses[above])))
        return min(1.0, self.infinity_mass + tail)

    def epsilon(self, delta: float) -> float:
        """Smallest epsilon >= 0 with ``delta(epsilon) <= delta`` (inf if none)."""
        if self.infinity_mass > delta:
            return math.inf
        h, w = self.interval, self.masses
        # Suffix sums over i >= k: T_k = P(L >= L_k) and S_k = E[exp(L_k - L); L >= L_k]; the
        # latter obeys S_k = w_k + exp(-h) S_{k+1}, a first-order recursion run by lfilter.
        mass_at_or_above = self.infinity_mass + np.cumsum(w[::-1])[::-1]
        scaled = lfilter([1.0], [1.0, -math.exp(-h)], w[::-1])[::-1]
        # On (L_{k-1}, L_k] the curve is exactly delta(eps) = T_k - exp(eps - L_k) S_k.
        ok = np.nonzero(mass_at_or_above - scaled <= delta)[0]
        k = int(ok[0]) if ok.size else w.size - 1
        loss_k = (self.offset + k) * h
        gap = mass_at_or_above[k] - delta
        if gap <= 0 or scaled[k] <= 0:  # the curve is flat at or below delta left of L_k
            return max(0.0, loss_k - h) if k > 0 else 0.0
        epsilon = loss_k + math.log(min(gap / scaled[k], 1.0))
        return max(0.0, epsilon if k == 0 else max(epsilon, loss_k - h))


def _log_r(x: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """``log((1-q) + q exp((2x-1) / (2 sigma^2)))``: log of P/Q in the remove direction."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(
            math.log1p(-q) if q < 1 else -np.inf, math.log(q) + (2 * x - 1) / (2 * sigma**2)
        )


def _log_sum_exp(offsets: np.ndarray, slopes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``log(sum_i exp(offsets_i + slopes_r * x_i))`` for each of the ``[m]`` slopes.

    ``offsets`` and ``x`` are ``[n]``; one ``[m, n]`` buffer is worked in place, since fresh
    temporaries of that size cost more in page faults than the arithmetic does.
    """
    a = np.multiply.outer(slopes, x)  # [m, n]
    a += offsets
    top = np.max(a, axis=1, keepdims=True)  # [m, 1]
    a -= top
    # Terms below e^-700 times a row's largest are raised to that: exp would otherwise make
    # subnormals, which are slow, and raising K(t) only widens the Chernoff windows.
    np.maximum(a, -700.0, out=a)
    np.exp(a, out=a)
    return np.log(np.sum(a, axis=1)) + top[:, 0]


@functools.lru_cache(maxsize=256)
def _log_mgf(sigma: float, q: float, add: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """K(t), K(-t) on the exponents ``_T`` (K(t) = log E_P[exp(t L)]) and Var L, one step."""
    reach = float(_T[-1]) + 2 + 14 * sigma
    n = int(min(max(2 * reach / (sigma / 8), 2001), 400_001))
    x = np.linspace(-reach, reach, n)  # [n]
    log_gauss = -(x**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_r = _log_r(x, sigma, q)
    dx = math.log(x[1] - x[0])
    t = np.concatenate([_T, -_T])[:, None]  # [2m, 1]
    # remove: E_P[r^t] = E_Q[r^(1+t)], Q = N(0, s^2); add: E_P[r^-t], P = N(0, s^2).
    power = -t if add else 1 + t
    both = _log_sum_exp(log_gauss, power[:, 0], log_r) + dx  # [2m]
    weights = np.exp(log_gauss + (0.0 if add else log_r) + dx)
    loss = -log_r if add else log_r
    mean = float(np.sum(weights * loss) / np.sum(weights))
    variance = float(np.sum(weights * (loss - mean) ** 2) / np.sum(weights))
    return both[: _T.size], both[_T.size :], variance


def _discrete_log_mgf(pld: DiscretePLD, t: np.ndarray) -> np.ndarray:
    """``log sum_i w_i exp(t L_i)`` over the finite part of a discrete PLD, at each ``t``."""
    keep = pld.masses > 0
    if not keep.any():
        return np.full(t.shape, -np.inf)
    log_w = np.log(pld.masses[keep])  # [n]
    return _log_sum_exp(log_w, t, pld.losses()[keep])  # [m]


def _window(k_pos: np.ndarray, k_neg: np.ndarray) -> tuple[float, float]:
    """Chernoff window [lo, hi] holding all but ``TAIL_MASS`` of a loss with log-MGFs K(+-t)."""
    log_tail = math.log(TAIL_MASS)
    hi = float(np.min((k_pos - log_tail) / _T))
    lo = float(np.max((log_tail - k_neg) / _T))
    return lo, hi


def _hockey_stick(eps: np.ndarray, sigma: float, q: float, add: bool) -> np.ndarray:
    """Exact delta(eps) of one step, vectorised over ``eps``; accurate also when tiny."""
    s2 = sigma**2
    log_c = math.log1p(-q) if q < 1 else -math.inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if not add:  # P = (1-q)N(0) + qN(1) vs Q = N(0); P > e^eps Q iff x > x*
            log_gap = eps + np.log(-np.expm1(log_c - eps))  # log(e^eps - (1 - q))
            xs = s2 * (log_gap - math.log(q)) + 0.5
            lead = math.log(q) + log_ndtr(-(xs - 1) / sigma)
            ratio = log_gap + log_ndtr(-xs / sigma) - lead
            out = np.exp(lead) * -np.expm1(ratio)
            out = np.where(eps <= log_c, -np.expm1(eps), out)
        else:  # P = N(0) vs Q = (1-q)N(0) + qN(1); P > e^eps Q iff x < x*
            log_lead = np.log(-np.expm1(log_c + eps))  # log(1 - (1 - q) e^eps)
            xs = s2 * (log_lead - eps - math.log(q)) + 0.5
            lead = log_lead + log_ndtr(xs / sigma)
            ratio = math.log(q) + eps + log_ndtr((xs - 1) / sigma) - lead
            out = np.exp(lead) * -np.expm1(ratio)
            out = np.where(eps >= -log_c, 0.0, out)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def _one_step(sigma: float, q: float, add: bool, h: float, lo: float, hi: float) -> DiscretePLD:
    """Connect-the-dots PLD of one step on grid points in [lo, hi] (arXiv 2207.04380, Alg. 1)."""
    first, last = math.floor(lo / h), math.ceil(hi / h)
    eps = np.arange(first, last + 1) * h  # [n]
    delta = _hockey_stick(eps, sigma, q, add)
    gaps = np.maximum(-np.diff(delta), 0.0)  # delta_i - delta_{i+1} >= 0
    em1 = math.expm1(h)
    w = np.empty_like(delta)
    # Masses whose hockey-stick curve is the chord (in e^eps) through each (eps_i, delta_i);
    # below eps_0 the chord runs to (e^eps = 0, delta = 1).
    w[0] = (1.0 - delta[0]) - gaps[0] / em1
    w[1:-1] = (math.exp(h) * gaps[:-1] - gaps[1:]) / em1
    w[-1] = math.exp(h) * gaps[-1] / em1
    return DiscretePLD(h, first, np.maximum(w, 0.0), float(delta[-1]))


def _compose_direction(
    history: Sequence[tuple[float, float, int]], add: bool, points: int
) -> DiscretePLD:
    log_tail = math.log(TAIL_MASS)
    mgfs = [_log_mgf(sigma, q, add) for sigma, q, _ in history]
    total_pos = sum(n * kp for (kp, _, _), (_, _, n) in zip(mgfs, history, strict=True))
    total_neg = sum(n * kn for (_, kn, _), (_, _, n) in zip(mgfs, history, strict=True))
    lo, hi = _window(np.asarray(total_pos), np.asarray(total_neg))
    total_steps = sum(n for _, _, n in history)
    spread = math.sqrt(sum(n * v for (_, _, v), (_, _, n) in zip(mgfs, history, strict=True)))
    # Connecting the dots raises each step's mean loss by about h^2 / 12; keep the sum of
    # those shifts below 1e-3 of the total loss's standard deviation.
    h = min((hi - lo) / points, math.sqrt(12e-3 * spread / total_steps))
    if not (math.isfinite(h) and h > 0 and (hi - lo) / h <= MAX_POINTS):
        raise DPValueError(
            f"history={list(history)!r}: the privacy loss window [{lo:.4g}, {hi:.4g}] needs "
            f"more than {MAX_POINTS} grid cells for a tight answer; use RDPAccountant for "
            "this history (its epsilon is then astronomically large anyway)."
        )
    # The discretised steps are what gets composed, so their own MGFs bound the composed
    # tails (rounding puts ~1e-13 of mass at the ends of a fine grid, so these tails can be
    # far heavier than the exact ones).
    steps_cut = 0.0  # sum over steps of their mass put at infinity by the discretisation
    log_finite = 0.0  # log of the composed finite mass, prod_j (1 - inf_j)^n_j
    disc_pos, disc_neg = np.zeros_like(_T), np.zeros_like(_T)
    ones: list[tuple[DiscretePLD, int]] = []
    for sigma, q, steps in history:
        exact_pos, exact_neg, _ = _log_mgf(sigma, q, add)
        lo1, hi1 = _window(exact_pos, exact_neg)
        if (hi1 - lo1) / h > MAX_POINTS:
            raise DPValueError(
                f"history entry (noise_multiplier={sigma!r}, sample_rate={q!r}, "
                f"steps={steps!r}): one step's privacy loss spans [{lo1:.3g}, {hi1:.3g}], "
                f"more than {MAX_POINTS} cells of the grid h={h:.3g} chosen for the whole "
                "history; use RDPAccountant for this history."
            )
        one = _one_step(sigma, q, add, h, lo1, hi1)
        disc_pos = disc_pos + steps * _discrete_log_mgf(one, _T)
        disc_neg = disc_neg + steps * _discrete_log_mgf(one, -_T)
        steps_cut += steps * one.infinity_mass
        log_finite += steps * math.log1p(-min(one.infinity_mass, 1.0))
        ones.append((one, steps))
    if len(ones) == 1 and ones[0][1] == 1:  # a single step: nothing to compose
        one = ones[0][0]
        return DiscretePLD(h, one.offset, one.masses, one.infinity_mass, one.infinity_mass)
    # Chernoff: the composed finite part has mass <= TAIL_MASS below lo_d and above hi_d.
    lo_d = float(np.max((log_tail - disc_neg) / _T))
    hi_d = float(np.min((disc_pos - log_tail) / _T))
    if not (math.isfinite(lo_d) and math.isfinite(hi_d) and (hi_d - lo_d) / h < 2 * MAX_POINTS):
        raise DPValueError(
            f"history={list(history)!r}: the discretised privacy loss spans [{lo_d:.4g}, "
            f"{hi_d:.4g}], more than {2 * MAX_POINTS} cells of the grid h={h:.3g}; use "
            "RDPAccountant for this history."
        )
    first, last = math.floor(lo_d / h), math.ceil(hi_d / h)
    # Compose on a circle of `size` cells: each step is wrapped modulo size, the spectra are
    # raised to their step counts, and one inverse FFT gives the composed masses modulo
    # size. Reading index r as the loss index in [first, first + size) is right except for
    # the mass outside that range (<= 2 TAIL_MASS), which lands on wrong cells. Moving mass
    # m changes delta(eps) = E[(1 - e^(eps - L))_+] by at most m, so adding 2 TAIL_MASS to
    # the infinity atom keeps the result an upper bound.
    size = next_fast_len(last - first + 1, real=True)
    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    for one, steps in ones:
        cells = (one.offset + np.arange(one.masses.size)) % size
        spectrum *= rfft(np.bincount(cells, weights=one.masses, minlength=size)) ** steps
    masses = np.roll(irfft(spectrum, size), -(first % size))  # masses[k]: index first + k
    # FFT round-off shows as small negative masses; count size times the largest of them as
    # mass that may be misplaced, like the aliased tails.
    roundoff = size * max(0.0, -float(np.min(masses)))
    masses = np.maximum(masses, 0.0)
    misplaced = 2 * TAIL_MASS + roundoff
    infinity = min(1.0, -math.expm1(log_finite) + misplaced)
    return DiscretePLD(h, first, masses, infinity, min(1.0, steps_cut + misplaced))


def compose_subsampled_gaussian(
    history: Sequence[tuple[float, float, int]], *, points: int = DEFAULT_POINTS
) -> tuple[DiscretePLD, ...]:
    """Pessimistic PLDs, one per direction, of a history of subsampled Gaussian steps.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` entries, applied in order, with
            sigma >= 0, q in (0, 1] and steps >= 0 (as an Accountant records them).
        points: grid cells across the total loss window; larger is tighter and slower.

    Returns:
        ``(remove, add)`` PLDs; pass them to :func:`epsilon_from_pld` or
        :func:`delta_from_pld`. Empty tuple for an empty history; a single all-infinite
        PLD if a step had sigma == 0.

    Privacy:
        Each returned PLD dominates the exact PLD of its direction under add/remove-one
        adjacency, so epsilons and deltas read from them are upper bounds (up to FFT
        round-off, see the module docstring).

    Raises:
        DPValueError: the loss range cannot be represented on the grid (extreme histories,
            e.g. sigma = 0.3 with q = 1 over millions of steps at a tiny ``points``).
    """
    entries = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not entries:
        return ()
    if any(sigma == 0 for sigma, _, _ in entries):
        return (DiscretePLD(1.0, 0, np.zeros(1), 1.0, 0.0),)
    return tuple(_compose_direction(entries, add, int(points)) for add in (False, True))


def delta_from_pld(plds: Sequence[DiscretePLD], epsilon: float) -> float:
    """Smallest delta such that the composition is (epsilon, delta)-DP (worst direction)."""
    return max((pld.delta(float(epsilon)) for pld in plds), default=0.0)


def epsilon_from_pld(plds: Sequence[DiscretePLD], delta: float) -> float:
    """Smallest epsilon >= 0 such that the composition is (epsilon, delta)-DP, or inf.

    Raises:
        DPValueError: ``delta`` is so small that the mass the computation could not place
            (window truncation plus FFT round-off, about 1e-11 for long histories) would
            make the answer loose; such a delta is below what double precision resolves.
    """
    floor = max((pld.truncated_mass for pld in plds), default=0.0)
    if floor > 0.1 * delta:
        raise DPValueError(
            f"delta={delta!r} is below the numerical floor of this privacy loss distribution "
            f"(about {10 * floor:.1g}: FFT round-off and truncated tails, counted as "
            "infinite loss); ask for a larger delta, or use RDPAccountant for this delta."
        )
    return max((pld.epsilon(float(delta)) for pld in plds), default=0.0)
