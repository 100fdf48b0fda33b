"""Per-layer cost of the ways to get a conv layer's per-example weight gradients.

Run: ``.venv/bin/python benchmarks/conv_patches.py``. Writes
``benchmarks/results/conv_patches.json`` and ``.md``.

For each conv layer of the benchmark CNN and ResNet (batch 256, 2 threads), the median of
alternating blocks of: the patch matrix by ``F.unfold`` and by dptorch's
``channel_major_patches`` (one strided copy of the input's windows), and the per-example
weight gradients by the grouped-convolution kernel and by patches + one batched matmul
(``per_sample_conv_weight_grads_by_unfold``). Layers are timed alone, so page faults and
cache state differ from a training step; whole-step effects are measured by
``interleaved.py``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # machine facts, thread count

from dptorch.per_sample.rules.conv import (
    channel_major_patches,
    per_sample_conv_weight_grads,
    per_sample_conv_weight_grads_by_unfold,
)

BATCH = 256
BLOCKS = 15
BLOCK_CALLS = 5

# (name, layer, input shape without the batch): the conv layers of training.py's CNN and ResNet.
LAYERS: list[tuple[str, nn.Conv2d, tuple[int, ...]]] = [
    ("cnn 1->16 8x8 s2 on 28x28", nn.Conv2d(1, 16, 8, 2, padding=3), (1, 28, 28)),
    ("cnn 16->32 4x4 s2 on 13x13", nn.Conv2d(16, 32, 4, 2), (16, 13, 13)),
    ("resnet stem 3->16 3x3 on 32x32", nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32)),
    ("resnet 16->16 3x3 on 32x32", nn.Conv2d(16, 16, 3, padding=1), (16, 32, 32)),
    ("resnet 32->32 3x3 on 16x16", nn.Conv2d(32, 32, 3, padding=1), (32, 16, 16)),
    ("resnet 64->64 3x3 on 8x8", nn.Conv2d(64, 64, 3, padding=1), (64, 8, 8)),
]


def _unfold(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    return F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)


def time_layer(conv: nn.Conv2d, shape: tuple[int, ...]) -> dict[str, float]:
    """Median ms of each way for one layer on a fixed random input and output gradient."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=generator)
    with torch.no_grad():
        grad = torch.randn(conv(x).shape, generator=generator)
    ways: dict[str, Callable[[], Any]] = {
        "F.unfold": lambda: _unfold(x, conv),
        "channel_major_patches": lambda: channel_major_patches(x, conv),
        "grouped kernel": lambda: per_sample_conv_weight_grads(x, grad, conv),
        "patches + matmul": lambda: per_sample_conv_weight_grads_by_unfold(x, grad, conv),
    }
    assert torch.equal(ways["F.unfold"](), ways["channel_major_patches"]())
    medians: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(BLOCKS):
        for name, way in ways.items():
            way()
            calls = []
            for _ in range(BLOCK_CALLS):
                start = time.perf_counter()
                way()
                calls.append(time.perf_counter() - start)
            medians[name].append(statistics.median(calls))
    return {name: 1e3 * statistics.median(values) for name, values in medians.items()}


def main() -> None:
    torch.set_num_threads(training.THREADS)
    started = time.perf_counter()
    rows = [{"layer": name, "ms": time_layer(conv, shape)} for name, conv, shape in LAYERS]
    commit = training._git("rev-parse", "--short=10", "HEAD").strip()
    dirty = " (with uncommitted changes)" if training._git("status", "--porcelain").strip() else ""
    meta = {"commit": commit + dirty, "torch": torch.__version__, "cpu": training._cpu_name()}
    ways = list(rows[0]["ms"])
    lines = [
        f"Conv per-example weight gradients, per layer: commit {meta['commit']}, torch "
        f"{meta['torch']}, {meta['cpu']}, {training.THREADS} threads, batch {BATCH}; median "
        f"over {BLOCKS} alternating blocks of {BLOCK_CALLS} calls; "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "| layer | " + " ms | ".join(ways) + " ms |",
        "|---" * (len(ways) + 1) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layer']} | " + " | ".join(f"{row['ms'][w]:.2f}" for w in ways) + " |"
        )
    out = Path(__file__).resolve().parent / "results"
    (out / "conv_patches.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    (out / "conv_patches.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
