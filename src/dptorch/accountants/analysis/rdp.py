"""Renyi DP of the Poisson-subsampled Gaussian mechanism, and its conversion to (eps, delta).

The mechanism adds N(0, sigma^2) noise to a sum with L2 sensitivity 1 over a batch in which
each example appears independently with probability q. Under add/remove-one adjacency its
Renyi divergence of order alpha is ``log(A_alpha) / (alpha - 1)`` with

    A_alpha = E_{z ~ mu0} [((1 - q) + q * mu1(z) / mu0(z)) ** alpha],
    mu0 = N(0, sigma^2),  mu1 = N(1, sigma^2),

which Mironov, Talwar and Zhang (arXiv 1908.10530) show is the worst case over the two
directions. We evaluate A_alpha exactly for integer alpha (a finite binomial sum) and, for
fractional alpha, by the two convergent series of Section 3.3 of that paper.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln, gammasgn, log_ndtr

from dptorch.accountants._validation import (
    as_float,
    check_delta,
    check_orders,
    noise_multiplier_problem,
    raise_problems,
    sample_rate_problem,
    steps_problem,
)
from dptorch.errors import DPValueError

DEFAULT_ORDERS: tuple[float, ...] = (
    *(1 + k / 20 for k in range(1, 20)),  # 1.05 .. 1.95: optimal when epsilon is large
    *(2 + k / 10 for k in range(0, 80)),  # 2.0 .. 9.9
    *range(10, 65),
    80,
    96,
    128,
    192,
    256,
    384,
    512,
    768,
    1024,
)
"""Renyi orders searched by default: dense where the optimum usually falls, sparse above 64
(large orders only matter for very small epsilon)."""

# A fractional-order series is truncated once its remainder bound (which is then added, so
# the result stays an upper bound) is below 1e-10 of A - 1, i.e. of the RDP itself, or below
# the rounding error float64 already makes in A >= 1, whichever is larger.
_SERIES_RTOL = 1e-10
_SERIES_ATOL = 2.0**-53
_SERIES_MAX_TERMS = 1 << 24


def compute_rdp(
    *, sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[float] | np.ndarray
) -> np.ndarray:
    """RDP of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    Args:
        sample_rate: Poisson sampling probability q, in (0, 1].
        noise_multiplier: noise standard deviation over L2 sensitivity, sigma >= 0.
        steps: number of composed steps, >= 0.
        orders: Renyi orders alpha, each finite and > 1.

    Returns:
        Array of shape ``[len(orders)]``: the RDP at each order (``inf`` when sigma == 0).

    Privacy:
        Assumes add/remove-one adjacency, an L2 sensitivity of 1 for the noised sum (clipping
        norm C and noise std sigma * C), and that each example joins each batch independently
        with probability q. Integer orders are exact up to float rounding; fractional orders
        are exact series truncated with a bound on the remainder added, so the value never
        understates the divergence. Composition over steps is additive (Mironov, arXiv
        1702.07476, Prop. 1).

    Raises:
        DPValueError: an argument is out of range (all problems are reported together).
    """
    q = as_float("sample_rate", sample_rate)
    sigma = as_float("noise_multiplier", noise_multiplier)
    raise_problems([sample_rate_problem(q), noise_multiplier_problem(sigma), steps_problem(steps)])
    alphas = check_orders(orders)
    if steps == 0:
        return np.zeros_like(alphas)
    per_step = np.array([_rdp_one_step(q, sigma, float(a)) for a in alphas])
    return per_step * int(steps)


def rdp_to_epsilon(
    *, orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """Converts an RDP curve into the smallest epsilon it certifies at ``delta``.

    Uses, at each order alpha with RDP value r, the conversion of Balle et al. (arXiv
    1905.09982, Thm. 21; also Canonne, Kamath and Steinke, arXiv 2004.00010, Prop. 12):

        eps(alpha) = r - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha),

    which is never looser than the classic ``r + log(1 / delta) / (alpha - 1)``.

    Args:
        orders: Renyi orders alpha, each finite and > 1.
        rdp: RDP value at each order (same length as ``orders``), >= 0; ``inf`` allowed.
        delta: target delta in (0, 1).

    Returns:
        ``(epsilon, order)``: the minimum over orders, clipped at 0 from below, and the order
        attaining it. Epsilon is ``inf`` (never NaN) when every order has infinite RDP.

    Privacy:
        A mechanism with this RDP curve is (epsilon, delta)-DP.

    Raises:
        DPValueError: ``delta`` is outside (0, 1), an order is <= 1, or ``rdp`` is negative,
            NaN or of another length than ``orders``.
    """
    log_delta = math.log(check_delta(delta))
    alphas = check_orders(orders)
    values = np.asarray(rdp, dtype=np.float64)
    if values.shape != alphas.shape:
        raise DPValueError(
            f"rdp has shape {values.shape} but orders has shape {alphas.shape}; pass one "
            "RDP value per order."
        )
    if np.any(np.isnan(values) | (values < 0)):
        raise DPValueError(
            f"rdp={values.tolist()!r} contains NaN or negative values; RDP is always >= 0."
        )
    # rdp may be inf; the other terms are finite since alpha > 1, so eps is never NaN.
    eps = values - (log_delta + np.log(alphas)) / (alphas - 1) + np.log1p(-1 / alphas)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), float(alphas[best])


# A pure function of three floats: caching it makes repeated get_epsilon() calls during
# training cost only the history entries added since the last call.
@functools.lru_cache(maxsize=1 << 16)
def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    """RDP of one step at one order; arguments already validated (a nonzero sigma lies in
    [1e-150, 1e150], so its square neither under- nor overflows)."""
    if sigma == 0:
        return math.inf
    if q == 1:
        # No subsampling: the Gaussian mechanism itself, alpha / (2 sigma^2).
        return alpha / (2 * sigma**2)
    half_inv_var = 0.5 / sigma**2
    if not math.isfinite(half_inv_var):
        return math.inf  # sigma so small that sigma^2 underflows: no meaningful privacy
    if alpha.is_integer():
        log_a = _log_a_integer(q, half_inv_var, int(alpha))
    else:
        log_a = _log_a_fractional(q, sigma, alpha)
    return max(log_a, 0.0) / (alpha - 1)


def _log_a_integer(q: float, half_inv_var: float, alpha: int) -> float:
    """log A_alpha for integer alpha >= 2, exactly.

    Expanding the binomial inside the expectation, with E_{mu0}[(mu1/mu0)^k] =
    exp(k (k - 1) / (2 sigma^2)), gives A = sum_k C(alpha, k) (1-q)^(alpha-k) q^k e^(k(k-1)/2s^2).
    The k = 0, 1 exponents are 0, so A - 1 = sum_{k >= 2} (...) * expm1(k(k-1)/2s^2): every
    term is positive, and computing A - 1 keeps full relative precision when q is tiny and
    A is within 1e-12 of 1.
    """
    k = np.arange(2, alpha + 1, dtype=np.float64)
    exponent = k * (k - 1) * half_inv_var  # > 0
    log_expm1 = exponent + np.log(-np.expm1(-exponent))  # log(e^x - 1) for any x > 0
    log_terms = (
        gammaln(alpha + 1.0)
        - gammaln(k + 1)
        - gammaln(alpha - k + 1)
        + (alpha - k) * math.log1p(-q)
        + k * math.log(q)
        + log_expm1
    )
    log_excess, _ = _signed_log_sum_exp(log_terms, np.ones_like(log_terms))  # log(A - 1)
    return float(np.logaddexp(0.0, log_excess))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for non-integer alpha > 1, as an upper bound tight to float precision.

    Split the integral at z0, where (1 - q) = q * mu1(z0) / mu0(z0), and expand
    ((1-q) + q L)^alpha in the binomial series that converges on each side (arXiv
    1908.10530, Sec. 3.3). With Phi the standard normal CDF and j = alpha - i:

        A = sum_i C(alpha, i) (1-q)^j q^i e^{(i^2 - i) / 2s^2} Phi((z0 - i) / s)
          + sum_i C(alpha, i) (1-q)^i q^j e^{(j^2 - j) / 2s^2} Phi((j - z0) / s).

    For i > alpha both series alternate in sign with terms decreasing in magnitude (the ratio
    of consecutive terms is |alpha - i| / (i + 1) times a factor < 1 because
    log Phi(u) + u^2 / 2 increases in u), so each truncated tail is at most its first
    omitted term. We add those terms' magnitudes to the partial sum, making the result an
    upper bound on A.
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma**2 * (log_1mq - log_q) + 0.5
    half_inv_var = 0.5 / sigma**2

    def log_terms(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-magnitudes of both series' terms at indices i, stacked [2, len(i)], and signs."""
        j = alpha - i
        log_binom = gammaln(alpha + 1) - gammaln(i + 1) - gammaln(j + 1)
        left = log_binom + j * log_1mq + i * log_q + (i * i - i) * half_inv_var
        left += log_ndtr((z0 - i) / sigma)
        right = log_binom + i * log_1mq + j * log_q + (j * j - j) * half_inv_var
        right += log_ndtr((j - z0) / sigma)
        sign = gammasgn(j + 1)  # sign of C(alpha, i): Gamma(alpha + 1), Gamma(i + 1) > 0
        return np.stack([left, right]), np.stack([sign, sign])

    log_head, head_sign = -math.inf, 1.0
    # The first cut must exceed ceil(alpha) so that every tail lies in the alternating part.
    lo, hi = 0, max(64, 2 * math.ceil(alpha) + 2)
    while True:
        logs, signs = log_terms(np.arange(lo, hi + 1, dtype=np.float64))
        log_head, head_sign = _signed_log_sum_exp(
            np.append(logs[:, :-1], log_head), np.append(signs[:, :-1], head_sign)
        )
        log_tail_bound = float(np.logaddexp(logs[0, -1], logs[1, -1]))  # terms at index hi
        if head_sign <= 0 or hi >= _SERIES_MAX_TERMS:
            break
        log_tol = math.log(_SERIES_ATOL)
        if log_head > 0:  # log(A - 1) = log A + log(1 - 1/A), stable for any A > 1
            log_excess = log_head + math.log(-math.expm1(-log_head))
            log_tol = max(log_tol, math.log(_SERIES_RTOL) + log_excess)
        if log_tail_bound < log_tol:
            break
        lo, hi = hi, 2 * hi
    if head_sign <= 0:
        # Cannot happen in exact arithmetic (A >= 1 and the tail is smaller); refuse to
        # return an understated value if rounding ever made it so.
        return math.inf
    return float(np.logaddexp(log_head, log_tail_bound))


def _signed_log_sum_exp(logs: np.ndarray, signs: np.ndarray) -> tuple[float, float]:
    """``(log|S|, sign S)`` of ``S = sum(signs * exp(logs))``; ``(-inf, 1.0)`` if S == 0.

    Written as ``S = s_k e^(l_k) (1 + rest)`` around the largest term k, with ``log1p(rest)``:
    when S is within rounding of that term (A close to 1 for tiny q), this keeps the
    relative precision of ``log S`` that ``log(sum)`` would lose.
    """
    k = int(np.argmax(logs))
    top = float(logs[k])
    if top == -math.inf:
        return -math.inf, 1.0
    scaled = signs * np.exp(logs - top)
    scaled[k] = 0.0  # summed without term k, which would swamp the rest's low digits
    rest = float(np.sum(scaled)) * float(signs[k])
    if rest <= -1.0:
        total = float(signs[k]) * (1.0 + rest)
        if total == 0:
            return -math.inf, 1.0
        return top + math.log(abs(total)), math.copysign(1.0, total)
    return top + math.log1p(rest), float(signs[k])
