"""dptorch's fixed per-step cost: a private step of a model so small that its arithmetic is free.

Run: ``.venv/bin/python benchmarks/fixed_overhead.py`` (``--blocks N``; under a minute).
Writes ``benchmarks/results/fixed_overhead.json`` and ``.md``.

The benchmark MLP's private step is within a few tenths of a millisecond of its hand-written
floor (``mlp_floor.py``); what separates them is Python: hooks, rules, checks, per-parameter
bookkeeping, accounting. That cost hardly depends on the tensors' sizes, so it is measured
here on a model of the MLP's shape (``Linear``-ReLU-``Linear``-ReLU-``Linear``) with layers of
width 8 and batches of 8, where every operator takes a few microseconds: plain PyTorch and
dptorch's default route alternate in blocks in one process, on one thread, and each phase
(forward with loss, backward, ``optimizer.step()``) is reported as dptorch's median minus
plain's, in microseconds. The sum of the three is what each layer-call hook, rule and
parameter costs a real model per step on top of its arithmetic and its noise.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # run_meta and the results folder

import dptorch

PHASES = ("forward", "backward", "step")
BLOCK_STEPS = 50
BATCH, WIDTH, CLASSES = 8, 8, 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2 * WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )


def _set_up(private: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if private:
        data = torch.utils.data.TensorDataset(
            torch.randn(100 * BATCH, 2 * WIDTH), torch.randint(0, CLASSES, (100 * BATCH,))
        )
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
        model, optimizer, _ = dptorch.PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    return model, optimizer


def _timed_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Callable[[dict[str, list[float]]], None]:
    criterion = nn.CrossEntropyLoss()

    def step(into: dict[str, list[float]]) -> None:
        optimizer.zero_grad()
        t0 = time.perf_counter()
        loss = criterion(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        for phase, start, end in zip(PHASES, (t0, t1, t2), (t1, t2, t3), strict=True):
            into[phase].append((end - start) * 1e6)

    return step


def measure(blocks: int) -> dict[str, object]:
    torch.set_num_threads(1)  # Python overhead does not thread; one thread is less noisy
    warnings.simplefilter("ignore")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 2 * WIDTH, generator=generator)
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    steps = {mode: _timed_step(*_set_up(mode == "dptorch"), x, y) for mode in ("plain", "dptorch")}
    times = {mode: {phase: [] for phase in PHASES} for mode in steps}
    warm_up = {phase: [] for phase in PHASES}
    for step in steps.values():
        for _ in range(BLOCK_STEPS):
            step(warm_up)
    for _ in range(blocks):
        for mode, step in steps.items():
            for _ in range(BLOCK_STEPS):
                step(times[mode])
    median_us = {
        mode: {phase: _median(values) for phase, values in phases.items()}
        for mode, phases in times.items()
    }
    extra_us = {p: median_us["dptorch"][p] - median_us["plain"][p] for p in PHASES}
    return {
        "blocks": blocks,
        "block_steps": BLOCK_STEPS,
        "median_us": median_us,
        "extra_us": extra_us,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def write(result: dict[str, object], total_s: float) -> None:
    meta = training.run_meta(total_s)
    median_us, extra_us = result["median_us"], result["extra_us"]
    assert isinstance(median_us, dict) and isinstance(extra_us, dict)
    lines = [
        training.results_heading("Fixed per-step overhead", meta, threads=1),
        "",
        "Command: `.venv/bin/python benchmarks/fixed_overhead.py`. A 3-layer MLP of width "
        f"{WIDTH}, batch {BATCH}; plain and dptorch alternate in blocks of {BLOCK_STEPS} "
        f"steps, {result['blocks']} blocks each. Medians in microseconds.",
        "",
        "| phase | plain us | dptorch us | dptorch - plain us |",
        "|---|---|---|---|",
    ]
    for phase in PHASES:
        lines.append(
            f"| {phase} | {median_us['plain'][phase]:.0f} | {median_us['dptorch'][phase]:.0f} "
            f"| {extra_us[phase]:.0f} |"
        )
    lines.append(f"| total | | | {sum(extra_us.values()):.0f} |")
    training.save_results("fixed_overhead", {"meta": meta, **result}, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", type=int, default=60, help="blocks per mode")
    args = parser.parse_args()
    started = time.perf_counter()
    result = measure(args.blocks)
    write(result, time.perf_counter() - started)


if __name__ == "__main__":
    main()
