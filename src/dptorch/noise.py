"""Gaussian noise for the clipped sum.

Privacy: noise of standard deviation ``noise_multiplier * sensitivity`` is drawn once per
logical step for every released coordinate, in float32 or better (float64 parameters get
float64 noise), from ``generator`` (the global torch generator when ``None``). Large CPU
draws are split across threads with sub-generators seeded from ``generator``; the noise is
still a deterministic function of that generator's state.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Never draw noise in half precision: its rounding would distort the distribution."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gaussian_noise(
    shape: torch.Size,
    *,
    std: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """A ``shape`` tensor of independent ``N(0, std^2)`` draws."""
    out = torch.empty(shape, dtype=noise_dtype(dtype), device=device)
    if std == 0:
        return out.zero_()
    workers = _parallel_workers(out)
    if workers < 2:
        return out.normal_(mean=0.0, std=std, generator=generator)
    return _parallel_normal_(out.view(-1), std, generator, workers).view(shape)


# Below this many coordinates one generator is fast enough; above it, CPU noise drawing is a
# visible part of a step (mt19937 is serial: ~3 ns per draw) and is split across threads.
_PARALLEL_MIN_NUMEL = 1 << 18
_pool: ThreadPoolExecutor | None = None


def _parallel_workers(out: Tensor) -> int:
    if out.device.type != "cpu" or out.numel() < _PARALLEL_MIN_NUMEL:
        return 1
    return min(torch.get_num_threads(), 8)


def _parallel_normal_(
    flat: Tensor, std: float, generator: torch.Generator | None, workers: int
) -> Tensor:
    """Fill ``flat`` with ``N(0, std^2)`` by ``workers`` threads, each with its own generator.

    The sub-generators are seeded with 63-bit seeds drawn from ``generator`` (or the global
    generator), so the result is a deterministic function of that generator's state, as with
    a single draw; torch releases the GIL inside ``normal_``, so the threads run in parallel.
    """
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dptorch-noise")
    seeds = torch.randint(0, 2**63 - 1, (workers,), generator=generator, dtype=torch.int64)
    chunks = flat.chunk(workers)
    jobs = [
        _pool.submit(chunk.normal_, 0.0, std, generator=torch.Generator().manual_seed(int(seed)))
        for chunk, seed in zip(chunks, seeds.tolist(), strict=False)
    ]
    for job in jobs:
        job.result()
    return flat
