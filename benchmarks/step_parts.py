"""Where a private step's time goes, part by part, beside the plain step's phases.

Run: ``.venv/bin/python benchmarks/step_parts.py`` (``--models mlp,transformer``, ``--steps
N``; about a minute for the MLP on two CPU cores). Writes ``benchmarks/results/
step_parts.json`` and ``.md``.

For each model (``training.py``'s models, batches and 2 threads), one process holds a plain
model, dptorch's default route and dptorch in secure mode, and runs their steps in turn.
Each step is timed by phase (``zero_grad``, forward with the loss, ``backward``,
``optimizer.step``); inside the private ``optimizer.step`` the parts are timed by wrapping
them: ``engine.clip`` (norms, checks, factors), the noise draw (``gaussian_noise``; in
secure mode on the CPU, ``SecureRandom.snapped_release_``, which draws, adds the sums and
snaps in one pass), the release (noise draw plus the clipped sums accumulated into it) and
the wrapped optimizer's update. The capture's forward hook is timed per call. Wrapping adds a
few microseconds per part; the medians are over steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # the benchmark models

import dptorch
from dptorch.optimizers import dp_optimizer
from dptorch.secure_random import SecureRandom

MODES = ("plain", "dptorch-auto", "dptorch-secure")
PHASES = ("zero_grad", "forward", "backward", "step")


def _timed(label: str, into: dict[str, list[float]], f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            into[label].append(time.perf_counter() - start)

    return run


class _Setup:
    """One mode of one model, with the private step's parts wrapped for timing."""

    def __init__(self, model_name: str, mode: str) -> None:
        torch.manual_seed(0)
        spec = training.MODELS[model_name]
        self.x, self.y = spec.batch(torch.Generator().manual_seed(0))
        model = spec.build()
        self.criterion = spec.criterion()
        self.parts: dict[str, list[float]] = defaultdict(list)
        optimizer: torch.optim.Optimizer
        if mode == "plain":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        else:
            model, _ = training._dp_layers(model)
            loader = torch.utils.data.DataLoader(
                training.FixedSizeDataset(self.x, self.y, training.DATASET_SIZE),
                batch_size=len(self.x),
            )
            engine = dptorch.PrivacyEngine(secure_mode=mode == "dptorch-secure")
            model, optimizer, _ = engine.make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                data_loader=loader,
                noise_multiplier=training.NOISE_MULTIPLIER,
                max_grad_norm=training.MAX_GRAD_NORM,
            )
            assert isinstance(optimizer, dp_optimizer.DPOptimizer)
            parts = self.parts
            optimizer.engine.clip = _timed("clip", parts, optimizer.engine.clip)  # type: ignore[method-assign]
            optimizer._release_noisy_gradients = _timed(  # type: ignore[method-assign]
                "release (noise + sums)", parts, optimizer._release_noisy_gradients
            )
            inner = optimizer.original_optimizer
            inner.step = _timed("wrapped optimizer's update", parts, inner.step)  # type: ignore[method-assign]
            capture = optimizer.engine.capture
            capture._on_forward = _timed("capture hook, per call", parts, capture._on_forward)  # type: ignore[method-assign]
        self.model, self.optimizer = model, optimizer

    def step(self, phases: dict[str, list[float]]) -> None:
        t0 = time.perf_counter()
        self.optimizer.zero_grad()
        t1 = time.perf_counter()
        loss = self.criterion(self.model(self.x), self.y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.optimizer.step()
        t4 = time.perf_counter()
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[name].append(seconds)


def measure(model_name: str, steps: int) -> dict[str, Any]:
    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    setups = {mode: _Setup(model_name, mode) for mode in MODES}
    noise_times: dict[str, list[float]] = defaultdict(list)
    one_pass_times: dict[str, list[float]] = defaultdict(list)
    draw = dp_optimizer.gaussian_noise
    one_pass = SecureRandom.snapped_release_
    phases: dict[str, dict[str, list[float]]] = {mode: defaultdict(list) for mode in MODES}
    try:
        for i in range(steps + 3):
            for mode, setup in setups.items():
                # The noise draw is a module-level function: wrapped for this mode's step only;
                # secure mode's one-pass release (draw, add, snap) replaces it on the CPU.
                dp_optimizer.gaussian_noise = _timed(mode, noise_times, draw)  # type: ignore[assignment]
                SecureRandom.snapped_release_ = _timed(mode, one_pass_times, one_pass)  # type: ignore[method-assign]
                setup.step(phases[mode] if i >= 3 else defaultdict(list))
                if i < 3:
                    setup.parts.clear()
                    noise_times.pop(mode, None)
                    one_pass_times.pop(mode, None)
    finally:
        dp_optimizer.gaussian_noise = draw
        SecureRandom.snapped_release_ = one_pass  # type: ignore[method-assign]
    result: dict[str, Any] = {"model": model_name, "steps": steps, "modes": {}}
    for mode, setup in setups.items():
        parts = {name: statistics.median(t) * 1e3 for name, t in setup.parts.items()}
        if mode in noise_times:
            parts["noise draw"] = statistics.median(noise_times[mode]) * 1e3
        if mode in one_pass_times:
            parts["secure one-pass draw + snap"] = statistics.median(one_pass_times[mode]) * 1e3
        result["modes"][mode] = {
            "phases_ms": {n: statistics.median(t) * 1e3 for n, t in phases[mode].items()},
            "parts_ms": parts,
        }
    return result


def write(results: list[dict[str, Any]], total_s: float) -> None:
    meta = training.run_meta(total_s)
    commit, dirty = meta["commit"], meta["uncommitted_changes"]
    lines = [
        f"# Step parts: commit {commit[:10]}{' (uncommitted changes)' if dirty else ''}, "
        f"torch {meta['torch']}, {meta['cpu']}, 2 threads, {total_s / 60:.1f} min",
        "",
        "Command: `.venv/bin/python benchmarks/step_parts.py`. Medians over steps, ms; the "
        "modes' steps alternate in one process.",
    ]
    for r in results:
        modes = r["modes"]
        lines += ["", f"## {r['model']} ({r['steps']} steps)", ""]
        lines += ["| phase | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
        for phase in PHASES:
            cells = [f"{modes[m]['phases_ms'][phase]:.2f}" for m in MODES]
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        totals = [f"{sum(modes[m]['phases_ms'].values()):.2f}" for m in MODES]
        lines.append("| total | " + " | ".join(totals) + " |")
        private = MODES[1:]
        names = sorted({n for m in private for n in modes[m]["parts_ms"]})
        lines += ["", "| inside the private step | " + " | ".join(private) + " |"]
        lines.append("|---|" + "---|" * len(private))
        for name in names:
            cells = [_ms(modes[m]["parts_ms"].get(name)) for m in private]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    training.RESULTS.mkdir(exist_ok=True)
    (training.RESULTS / "step_parts.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    (training.RESULTS / "step_parts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # "-": the mode has no such part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="mlp")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    args = parser.parse_args()
    started = time.perf_counter()
    results = [measure(m, args.steps) for m in args.models.split(",")]
    write(results, time.perf_counter() - started)


if __name__ == "__main__":
    main()
