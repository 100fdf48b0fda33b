"""Gaussian noise: scale, dtype, determinism, and the threaded draw for large tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dptorch.noise import _PARALLEL_MIN_NUMEL, gaussian_noise


def _draw(numel: int, seed: int, std: float = 2.5) -> torch.Tensor:
    return gaussian_noise(
        torch.Size([numel]),
        std=std,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("numel", [1000, 4 * _PARALLEL_MIN_NUMEL + 3])
def test_noise_has_the_requested_scale_and_is_reproducible(numel: int) -> None:
    noise = _draw(numel, seed=7)
    torch.testing.assert_close(noise, _draw(numel, seed=7), rtol=0, atol=0)
    assert not torch.equal(noise, _draw(numel, seed=8))
    # Mean and std of n standard normals are off by about 1/sqrt(n); allow 5 of those.
    tolerance = 5 / math.sqrt(numel)
    assert abs(float(noise.double().mean()) / 2.5) < tolerance
    assert abs(float(noise.double().std()) / 2.5 - 1) < 2 * tolerance


def test_threaded_chunks_are_independent_streams() -> None:
    torch.set_num_threads(max(torch.get_num_threads(), 2))
    numel = 2 * _PARALLEL_MIN_NUMEL
    noise = _draw(numel, seed=3, std=1.0).double()
    first, second = noise.chunk(2)
    # Identical or shifted sub-streams would correlate; independent ones give ~N(0, 1/n).
    correlation = float((first * second).mean())
    assert abs(correlation) < 5 / math.sqrt(first.numel())
    assert not torch.equal(first[:100], second[:100])


def test_half_precision_parameters_get_float32_noise_and_zero_std_gives_zeros() -> None:
    noise = gaussian_noise(
        torch.Size([10]), std=1.0, dtype=torch.bfloat16, device=torch.device("cpu"), generator=None
    )
    assert noise.dtype == torch.float32
    zeros = gaussian_noise(
        torch.Size([3]), std=0.0, dtype=torch.float64, device=torch.device("cpu"), generator=None
    )
    assert zeros.dtype == torch.float64 and not zeros.any()
