"""Gaussian noise for the clipped sum.

Privacy: noise of standard deviation ``noise_multiplier * sensitivity`` is drawn once per
logical step for every released coordinate, in float32 or better (float64 parameters get
float64 noise), seeded by ``generator`` (the global torch generator when ``None``). float32
noise on the CPU comes from the compiled sampler of :mod:`dptorch.cpu_sampler` where it was
built (seeds drawn from ``generator``), else from torch; large CPU draws are split across
threads, each chunk with a seed drawn from ``generator``. Either way the noise is a
deterministic function of that generator's state (and of the thread count, which sets the
chunks).

Secure mode (``generator`` a :class:`~dptorch.secure_random.SecureRandom`): the noise comes
from a CSPRNG, in float64, and :func:`round_to_noise_grid_` rounds each released value
(clipped sum + noise) to a grid of spacing ``2^(ceil(log2 std) - 24)``, a defence against
floating-point attacks on the Gaussian mechanism (Mironov 2012; Jin et al., arXiv
2112.05307): those read the clipped sum from WHICH floats a noisy value can take, since a
float sampler reaches some low-order bit patterns near one mean and not near another.
After rounding, every output is a multiple of the grid spacing whatever the sum was, and
every multiple near it is reachable (the float64 sampler's gaps are ~2^-45 std, far finer
than the grid), so the fine structure carries no trace of the sum. See docs/hardening.md.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from dptorch.cpu_sampler import (
    kernel_has_openmp,
    kernel_normal_,
    kernel_normal_chunks_,
    uses_kernel,
)
from dptorch.errors import DPValueError
from dptorch.secure_random import SecureRandom

# Secure-mode grid: 2^-24 of the noise std (rounded up to a power of two), about float32's
# own resolution at values of the size of the noise, so rounding costs no useful precision.
GRID_BITS = 24


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Never draw noise in half precision: its rounding would distort the distribution."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gaussian_noise(
    shape: torch.Size,
    *,
    std: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | SecureRandom | None,
    out: Tensor | None = None,
) -> Tensor:
    """A ``shape`` tensor of independent ``N(0, std^2)`` draws.

    With a :class:`SecureRandom` generator the draws come from it, in float64 (whatever
    ``dtype``), are made on the CPU and copied to ``device``; round the released values to
    the grid afterwards (:func:`round_to_noise_grid_`, or :func:`snap_to_grid` for a release
    computed in grid units).

    Args:
        out: a buffer to draw into instead of a new tensor (reused across steps, it spares
            each step the first-touch cost of fresh memory): contiguous, on ``device``,
            with the draw's dtype (float64 in secure mode, :func:`noise_dtype` otherwise).
    """
    expected = torch.float64 if isinstance(generator, SecureRandom) else noise_dtype(dtype)
    if out is not None:
        _check_buffer(out, shape, expected, device)
    if isinstance(generator, SecureRandom):
        return _secure_noise(shape, std, device, generator, out)
    if out is None:
        out = torch.empty(shape, dtype=expected, device=device)
    elif out.shape != shape:
        out = out.view(shape)
    if std == 0:
        return out.zero_()
    workers = _parallel_workers(out)
    if uses_kernel(out):
        flat = out if out.dim() == 1 else out.view(-1)
        _kernel_normal_(flat, std, generator, workers)
        return out
    if workers < 2:
        return out.normal_(mean=0.0, std=std, generator=generator)
    return _parallel_normal_(out.view(-1), std, generator, workers).view(shape)


# Below this many coordinates one thread is fast enough; above it, CPU noise drawing is a
# visible part of a step (mt19937 is serial: ~3 ns per draw) and is split across threads.
_PARALLEL_MIN_NUMEL = 1 << 18
_pool: ThreadPoolExecutor | None = None


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dptorch-noise")
    return _pool


def _chunk_seeds(generator: torch.Generator | None, workers: int) -> list[int]:
    """63-bit seeds for ``workers`` chunks, drawn from ``generator`` (or the global one)."""
    return torch.randint(0, 2**63 - 1, (workers,), generator=generator, dtype=torch.int64).tolist()


def _kernel_normal_(
    flat: Tensor, std: float, generator: torch.Generator | None, workers: int
) -> Tensor:
    """Fill ``flat`` (float32, CPU) from the compiled kernel, one seed per chunk of ``workers``.

    The seeds come from ``generator``, so the result is a deterministic function of its state.
    """
    if workers == 1:
        return kernel_normal_(flat, std, _chunk_seeds(generator, 1)[0])
    chunks = flat.chunk(workers)
    seeds = _chunk_seeds(generator, len(chunks))
    if len(chunks) == 1:
        return kernel_normal_(flat, std, seeds[0])
    if kernel_has_openmp():
        # The kernel threads the chunks in torch's OpenMP runtime, whose threads are awake
        # after the backward pass; Python threads would compete with them for the cores.
        return kernel_normal_chunks_(flat, std, seeds)
    jobs = [
        _thread_pool().submit(kernel_normal_, chunk, std, seed)
        for chunk, seed in zip(chunks, seeds, strict=True)
    ]
    for job in jobs:
        job.result()
    return flat


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
    seeds = _chunk_seeds(generator, workers)
    chunks = flat.chunk(workers)
    jobs = [
        _thread_pool().submit(
            chunk.normal_, 0.0, std, generator=torch.Generator().manual_seed(seed)
        )
        for chunk, seed in zip(chunks, seeds, strict=False)
    ]
    for job in jobs:
        job.result()
    return flat


def noise_grid(std: float) -> float:
    """The secure-mode output grid for noise of ``std``: ``2^(ceil(log2 std) - GRID_BITS)``."""
    return 2.0 ** (math.ceil(math.log2(std)) - GRID_BITS)


def round_to_noise_grid_(
    released: Tensor, std: float, generator: torch.Generator | SecureRandom | None
) -> Tensor:
    """In secure mode, round ``released`` (sum + noise, float64) in place to :func:`noise_grid`.

    A no-op unless ``generator`` is a :class:`SecureRandom` and ``std > 0``.

    Privacy: rounding the noisy value is post-processing, so it never weakens the Gaussian
    mechanism; it removes the float-representation side channel (see the module docstring):
    outputs lie on a grid that does not depend on the clipped sum. Exact as long as
    ``|released| < 2^28 std`` (float64's own rounding stays below half a grid step), which
    holds whenever the clipped sum is within 2^28 noise stds.
    """
    if not isinstance(generator, SecureRandom) or std == 0:
        return released
    grid = noise_grid(std)
    # Dividing and multiplying by a power of two is exact; round() is round-half-to-even.
    return released.div_(grid).round_().mul_(grid)


def secure_grid(std: float, generator: torch.Generator | SecureRandom | None) -> float | None:
    """The output grid of a release with noise ``std``: :func:`noise_grid` in secure mode.

    ``None`` outside secure mode and when ``std`` is 0 (nothing to snap to).
    """
    if not isinstance(generator, SecureRandom) or std == 0:
        return None
    return noise_grid(std)


def snap_to_grid(
    released_units: Tensor, grid: float, dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """``grid * round(released_units)`` in ``dtype``; ``released_units`` is overwritten.

    ``out``: where to write the result when ``dtype`` is not ``released_units``'s own (a
    buffer reused across steps); by default a new tensor.

    The secure release computed in grid units (noise of std ``std / grid`` plus the sum
    divided by ``grid``, in float64), rounded to integers and scaled back: the same values
    as :func:`round_to_noise_grid_` on the release in ordinary units, in fewer passes.
    Multiplying by a power of two is exact; the cast to ``dtype`` is post-processing of a
    grid value, so it cannot reintroduce the side channel. (Scaled in float64 and then cast:
    a multiplication that reads float64 and writes float32 runs on torch's slower
    mixed-dtype path, 0.54 against 0.13 + 0.19 ms for 670k values on 2 threads.)
    """
    scaled = released_units.round_().mul_(grid)
    if scaled.dtype == dtype:
        return scaled
    if out is None:
        return scaled.to(dtype)
    _check_buffer(out, scaled.shape, dtype, scaled.device)
    return out.view(scaled.shape).copy_(scaled)


def _secure_noise(
    shape: torch.Size,
    std: float,
    device: torch.device,
    generator: SecureRandom,
    out: Tensor | None,
) -> Tensor:
    numel = math.prod(shape)
    if std == 0:
        return (
            out.zero_()
            if out is not None
            else torch.zeros(shape, dtype=torch.float64, device=device)
        )
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        # Drawn when needed: on the CPU a draw made ahead on another thread would compete
        # with the step for the same cores (measured: no faster, more memory).
        return generator.normal(numel, std, out=None if out is None else out.view(-1)).view(shape)
    # Off the CPU the next step's draw is made ahead, while the device computes.
    noise = generator.normal(numel, std, ahead=True).view(shape)
    return noise.to(device) if out is None else out.view(shape).copy_(noise)


def _check_buffer(out: Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    if (
        out.numel() != math.prod(shape)
        or out.dtype != dtype
        or out.device != torch.device(device)
        or not out.is_contiguous()
    ):
        raise DPValueError(
            f"out= must be a contiguous {dtype} tensor of {math.prod(shape)} elements on "
            f"{device}; got {tuple(out.shape)} {out.dtype} on {out.device}."
        )
