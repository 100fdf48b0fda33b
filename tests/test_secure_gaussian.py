"""Secure mode's compiled float64 Box-Muller (``_secure_gaussian.c``) against its references.

The torch transform :func:`normal_from_words_` is the specification: the kernel must give its
values, to a few float64 ulps of the radius, on random words, on the words at the edges of
the quadrant and radius reductions, for odd counts and for a scale whose square overflows;
where a radius word needs a deeper uniform it must say so and leave the words alone, so that
the torch transform can draw that depth. The build test lives here too and never skips.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptorch.optimizers.dp_optimizer as dp_optimizer
from dptorch import BatchMemoryManager, PrivacyEngine, secure_random
from dptorch.noise import noise_grid
from dptorch.secure_random import SecureRandom, _compiled_transform, normal_from_words_

needs_kernel = pytest.mark.skipif(
    secure_random._TRANSFORM is None, reason="the secure transform is not built"
)
MASK52 = (1 << 52) - 1
# Largest radius from a 52-bit uniform: sqrt(-2 ln 2^-53) ~ 8.57; torch's angle carries one
# more rounding (~1.4e-15 rad at 4 pi), so values near a zero crossing differ by ~1e-14.
TOLERANCE = 1e-13


def _words(count: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (count,), generator=g, dtype=torch.int64)


def _kernel(words: torch.Tensor, count: int, scale: float = 1.0, threads: int = 2) -> tuple:
    out = torch.empty(count, dtype=torch.float64)
    kept = words.clone()
    assert secure_random._TRANSFORM is not None
    deep = secure_random._TRANSFORM.transform(
        words.data_ptr(), out.data_ptr(), count, scale, threads
    )
    assert torch.equal(words, kept), "the kernel must only read the words"
    return out, deep


def _reference(words: torch.Tensor, count: int, scale: float = 1.0) -> torch.Tensor:
    return normal_from_words_(words.clone(), None, scale=scale)[:count]


def test_the_secure_transform_was_built() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("built and checked on Linux, where CI runs")
    assert secure_random._TRANSFORM is not None, (
        "dptorch._secure_gaussian did not build or load; reinstall with a C compiler "
        "(pip install -e .) and read the build log"
    )


@needs_kernel
@pytest.mark.parametrize("count", [2, 7, 1000, 65537, 200_000])
@pytest.mark.parametrize("scale", [1.0, 3.7e-3, 1e200])
def test_kernel_equals_the_torch_transform(count: int, scale: float) -> None:
    words = _words(2 * ((count + 1) // 2), seed=count)
    out, deep = _kernel(words, count, scale)
    assert deep == 0
    expected = _reference(words, count, scale)
    torch.testing.assert_close(out, expected, rtol=TOLERANCE, atol=TOLERANCE * scale)


@needs_kernel
def test_kernel_at_the_edges_of_its_reductions() -> None:
    quarter = 1 << 50
    angles = [0, 1, quarter // 2 - 1, quarter // 2, quarter // 2 + 1, quarter - 1, quarter]
    angles += [quarter + 1, 2 * quarter, 3 * quarter, 3 * quarter + quarter // 2, MASK52]
    radii = [1, 2, 1 << 26, 1 << 51, MASK52 - 1, MASK52]  # u1 from 1.5 2^-52 to 1 - 2^-53
    pairs = [(r, a) for r in radii for a in angles]
    # High bits above the 52 used ones must not matter: set them in every other word.
    radius_words = [r | ((k % 2) << 60) for k, (r, _) in enumerate(pairs)]
    angle_words = [a | ((k % 2) << 55) for k, (_, a) in enumerate(pairs)]
    words = torch.tensor(radius_words + angle_words, dtype=torch.int64)
    out, deep = _kernel(words, words.numel())
    assert deep == 0
    half = len(pairs)
    for k, (m1, m2) in enumerate(pairs):
        r = math.sqrt(-2.0 * math.log((m1 + 0.5) * 2.0**-52))
        theta = 2.0 * math.pi * (m2 / 2.0**52)
        assert out[k].item() == pytest.approx(r * math.cos(theta), rel=1e-14, abs=1e-14)
        assert out[half + k].item() == pytest.approx(r * math.sin(theta), rel=1e-14, abs=1e-14)
    # The axis angles are exact: a zero of cos or sin is exactly 0, not a rounding residue.
    axis = {0: (1, 0), quarter: (0, 1), 2 * quarter: (-1, 0), 3 * quarter: (0, -1)}
    for k, (_, m2) in enumerate(pairs):
        if m2 in axis:
            c, s = axis[m2]
            assert (out[k].item() == 0) == (c == 0)
            assert (out[half + k].item() == 0) == (s == 0)


@needs_kernel
def test_a_radius_word_needing_a_deeper_uniform_is_reported() -> None:
    words = _words(10)
    words[3] = words[3] & ~MASK52  # low 52 bits 0: u1 would lie in [0, 2^-52)
    _, deep = _kernel(words, 10)
    assert deep == 1
    assert not _compiled_transform(words, torch.empty(10, dtype=torch.float64), 1.0)


@needs_kernel
def test_the_threads_split_the_work_not_the_values() -> None:
    words = _words(300_000, seed=5)
    one, _ = _kernel(words, 300_000, threads=1)
    two, _ = _kernel(words, 300_000, threads=2)
    assert torch.equal(one, two)


@needs_kernel
@pytest.mark.parametrize(
    ("scale", "threads"), [(-1.0, 1), (float("nan"), 1), (float("inf"), 1), (1.0, 0)]
)
def test_kernel_refuses_bad_arguments(scale: float, threads: int) -> None:
    words, out = _words(4), torch.empty(4, dtype=torch.float64)
    assert secure_random._TRANSFORM is not None
    with pytest.raises(ValueError):
        secure_random._TRANSFORM.transform(words.data_ptr(), out.data_ptr(), 4, scale, threads)


@needs_kernel
def test_secure_normals_come_from_the_kernel_and_fall_back_for_deep_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bool] = []
    original = secure_random._compiled_transform

    def recording(
        words: torch.Tensor, out: torch.Tensor, scale: float, threads: int | None = None
    ) -> bool:
        result = original(words, out, scale, threads)
        calls.append(result)
        return result

    monkeypatch.setattr(secure_random, "_compiled_transform", recording)
    rng = SecureRandom("os")
    draws = rng.normal(100_001, 2.0)
    assert calls == [True]
    assert draws.dtype == torch.float64 and bool(torch.isfinite(draws).all())
    assert abs(float(draws.std()) - 2.0) < 0.03  # 100k draws: the std's s.e. is 0.0045
    # Force the deep branch: every radius word's low 52 bits are 0.
    monkeypatch.setattr(
        rng, "_fill", lambda out, count: out.__setitem__(slice(0, count), bytes(count))
    )
    monkeypatch.setattr(rng, "words", lambda count: _words(count, seed=9))
    deep_draws = rng.normal(8)
    assert calls[-1] is False
    assert bool(torch.isfinite(deep_draws).all())
    # All words zero: radius uniforms drawn deeper, angles 0, so the cosines are large
    # (u1 below 2^-52: radius above 8.49) and the sines 0 up to torch's rounding of 2 pi.
    assert bool((deep_draws[:4] > 8.49).all())
    assert bool((deep_draws[4:].abs() < 1e-13).all())


# -- the one-pass release ----------------------------------------------------------------
def _reference_release(
    words: torch.Tensor, sums: torch.Tensor, std: float, scale: float, grid: float
) -> torch.Tensor:
    """The float64 torch path: noise, plus the scaled sums in float64, snapped, cast."""
    noise = normal_from_words_(words.clone(), None, scale=std)[: sums.numel()]
    return noise.add_(sums.double(), alpha=scale).round_().mul_(grid).float()


@needs_kernel
@pytest.mark.parametrize("count", [1, 6, 999, 70_001])
def test_release_kernel_equals_the_float64_torch_release(count: int) -> None:
    grid = 2.0**-31  # noise_grid of a std in (2^-8, 2^-7]
    std_units, scale = 0.006 / grid, 1.0 / (256 * grid)  # std and 1/divisor in grid units
    g = torch.Generator().manual_seed(count)
    sums = torch.randn(count, generator=g) * 0.3
    words = _words(2 * ((count + 1) // 2), seed=count + 1)
    expected = _reference_release(words, sums, std_units, scale, grid)
    released = sums.clone()
    assert secure_random._TRANSFORM is not None
    deep = secure_random._TRANSFORM.release(
        words.data_ptr(), released.data_ptr(), count, std_units, scale, grid, 2
    )
    assert deep == 0
    assert torch.equal(released, expected)
    assert torch.equal(released.double() / grid, (released.double() / grid).round())  # on grid


@needs_kernel
def test_release_kernel_writes_nothing_when_a_word_needs_depth() -> None:
    words, sums = _words(8), torch.randn(8)
    words[2] = words[2] & ~MASK52  # a radius word (the first half)
    kept = sums.clone()
    assert secure_random._TRANSFORM is not None
    deep = secure_random._TRANSFORM.release(
        words.data_ptr(), sums.data_ptr(), 8, 100.0, 1.0, 2.0**-20, 2
    )
    assert deep == 1 and torch.equal(sums, kept)


@needs_kernel
def test_snapped_release_takes_the_torch_path_for_deep_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = SecureRandom("os")
    monkeypatch.setattr(
        rng, "_fill", lambda out, count: out.__setitem__(slice(0, count), bytes(count))
    )
    monkeypatch.setattr(rng, "words", lambda count: _words(count, seed=3))
    sums = torch.randn(7, generator=torch.Generator().manual_seed(1))
    expected_noise = normal_from_words_(torch.zeros(8, dtype=torch.int64), rng.words, scale=50.0)
    expected = expected_noise[:7].add_(sums.double(), alpha=4.0).round_().mul_(2.0**-10).float()
    released = rng.snapped_release_(sums.clone(), 50.0, 4.0, 2.0**-10)
    assert torch.equal(released, expected)


def _replayed_stream(seed: int) -> Any:
    """A deterministic stand-in for ``SecureRandom._fill`` (tests only: not secure)."""
    g = torch.Generator().manual_seed(seed)

    def fill(self: SecureRandom, out: bytearray, count: int) -> None:
        out[:count] = (
            torch.randint(0, 256, (count,), dtype=torch.uint8, generator=g).numpy().tobytes()
        )

    return fill


@needs_kernel
def test_the_one_pass_release_gives_the_float64_paths_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same CSPRNG words (replayed) through both releases, over logical batches split
    # into physical ones (pending sums), with an odd number of coordinates.
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 20), torch.randint(0, 3, (96,)))
    fuses = dp_optimizer._fuses_secure_release
    released: dict[bool, list[torch.Tensor]] = {}
    for fused in (True, False):
        monkeypatch.setattr(
            dp_optimizer, "_fuses_secure_release", fuses if fused else (lambda *_: False)
        )
        monkeypatch.setattr(SecureRandom, "_fill", _replayed_stream(0))
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(20, 31), nn.ReLU(), nn.Linear(31, 3))  # 747 values
        engine = PrivacyEngine(secure_mode=True)
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=32),
            noise_multiplier=1.3,
            max_grad_norm=0.7,
        )
        grads = []
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=8, optimizer=optimizer
        ) as physical:
            for x, y in physical:
                optimizer.zero_grad()
                F.cross_entropy(module(x), y).backward()
                optimizer.step()
                if not optimizer.is_accumulating:
                    grads += [p.grad.clone() for p in module.parameters()]
        released[fused] = grads
    assert len(released[True]) >= 8  # at least two logical steps of 4 parameters
    # Same noise, same grid; the clipped sums are formed by different float32 products and
    # the pending ones added in float32 instead of float64, which can move a value by a few
    # grid steps (2^-24 of the noise std each): a reading of the sum, not of the noise.
    grid = noise_grid(1.3 * 0.7 / 32)
    for one_pass, float64_path in zip(released[True], released[False], strict=True):
        assert torch.equal(one_pass.double() / grid, (one_pass.double() / grid).round())
        torch.testing.assert_close(one_pass, float64_path, rtol=1e-5, atol=8 * grid)
