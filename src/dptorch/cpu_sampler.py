"""The CPU's Gaussian sampler for DP noise: a compiled vectorised kernel, or torch's own.

A DP-SGD step draws one Gaussian value per trainable coordinate. torch's CPU generator
(mt19937) is serial, ~4 ns a draw here: on a small model that is a third of the step. The
kernel (``_gaussian_kernel.c``: side-by-side xoshiro256++ generators and a branch-free
Box-Muller transform) draws float32 noise about 3x faster on one thread with AVX2 and about 5x
with AVX-512 (670k values: 0.46 against 2.5 ms on this project's Zen 4 CPU; the loader picks
the widest build the CPU runs, all with the same bits). Large draws are split
into one chunk per thread, each with its own seed; on Linux the kernel is built with OpenMP and
threads the chunks itself, in torch's OpenMP runtime (see ``fill_chunks`` in the C file),
elsewhere Python threads do. It is built with the package (a C compiler is needed at install
time); where it is missing, torch's sampler is used and :func:`cpu_sampler` says ``"torch"``.

Both samplers are seeded from the caller's ``torch.Generator`` (or the global one), so noise is
a deterministic function of that generator's state either way, and checkpoints that save the
generator resume exactly. They give different values for the same state, the same
distribution.

Privacy: both give independent ``N(0, std^2)`` draws to float32 accuracy (the kernel's tail
reaches 6.66 std, torch's 5.77); neither is a cryptographic generator. Secure mode
(:mod:`dptorch.secure_random`) never uses this module.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from dptorch._extensions import load_optional_extension
from dptorch.errors import DPValueError

_KERNEL = load_optional_extension("_gaussian_kernel", "compiled Gaussian kernel", "torch's sampler")
SAMPLERS = ("kernel", "torch")
_choice = "kernel" if _KERNEL is not None else "torch"


def cpu_sampler() -> str:
    """The sampler float32 CPU noise comes from now: ``"kernel"`` or ``"torch"``."""
    return _choice


def kernel_available() -> bool:
    """Whether the compiled kernel was built and loaded."""
    return _KERNEL is not None


def set_cpu_sampler(name: str) -> None:
    """Choose the sampler for float32 CPU noise (``"kernel"``, the default where built, or
    ``"torch"``, for example to reproduce noise drawn by an earlier version).

    Raises:
        DPValueError: ``name`` is not a sampler, or is ``"kernel"`` where it was not built.
    """
    global _choice
    if name not in SAMPLERS:
        raise DPValueError(f"set_cpu_sampler(name={name!r}): choose one of {SAMPLERS}.")
    if name == "kernel" and _KERNEL is None:
        raise DPValueError(
            "set_cpu_sampler(name='kernel'): the compiled kernel was not built with this "
            "installation (no C compiler at install time?); reinstall dptorch with gcc or "
            "clang available, or keep 'torch'."
        )
    _choice = name


def kernel_has_openmp() -> bool:
    """Whether the kernel draws the chunks of :func:`kernel_normal_chunks_` in parallel itself
    (built with OpenMP, in torch's runtime: Linux); otherwise callers thread them."""
    return _KERNEL is not None and bool(_KERNEL.openmp)


def uses_kernel(out: Tensor) -> bool:
    """Whether noise for ``out`` comes from the kernel: float32 on the CPU, kernel chosen."""
    return _choice == "kernel" and out.device.type == "cpu" and out.dtype == torch.float32


def kernel_normal_(out: Tensor, std: float, seed: int) -> Tensor:
    """Fill the contiguous float32 CPU tensor ``out`` with ``N(0, std^2)`` draws from ``seed``.

    The values are a function of ``(seed, out.numel())`` alone. The GIL is released while
    drawing, so threads filling different chunks run in parallel.
    """
    kernel = _kernel_for(out, "kernel_normal_")
    if out.numel():
        kernel.fill(out.data_ptr(), out.numel(), seed, float(std))
    return out


def kernel_normal_chunks_(out: Tensor, std: float, seeds: list[int]) -> Tensor:
    """:func:`kernel_normal_` on each chunk of ``out.chunk(len(seeds))`` with its own seed, in
    one call: one OpenMP thread per chunk where :func:`kernel_has_openmp`, else one by one.

    The values equal ``torch.cat([kernel_normal_(c, std, s) for c, s in zip(out.chunk(k),
    seeds)])``; ``len(seeds)`` must be the number of chunks ``out.chunk`` makes.
    """
    kernel = _kernel_for(out, "kernel_normal_chunks_")
    if not seeds:
        raise DPValueError("kernel_normal_chunks_(seeds=[]): pass one seed per chunk.")
    if not out.numel():
        return out
    chunk = -(-out.numel() // len(seeds))  # out.chunk's size: ceil(n / k)
    if -(-out.numel() // chunk) != len(seeds):
        raise DPValueError(
            f"kernel_normal_chunks_: {len(seeds)} seeds for {out.numel()} values, which "
            f"out.chunk({len(seeds)}) splits into {-(-out.numel() // chunk)} chunks; pass one "
            "seed per chunk."
        )
    kernel.fill_chunks(out.data_ptr(), out.numel(), chunk, seeds, float(std))
    return out


def _kernel_for(out: Tensor, caller: str) -> ModuleType:
    """The kernel, once ``out`` is checked to be a buffer it can fill."""
    if _KERNEL is None:
        raise DPValueError(f"{caller}: the compiled kernel is not available (cpu_sampler()).")
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        raise DPValueError(
            f"{caller}(out=...): needs a contiguous float32 CPU tensor; got {out.dtype} "
            f"on {out.device}, contiguous={out.is_contiguous()}."
        )
    return _KERNEL
