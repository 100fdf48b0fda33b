"""The live-tensor peak that benchmarks/training.py publishes counts what a step holds at once."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tensor_memory import tensor_peak_growth_mb

MB = 2**20


def _prepare() -> Callable[[], None]:
    weights = torch.ones(8 * MB // 4)  # set-up: not counted
    kept: list[torch.Tensor] = []

    def step() -> None:
        a = torch.ones(4 * MB // 4)
        b = torch.ones(2 * MB // 4)  # a and b alive together: 6 MB
        del a, b
        c = torch.ones(3 * MB // 4)
        if not kept:
            kept.append(weights + 1)  # 8 MB kept across steps (like a buffer or state)
        del c

    return step


def test_peak_counts_live_tensors_of_the_steps_only() -> None:
    peak = tensor_peak_growth_mb(_prepare, steps=3)
    # Step 1 peaks at c + the kept copy (11 MB), later steps at the kept copy + a + b (14 MB);
    # the set-up's 8 MB would make it 22.
    assert 13.9 < peak < 14.5
