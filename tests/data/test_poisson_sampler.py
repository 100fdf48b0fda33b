"""Statistical and contract tests for PoissonBatchSampler.

Every statistical test uses a fixed seed, so it is deterministic; the tolerances are still
set from the sampling distribution (5 standard errors, or p > 1e-3) so that a correct sampler
passes for almost every seed and the checks mean something.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dptorch.data import PoissonBatchSampler
from dptorch.errors import DPTypeError, DPValueError, SampleRateError

Z_TOL = 5.0  # standard errors allowed for a mean-type statistic
P_MIN = 1e-3  # smallest acceptable goodness-of-fit p-value


def _masks(sampler: PoissonBatchSampler) -> np.ndarray:
    """[steps, N] 0/1 matrix: row t marks the indices of batch t."""
    rows = np.zeros((len(sampler), sampler.num_samples), dtype=np.int64)
    for t, batch in enumerate(sampler):
        rows[t, batch] = 1
    return rows


def _sampler(n: int, q: float, steps: int, seed: int) -> PoissonBatchSampler:
    return PoissonBatchSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(seed))


def test_batch_sizes_follow_binomial() -> None:
    n, q, steps = 1000, 0.05, 2000
    sizes = np.array([len(b) for b in _sampler(n, q, steps, seed=1234)])

    mean, var = n * q, n * q * (1 - q)
    # Mean of `steps` i.i.d. Binomial(n, q) sizes: standard error sqrt(var / steps).
    assert abs(sizes.mean() - mean) < Z_TOL * math.sqrt(var / steps)
    # Sample variance: Var(s^2) = (mu4 - var^2 (T-3)/(T-1)) / T, with the binomial's fourth
    # central moment mu4 = npq (1 + 3 (n-2) pq). This also checks independence: sampling
    # without replacement would shrink the variance, fixed-size batches would zero it.
    mu4 = var * (1 + 3 * (n - 2) * q * (1 - q))
    se_var = math.sqrt((mu4 - var**2 * (steps - 3) / (steps - 1)) / steps)
    assert abs(sizes.var(ddof=1) - var) < Z_TOL * se_var

    # Chi-square goodness of fit against the exact pmf, with adjacent sizes pooled so that
    # every bin expects at least 5 batches (the usual validity condition of the test).
    expected_per_size = steps * stats.binom(n, q).pmf(np.arange(n + 1))  # [n + 1]
    bin_starts, total = [0], 0.0
    for k, e in enumerate(expected_per_size):
        total += e
        if total >= 5 and k < n:
            bin_starts.append(k + 1)
            total = 0.0
    if total < 5:  # fold the thin upper tail into the last full bin
        bin_starts.pop()
    bin_of_size = np.searchsorted(bin_starts, np.arange(n + 1), side="right") - 1
    expected = np.bincount(bin_of_size, weights=expected_per_size)
    observed = np.bincount(bin_of_size[sizes], minlength=len(bin_starts))
    assert expected.min() >= 5
    assert len(expected) > 10  # enough bins for the test to have power
    result = stats.chisquare(observed, expected * observed.sum() / expected.sum())
    assert result.pvalue > P_MIN


def test_every_index_is_included_at_rate_q() -> None:
    n, q, steps = 1000, 0.05, 2000
    counts = _masks(_sampler(n, q, steps, seed=99)).sum(axis=0)  # [N]
    # Each index's count is Binomial(steps, q), independently across indices.
    z = (counts - steps * q) / math.sqrt(steps * q * (1 - q))
    # max over 1000 near-normal |z|: P(any > 5) is about 1000 * 5.7e-7 < 1e-3.
    assert np.abs(z).max() < Z_TOL
    # sum z^2 ~ chi-square with N degrees of freedom: no index (not just the worst) biased.
    assert stats.chi2.sf((z**2).sum(), df=n) > P_MIN
    # No drift along the index range (e.g. low indices favoured).
    assert stats.spearmanr(np.arange(n), counts).pvalue > P_MIN


def test_inclusions_of_different_indices_are_independent() -> None:
    n, q, steps = 40, 0.3, 4000
    x = _masks(_sampler(n, q, steps, seed=7)).astype(np.float64)  # [T, N]

    # Joint inclusion frequency of a few pairs, including both ends of the range.
    se_joint = math.sqrt(q**2 * (1 - q**2) / steps)
    for i, j in [(0, 1), (0, n - 1), (n // 2, n // 2 + 1), (n - 2, n - 1)]:
        joint = (x[:, i] * x[:, j]).mean()
        assert abs(joint - q**2) < Z_TOL * se_joint, (i, j, joint)

    # All pairs: under independence each sample correlation is ~ N(0, 1/T); with 780 pairs
    # P(max |r| sqrt(T) > 5) is about 780 * 5.7e-7 < 1e-3.
    r = np.corrcoef(x, rowvar=False)  # [N, N]
    off_diagonal = r[~np.eye(n, dtype=bool)]
    assert np.abs(off_diagonal).max() * math.sqrt(steps) < Z_TOL


def test_rate_one_gives_every_index_every_step() -> None:
    sampler = PoissonBatchSampler(7, 1.0, steps=3)
    assert list(sampler) == [list(range(7))] * 3


def test_same_seed_same_batches_different_seed_different() -> None:
    first = list(_sampler(200, 0.1, 10, seed=5))
    torch.manual_seed(12345)  # the global RNG must not matter when a generator is given
    torch.rand(100)
    again = list(_sampler(200, 0.1, 10, seed=5))
    other = list(_sampler(200, 0.1, 10, seed=6))
    assert first == again
    assert first != other


def test_state_lives_in_the_generator() -> None:
    sampler = _sampler(200, 0.1, 5, seed=3)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert epoch1 != epoch2  # the generator advances: a new epoch gets new batches
    assert list(_sampler(200, 0.1, 10, seed=3)) == epoch1 + epoch2


def test_default_generator_follows_torch_manual_seed() -> None:
    sampler = PoissonBatchSampler(100, 0.2, steps=4)
    torch.manual_seed(42)
    first = list(sampler)
    torch.manual_seed(42)
    assert list(sampler) == first


@pytest.mark.parametrize(("q", "steps"), [(0.05, 20), (0.3, 3), (1.0, 1), (0.9, 1), (0.001, 1000)])
def test_default_steps_is_one_expected_epoch(q: float, steps: int) -> None:
    assert len(PoissonBatchSampler(10, q)) == steps
    assert len(PoissonBatchSampler(10, q, steps=7)) == 7


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"num_samples": 0}, DPValueError, "num_samples=0"),
        ({"num_samples": -3}, DPValueError, "num_samples=-3"),
        ({"num_samples": 2.5}, DPTypeError, "num_samples=2.5"),
        ({"sample_rate": 0.0}, SampleRateError, "sample_rate=0.0"),
        ({"sample_rate": -0.1}, SampleRateError, "sample_rate=-0.1"),
        ({"sample_rate": 1.5}, SampleRateError, "sample_rate=1.5"),
        ({"sample_rate": float("nan")}, SampleRateError, "sample_rate=nan"),
        ({"sample_rate": True}, DPTypeError, "sample_rate=True"),
        ({"sample_rate": "0.1"}, DPTypeError, "sample_rate='0.1'"),
        ({"steps": 0}, DPValueError, "steps=0"),
        ({"steps": 1.0}, DPTypeError, "steps=1.0"),
        ({"generator": 1}, DPTypeError, "generator=1"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict, error: type, fragment: str) -> None:
    args = {"num_samples": 10, "sample_rate": 0.1, **kwargs}
    with pytest.raises(error, match=r"must|outside") as info:
        PoissonBatchSampler(**args)
    assert fragment in str(info.value)
    assert isinstance(info.value, (ValueError, TypeError))


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 60),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**31),
)
def test_batches_are_sorted_distinct_in_range(n: int, q: float, steps: int, seed: int) -> None:
    batches = list(_sampler(n, q, steps, seed))
    assert len(batches) == steps
    for batch in batches:
        assert batch == sorted(set(batch))
        assert all(isinstance(i, int) and 0 <= i < n for i in batch)
