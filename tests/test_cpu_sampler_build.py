"""The compiled sampler's build: these tests are never skipped.

tests/test_cpu_sampler.py skips itself where the kernel is missing, so an install whose
optional build failed would pass it while its noise silently came from the slower sampler;
here that failure shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dptorch import cpu_sampler
from dptorch.cpu_sampler import kernel_has_openmp

LINUX = sys.platform.startswith("linux")


def test_the_kernel_was_built() -> None:
    assert cpu_sampler._KERNEL is not None, (
        "dptorch._gaussian_kernel did not build or load; reinstall with a C compiler "
        "(pip install -e .) and read the build log"
    )


@pytest.mark.skipif(not LINUX, reason="the kernel is built with OpenMP on Linux only")
def test_the_kernel_threads_with_openmp_on_linux() -> None:
    assert kernel_has_openmp(), (
        "the kernel was built without OpenMP (setup.py retries without -fopenmp when the "
        "compiler refuses it): its chunks are then drawn by Python threads, about 2x slower "
        "on 2 cores; install gcc's libgomp and reinstall"
    )


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_one_openmp_runtime_is_loaded_the_kernel_shares_torchs() -> None:
    # Two libgomp copies would mean two thread pools competing for the same cores. The
    # kernel links libgomp.so.1, torch's soname, so the loader must give it torch's copy.
    torch.ones(1 << 16).sum()  # torch's runtime is in use
    cpu_sampler.kernel_normal_chunks_(torch.empty(1 << 16), 1.0, [1, 2])
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line}
    assert len(runtimes) <= 1, f"several OpenMP runtimes are loaded: {sorted(runtimes)}"
