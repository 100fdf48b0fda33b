"""Every build of the compiled kernels that the loader can pick gives the same bits.

Both C files are compiled with ``target_clones``: one copy for AVX-512 (x86-64-v4), one for
AVX2 (v3) and the baseline, and the loader runs the widest the CPU has. Their contracts say
the values are a function of the inputs alone (noise reproducible from a generator's state,
checkpoints that resume exactly, secure mode's grid), which holds only if every copy computes
the same bits. Here each file is compiled once per instruction set, without the clones and
with setup.py's flags, and each build's values are compared with the installed module's.
Skipped where no such build can run: not Linux on x86-64, no gcc, no source tree (an
installed wheel), or a CPU without the instruction set.
"""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dptorch import cpu_sampler, secure_random

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernel_builds import LEVELS, SETUP, build_for_level, cpu_runs

pytestmark = pytest.mark.skipif(
    not (
        sys.platform.startswith("linux")
        and platform.machine() == "x86_64"
        and shutil.which("gcc")
        and SETUP.exists()
    ),
    reason="needs Linux on x86-64, gcc and the source tree",
)


def _build(name: str, level: str, into: Path) -> ModuleType:
    if not cpu_runs(level):
        pytest.skip(f"this CPU cannot run {level} code")
    return build_for_level(name, level, into)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_gaussian_kernel_builds_give_the_installed_bits(level: str, tmp_path: Path) -> None:
    installed = cpu_sampler._KERNEL
    assert installed is not None, "test_cpu_sampler_build.py reports the missing kernel"
    built = _build("_gaussian_kernel", level, tmp_path)
    for n in (1, 33, 4099, 1 << 18):
        for seed in (0, 12345, 2**64 - 1):
            expected, drawn = torch.empty(n), torch.empty(n)
            installed.fill(expected.data_ptr(), n, seed, 2.5)
            built.fill(drawn.data_ptr(), n, seed, 2.5)
            assert torch.equal(drawn, expected), (level, n, seed)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_secure_transform_builds_give_the_installed_bits(level: str, tmp_path: Path) -> None:
    installed = secure_random._TRANSFORM
    assert installed is not None, "test_secure_gaussian.py reports the missing transform"
    built = _build("_secure_gaussian", level, tmp_path)
    generator = torch.Generator().manual_seed(3)
    for count in (1, 7, 4096, 100_001):
        pairs = -(-count // 2)
        words = torch.randint(-(2**63), 2**63 - 1, (2 * pairs,), generator=generator)
        expected = torch.empty(count, dtype=torch.float64)
        drawn = torch.empty(count, dtype=torch.float64)
        assert installed.transform(words.data_ptr(), expected.data_ptr(), count, 1.5, 1) == (
            built.transform(words.data_ptr(), drawn.data_ptr(), count, 1.5, 1)
        )
        assert torch.equal(drawn, expected), (level, count)
        sums = torch.randn(count, generator=generator)
        released = sums.clone()
        installed.release(words.data_ptr(), sums.data_ptr(), count, 1.0, 0.5, 2.0**-20, 1)
        built.release(words.data_ptr(), released.data_ptr(), count, 1.0, 0.5, 2.0**-20, 1)
        assert torch.equal(released, sums), (level, count)
