"""The compiled CPU Gaussian sampler: exact against a NumPy re-derivation, then statistics.

The reference below follows the published algorithms (SplitMix64 seeding, xoshiro256++,
Box-Muller) in NumPy, with float64 libm functions where the kernel uses float32 series; the
two must agree to float32 accuracy, value for value. The statistical tests then check the
draws as a sample: moments, the Kolmogorov-Smirnov distance, the tail, and independence
between lanes, pair partners, successive steps and threaded chunks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dptorch import cpu_sampler, noise
from dptorch.cpu_sampler import (
    kernel_available,
    kernel_normal_,
    kernel_normal_chunks_,
    set_cpu_sampler,
)
from dptorch.errors import DPValueError
from dptorch.noise import _PARALLEL_MIN_NUMEL, gaussian_noise

LANES = 16  # the kernel's LANES
MASK64 = (1 << 64) - 1

pytestmark = pytest.mark.skipif(
    not kernel_available(),
    reason="the compiled kernel is not built (test_cpu_sampler_build.py fails for that)",
)


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


def _reference(n: int, seed: int, std: float) -> np.ndarray:
    state = seed
    words = []
    for _ in range(4 * LANES):
        state, z = _splitmix64(state)
        words.append(z)
    s = np.array(words, dtype=np.uint64).reshape(LANES, 4).T.copy()  # s[k][lane]
    steps = -(-n // (2 * LANES))
    out = np.empty((steps, 2, LANES), dtype=np.float64)
    with np.errstate(over="ignore"):
        for i in range(steps):
            w = _rotl(s[0] + s[3], 23) + s[0]
            t = s[1] << np.uint64(17)
            s[2] ^= s[0]
            s[3] ^= s[1]
            s[1] ^= s[2]
            s[0] ^= s[3]
            s[2] ^= t
            s[3] = _rotl(s[3], 45)
            low = (w & np.uint64(0xFFFFFFFF)).astype(np.int64)
            high = (w >> np.uint64(32)).astype(np.int64)
            # The kernel's float32 steps, kept: the uniform and the angle offset are rounded
            # to float32 before any function is applied.
            u = (np.float32(low >> 1) + np.float32(0.5)) * np.float32(2.0**-31)
            offset = np.float32(high & 0x3FFFFFFF) - np.float32(2.0**29)
            quadrant = high >> 30
            angle = (2 * quadrant + 1) * (math.pi / 4) + offset.astype(np.float64) * (
                2 * math.pi / 2.0**32
            )
            radius = std * np.sqrt(-2.0 * np.log(u.astype(np.float64)))
            out[i, 0] = radius * np.cos(angle)
            out[i, 1] = radius * np.sin(angle)
    return out.reshape(-1)  # whole steps: 2 LANES values each, the last one not cut to n


def _kernel(n: int, seed: int, std: float) -> torch.Tensor:
    return kernel_normal_(torch.empty(n), std, seed)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 4099, 64_000])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 2, 2**64 - 1])
def test_kernel_matches_the_reference_value_for_value(n: int, seed: int) -> None:
    std = 2.5
    whole_steps = _reference(n, seed, std)  # the last step whole: the radii of cut pairs
    expected = whole_steps[:n]
    drawn = _kernel(n, seed, std).double().numpy()
    # Measure each error against its pair's radius (cos or sin near 0 makes one value tiny
    # while its absolute error stays that of the radius). The float32 series and roundings
    # give at most 3.9 float32 epsilons on the seeds here; a wrong constant in the logarithm
    # (ln 2's low part off by 0.3%) gives about 70.
    pairs = whole_steps.reshape(-1, 2, LANES)
    radius = np.sqrt((pairs**2).sum(axis=1, keepdims=True)).repeat(2, axis=1).reshape(-1)[:n]
    error = np.abs(drawn - expected) / np.maximum(radius, 1e-30)
    assert error.max() <= 8 * 2.0**-24, f"worst error {error.max() / 2.0**-24:.1f} epsilons"


def test_values_depend_on_seed_and_index_only() -> None:
    whole = _kernel(5000, 99, 1.0)
    assert torch.equal(_kernel(5000, 99, 1.0), whole)
    assert torch.equal(_kernel(1234, 99, 1.0), whole[:1234])  # a shorter draw is a prefix
    # std scales the radius before the angle is applied: the same values to rounding.
    torch.testing.assert_close(_kernel(5000, 99, 3.0), whole * 3.0, rtol=1e-6, atol=0)
    assert not torch.equal(_kernel(5000, 100, 1.0), whole)


def test_moments_and_kolmogorov_smirnov_distance_of_a_large_sample() -> None:
    n = 2_000_000
    z = _kernel(n, 2024, 1.0).double().numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    # Fixed seed, so this is a fixed number: a sampler off by 1e-3 in its CDF fails it
    # (the KS distance of 2M exact draws is ~1/sqrt(n) = 7e-4 at most in typical runs).
    assert stats.kstest(z, "norm").statistic < 1.5e-3


def test_tail_frequency_and_tail_cut() -> None:
    n = 4_000_000
    z = _kernel(n, 7, 1.0).double().numpy()
    beyond_4 = int((np.abs(z) > 4).sum())
    expected = n * 2 * stats.norm.sf(4)  # 253
    assert abs(beyond_4 - expected) < 5 * math.sqrt(expected)
    # The smallest uniform, 2^-32, bounds the radius at sqrt(64 ln 2) = 6.66.
    assert np.abs(z).max() <= math.sqrt(64 * math.log(2)) + 1e-5


def test_lanes_pairs_and_steps_are_uncorrelated() -> None:
    steps = 40_000
    z = _kernel(steps * 2 * LANES, 11, 1.0).double().view(steps, 2, LANES)
    bound = 5 / math.sqrt(steps)
    x, y = z[:, 0, :], z[:, 1, :]
    pairs = {
        "pair partners (cos, sin)": (x, y),
        "neighbouring lanes": (x[:, :-1], x[:, 1:]),
        "first and last lane": (x[:, :1], x[:, -1:]),
        "successive steps": (x[:-1], x[1:]),
    }
    for name, (a, b) in pairs.items():
        correlation = float((a * b).mean())
        assert abs(correlation) < bound, f"{name}: correlation {correlation:.4f}"
    # Squared values too: Box-Muller partners share a radius, so their squares correlate if
    # the angle is not uniform; exact draws give ~0.
    assert abs(float(((x**2 - 1) * (y**2 - 1)).mean()) / 2) < bound


def test_gaussian_noise_on_the_cpu_uses_the_kernel_with_seeds_from_the_generator() -> None:
    numel = 3 * _PARALLEL_MIN_NUMEL + 5  # threaded: one chunk per worker
    torch.set_num_threads(max(torch.get_num_threads(), 2))
    noise = gaussian_noise(
        torch.Size([numel]),
        std=1.5,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(5),
    )
    generator = torch.Generator().manual_seed(5)
    workers = min(torch.get_num_threads(), 8)
    chunks = torch.empty(numel).chunk(workers)
    seeds = torch.randint(0, 2**63 - 1, (len(chunks),), generator=generator).tolist()
    expected = torch.cat([kernel_normal_(c, 1.5, s) for c, s in zip(chunks, seeds, strict=True)])
    assert torch.equal(noise, expected)


@pytest.mark.parametrize(("numel", "chunks"), [(5, 4), (1000, 3), (4096, 2), (100_003, 7)])
def test_chunked_fill_equals_one_fill_per_chunk(numel: int, chunks: int) -> None:
    # (5, 4): out.chunk(4) makes 3 chunks of 2, 2 and 1 values; the seeds follow the chunks.
    pieces = torch.empty(numel).chunk(chunks)
    seeds = [1000 + 17 * i for i in range(len(pieces))]
    together = kernel_normal_chunks_(torch.empty(numel), 0.7, seeds)
    one_by_one = torch.cat(
        [kernel_normal_(torch.empty(len(p)), 0.7, s) for p, s in zip(pieces, seeds, strict=True)]
    )
    assert torch.equal(together, one_by_one)


def test_noise_without_openmp_threads_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback of a kernel built without OpenMP: Python threads, one chunk each.
    def draw() -> torch.Tensor:
        return gaussian_noise(
            torch.Size([2 * _PARALLEL_MIN_NUMEL + 3]),
            std=1.0,
            dtype=torch.float32,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(9),
        )

    torch.set_num_threads(max(torch.get_num_threads(), 2))
    in_the_kernel = draw()
    monkeypatch.setattr(noise, "kernel_has_openmp", lambda: False)
    assert torch.equal(draw(), in_the_kernel)


def test_chunked_fill_refuses_seeds_that_do_not_match_the_chunks() -> None:
    with pytest.raises(DPValueError, match="pass one seed per chunk"):
        kernel_normal_chunks_(torch.empty(5), 1.0, [1, 2, 3, 4])  # 3 chunks, 4 seeds
    with pytest.raises(DPValueError, match="pass one seed per chunk"):
        kernel_normal_chunks_(torch.empty(5), 1.0, [])
    kernel = cpu_sampler._KERNEL
    buffer = torch.empty(100)
    with pytest.raises(ValueError, match="cannot split 100 values"):
        kernel.fill_chunks(buffer.data_ptr(), 100, 49, [1, 2], 1.0)  # leaves 2 values unset
    with pytest.raises(ValueError, match="cannot split 100 values"):
        kernel.fill_chunks(buffer.data_ptr(), 100, 101, [1, 2], 1.0)
    with pytest.raises(ValueError, match="between 1 and 256 seeds"):
        kernel.fill_chunks(buffer.data_ptr(), 100, 100, [], 1.0)
    with pytest.raises(OverflowError):
        kernel.fill_chunks(buffer.data_ptr(), 100, 50, [1, -2], 1.0)
    with pytest.raises(ValueError, match="finite"):
        kernel.fill_chunks(buffer.data_ptr(), 100, 50, [1, 2], float("inf"))


def test_torch_sampler_can_be_chosen_and_gives_torchs_values() -> None:
    def draw() -> torch.Tensor:
        return gaussian_noise(
            torch.Size([1000]),
            std=1.0,
            dtype=torch.float32,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(3),
        )

    with_kernel = draw()
    set_cpu_sampler("torch")
    try:
        assert cpu_sampler.cpu_sampler() == "torch"
        with_torch = draw()
    finally:
        set_cpu_sampler("kernel")
    assert torch.equal(
        with_torch, torch.empty(1000).normal_(generator=torch.Generator().manual_seed(3))
    )
    assert not torch.equal(with_kernel, with_torch)


def test_float64_noise_stays_with_torch() -> None:
    noise = gaussian_noise(
        torch.Size([100]),
        std=1.0,
        dtype=torch.float64,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(3),
    )
    reference = torch.empty(100, dtype=torch.float64)
    assert torch.equal(noise, reference.normal_(generator=torch.Generator().manual_seed(3)))


def test_bad_arguments_are_refused_with_the_reason() -> None:
    with pytest.raises(DPValueError, match="choose one of"):
        set_cpu_sampler("mt19937")
    with pytest.raises(DPValueError, match="contiguous float32 CPU"):
        kernel_normal_(torch.empty(10, dtype=torch.float64), 1.0, 0)
    with pytest.raises(DPValueError, match="contiguous float32 CPU"):
        kernel_normal_(torch.empty(10, 2).t(), 1.0, 0)
    with pytest.raises(ValueError, match="finite"):
        kernel_normal_(torch.empty(10), float("nan"), 0)
