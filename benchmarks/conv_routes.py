"""Per-layer cost of each route to a conv layer's clipped sum, and the memory each holds.

Run: ``.venv/bin/python benchmarks/conv_routes.py``. Writes
``benchmarks/results/conv_routes.json`` and ``.md``.

For each layer (batch 256, 2 threads), the median over alternating blocks of the whole
per-layer work of a private step: the per-example weight gradients' squared norms and the
weighted sum ``sum_i c_i g_i`` accumulated into a buffer, by

* ``grouped``: instantiated by the grouped-convolution kernel (``DenseTerm``);
* ``unfold``: instantiated by patches and one batched matmul (``DenseTerm``);
* ``forward conv``: instantiated by one grouped forward convolution, for layers with one
  input channel per group only (``DenseTerm``; "-" elsewhere);
* ``ghost``: the ghost norm and the weighted-sum contraction on unfolded patches
  (``OuterTerm``), never instantiating ``g_i``;
* ``recomputed``: the norms from per-example gradients formed a slice of the batch at a
  time and freed, the weighted sum by one batched weight-gradient kernel
  (``RecomputedTerm``).

``held values / example`` is what the term keeps between the backward pass and the release
(instantiated: ``C_out C_in K``; ghost: the patches ``P C_in K`` plus the output gradient
``P C_out``; recomputed: the input and the output gradient); the dptorch column is the route
``conv_rule`` picks for the layer. Layers are
timed alone; whole-step effects are measured by ``interleaved.py`` and ``training.py``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conv_patches  # the benchmark models' conv layers
import training  # machine facts, thread count

from dptorch.per_sample.rules.conv import (
    _recomputed_weight_term,
    instantiation_for,
    per_sample_conv_weight_grads,
    per_sample_conv_weight_grads_by_forward_conv,
    per_sample_conv_weight_grads_by_unfold,
    unfold_patches,
    weight_term_form,
)
from dptorch.per_sample.terms import DenseTerm, OuterTerm

BATCH = 256
BLOCKS = 11
BLOCK_CALLS = 3

# conv_patches.py's layers (training.py's CNN and ResNet), then other small-image shapes
# (LeNet-, VGG- and ResNet-style layers on 4x4 to 16x16 outputs, 1x1 projections).
LAYERS: list[tuple[str, nn.Conv2d, tuple[int, ...]]] = [
    *conv_patches.LAYERS[:5],
    ("resnet 32->64 3x3 s2 on 16x16", nn.Conv2d(32, 64, 3, 2, padding=1), (32, 16, 16)),
    conv_patches.LAYERS[5],
    ("lenet 6->16 5x5 on 14x14", nn.Conv2d(6, 16, 5), (6, 14, 14)),
    ("16->32 3x3 on 7x7", nn.Conv2d(16, 32, 3, padding=1), (16, 7, 7)),
    ("32->64 3x3 on 7x7", nn.Conv2d(32, 64, 3, padding=1), (32, 7, 7)),
    ("64->128 3x3 on 4x4", nn.Conv2d(64, 128, 3, padding=1), (64, 4, 4)),
    ("32->32 5x5 s2 on 12x12", nn.Conv2d(32, 32, 5, 2), (32, 12, 12)),
    ("resnet skip 32->64 1x1 s2 on 16x16", nn.Conv2d(32, 64, 1, 2), (32, 16, 16)),
    ("64->128 1x1 on 8x8", nn.Conv2d(64, 128, 1), (64, 8, 8)),
    # One input channel per group: grey first layers and depthwise layers.
    ("lenet 1->6 5x5 on 28x28", nn.Conv2d(1, 6, 5), (1, 28, 28)),
    ("1->32 3x3 on 28x28", nn.Conv2d(1, 32, 3, padding=1), (1, 28, 28)),
    ("depthwise 32 3x3 on 16x16", nn.Conv2d(32, 32, 3, padding=1, groups=32), (32, 16, 16)),
    ("depthwise 64 3x3 on 8x8", nn.Conv2d(64, 64, 3, padding=1, groups=64), (64, 8, 8)),
]


def _routes(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> dict[str, Callable[[], None]]:
    factors = torch.rand(BATCH, generator=torch.Generator().manual_seed(1))
    out = torch.zeros_like(conv.weight)
    batch, positions = x.shape[0], math.prod(grad.shape[2:])

    def instantiated(grads_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            term = DenseTerm(conv.weight, grads_of())
            term.norm_sq()
            term.add_weighted_sum_(out, factors, alpha=1.0)

        return run

    groups = conv.groups

    def ghost() -> None:
        patches = unfold_patches(x, conv)
        cols = patches.reshape(batch, positions, groups, -1).transpose(1, 2)
        rows = grad.reshape(batch, groups, conv.out_channels // groups, positions).transpose(2, 3)
        term = OuterTerm(conv.weight, rows=rows, cols=cols)
        term.norm_sq("ghost")
        term.add_weighted_sum_(out, factors, alpha=1.0)

    def recomputed() -> None:
        term = _recomputed_weight_term(conv, x, grad)
        term.norm_sq()
        term.add_weighted_sum_(out, factors, alpha=1.0)

    routes = {
        "grouped": instantiated(lambda: per_sample_conv_weight_grads(x, grad, conv)),
        "unfold": instantiated(lambda: per_sample_conv_weight_grads_by_unfold(x, grad, conv)),
        "ghost": ghost,
        "recomputed": recomputed,
    }
    if conv.in_channels == conv.groups:
        routes["forward conv"] = instantiated(
            lambda: per_sample_conv_weight_grads_by_forward_conv(x, grad, conv)
        )
    return routes


def time_layer(conv: nn.Conv2d, shape: tuple[int, ...]) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=generator)
    with torch.no_grad():
        grad = torch.randn(conv(x).shape, generator=generator)
    positions = math.prod(grad.shape[2:])
    routes = _routes(conv, x, grad)
    samples: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(BLOCKS):
        for name, route in routes.items():
            route()
            calls = []
            for _ in range(BLOCK_CALLS):
                start = time.perf_counter()
                route()
                calls.append(time.perf_counter() - start)
            samples[name].append(statistics.median(calls))
    patch = conv.in_channels * math.prod(conv.kernel_size)
    form = weight_term_form(conv, x, grad, "auto")
    chosen = "ghost" if form == "ghost" else instantiation_for(conv, positions)
    if form == "recomputed":
        chosen += ", recomputed"
    return {
        "ms": {name: 1e3 * statistics.median(values) for name, values in samples.items()},
        "positions": positions,
        "held_instantiated": conv.weight.numel(),
        "held_ghost": positions * (patch + conv.out_channels),
        "held_recomputed": (x.numel() + grad.numel()) // BATCH,
        "dptorch": chosen,
    }


def main() -> None:
    torch.set_num_threads(training.THREADS)
    started = time.perf_counter()
    rows = [{"layer": name} | time_layer(conv, shape) for name, conv, shape in LAYERS]
    commit = training._git("rev-parse", "--short=10", "HEAD").strip()
    dirty = " (with uncommitted changes)" if training._git("status", "--porcelain").strip() else ""
    meta = {"commit": commit + dirty, "torch": torch.__version__, "cpu": training._cpu_name()}
    lines = [
        f"Conv clipped-sum routes, per layer (norms + weighted sum): commit {meta['commit']}, "
        f"torch {meta['torch']}, {meta['cpu']}, {training.THREADS} threads, batch {BATCH}; "
        f"median over {BLOCKS} alternating blocks of {BLOCK_CALLS} calls; "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "| layer | P | grouped ms | unfold ms | forward conv ms | ghost ms | recomputed ms "
        "| held / example: instantiated, ghost, recomputed | dptorch picks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms = row["ms"]
        assert isinstance(ms, dict)
        forward = f"{ms['forward conv']:.2f}" if "forward conv" in ms else "-"
        lines.append(
            f"| {row['layer']} | {row['positions']} | {ms['grouped']:.2f} | {ms['unfold']:.2f} "
            f"| {forward} | {ms['ghost']:.2f} | {ms['recomputed']:.2f} | {row['held_instantiated']}, "
            f"{row['held_ghost']}, {row['held_recomputed']} | {row['dptorch']} |"
        )
    out = Path(__file__).resolve().parent / "results"
    (out / "conv_routes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "conv_routes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
