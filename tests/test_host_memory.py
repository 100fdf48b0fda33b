"""retain_freed_memory: freed per-step buffers stay mapped, so reallocating them is cheap."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from dptorch import DPValueError, DPWarning, host_memory
from dptorch.host_memory import retain_freed_memory

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or host_memory._glibc_mallopt() is None,
    reason="needs glibc's mallopt",
)


_MEASURE = """
import resource, sys, torch
from dptorch.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
size = 64 * 2**20 // 4  # 64 MiB: above the 32 MiB where glibc always maps afresh
for _ in range(2):  # first touches, by any allocator
    buffer = torch.ones(size)
    del buffer
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    buffer = torch.ones(size)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_reallocating(mode: str) -> int:
    """Minor page faults while a 64 MiB buffer is allocated and freed 4 times, in a fresh
    process (the allocator's thresholds depend on the process's history)."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@glibc_only
def test_freed_buffers_are_reused_without_page_faults() -> None:
    pages = 64 * 2**20 // resource.getpagesize()
    # Measured in fresh processes: 65540 faults for the 4 rounds by default (glibc maps
    # blocks above 32 MiB afresh on every allocation), 16384 (one round) with retention.
    assert _faults_reallocating("default") > 3 * pages
    assert _faults_reallocating("retain") < 2 * pages


def test_without_glibc_it_warns_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: None)
    with pytest.warns(DPWarning, match="allocator is unchanged"):
        assert retain_freed_memory() is False


def test_refuses_a_non_positive_threshold() -> None:
    with pytest.raises(DPValueError, match="trim_threshold_bytes must be positive"):
        retain_freed_memory(0)
