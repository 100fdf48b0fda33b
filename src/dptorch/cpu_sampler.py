"""The CPU's Gaussian sampler for DP noise: a compiled vectorised kernel, or torch's own.

A DP-SGD step draws one Gaussian value per trainable coordinate. torch's CPU generator
(mt19937) is serial, ~4 ns a draw here: on a small model that is a third of the step. The
kernel (``_gaussian_kernel.c``: side-by-side xoshiro256++ generators and a branch-free
Box-Muller transform) draws float32 noise about 3x faster on one thread, and in parallel across
threads like the torch path. It is built with the package (a C compiler is needed at install
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

import logging
from types import ModuleType

import torch
from torch import Tensor

from dptorch.errors import DPValueError

_logger = logging.getLogger(__name__)


def _load_kernel() -> ModuleType | None:
    try:
        from dptorch import _gaussian_kernel  # type: ignore[attr-defined]
    except ImportError as error:  # built without a compiler, or an unsupported platform
        _logger.info("dptorch's compiled Gaussian kernel is unavailable (%s); using torch's", error)
        return None
    return _gaussian_kernel


_KERNEL = _load_kernel()
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


def uses_kernel(out: Tensor) -> bool:
    """Whether noise for ``out`` comes from the kernel: float32 on the CPU, kernel chosen."""
    return _choice == "kernel" and out.device.type == "cpu" and out.dtype == torch.float32


def kernel_normal_(out: Tensor, std: float, seed: int) -> Tensor:
    """Fill the contiguous float32 CPU tensor ``out`` with ``N(0, std^2)`` draws from ``seed``.

    The values are a function of ``(seed, out.numel())`` alone. The GIL is released while
    drawing, so threads filling different chunks run in parallel.
    """
    if _KERNEL is None:
        raise DPValueError("kernel_normal_: the compiled kernel is not available (cpu_sampler()).")
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        raise DPValueError(
            f"kernel_normal_(out=...): needs a contiguous float32 CPU tensor; got {out.dtype} "
            f"on {out.device}, contiguous={out.is_contiguous()}."
        )
    if out.numel():
        _KERNEL.fill(out.data_ptr(), out.numel(), seed, float(std))
    return out
