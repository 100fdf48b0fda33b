"""Step-time ratios measured side by side: several modes of one model timed alternately.

Run: ``.venv/bin/python benchmarks/interleaved.py`` (``--models mlp,cnn`` for a subset,
``--blocks N``, ``--modes plain,dptorch-auto,...``). Writes
``benchmarks/results/interleaved.json`` and ``.md``.

``benchmarks/training.py`` times every (model, mode) in its own fresh process, minutes apart;
on this shared machine the load changes in between, and repeated runs of one configuration
moved by 10-25%. Here all modes of one model live in one process and run in alternating
blocks of a few steps, so each block of a mode is compared with the reference block just
before it, on the same machine state. A mode's ratio is the median over blocks of
``mode block median / reference block median``. Each model still gets a fresh process, with
the models, batches, noise multiplier and 2 threads of ``training.py``. Memory is not
measured here (the modes share one process); ``training.py`` measures it.

``secure_overhead.py`` is this benchmark with the modes ``dptorch-auto`` (the reference) and
``dptorch-secure``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # the benchmark models and their step functions

RESULT_TAG = "RESULT "
BLOCK_STEPS = 5
STEP_BUDGET_S = 60.0  # per model and mode, beyond the minimum number of blocks
MIN_BLOCKS = 4
DEFAULT_MODES = ("plain", "dptorch-auto", "opacus-hooks", "opacus-ghost")


def _median_block(step: Callable[[], Any]) -> tuple[float, list[float]]:
    steps = training._timed_steps(step, BLOCK_STEPS, budget_s=float("inf"))
    return statistics.median(steps), steps


def run_worker(
    model: str, modes: list[str], blocks: int, retain_memory: bool = False
) -> dict[str, Any]:
    """Time ``modes`` of ``model`` in alternating blocks; ``modes[0]`` is the reference."""
    if retain_memory:  # for every mode alike, plain included
        from dptorch.host_memory import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    steps: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    for mode in modes:
        if mode.startswith("opacus-") and training._opacus_available() is None:
            errors[mode] = "opacus not installed"
            continue
        steps[mode] = training._prepare(model, mode)[0]
    for step in [*steps.values(), *steps.values()]:  # warm-up: two steps of each
        step()
    per_round = sum(training._timed_steps(step, 1, budget_s=0)[0] for step in steps.values())
    blocks = max(MIN_BLOCKS, min(blocks, int(STEP_BUDGET_S / (per_round * BLOCK_STEPS))))
    reference = modes[0]
    return {"model": model, **alternate(steps, blocks, reference), "errors": errors}


def alternate(steps: dict[str, Callable[[], Any]], blocks: int, reference: str) -> dict[str, Any]:
    """Time ``steps`` in turn, a block of ``BLOCK_STEPS`` each, ``blocks`` rounds.

    Returns each step's median time and the median over rounds of its block median divided
    by ``reference``'s block median of the same round.
    """
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    ratios: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(blocks):
        medians = {}
        for mode, step in steps.items():
            medians[mode], block = _median_block(step)
            times[mode] += block
        for mode in steps:
            ratios[mode].append(medians[mode] / medians[reference])
    return {
        "reference": reference,
        "blocks": blocks,
        "block_steps": BLOCK_STEPS,
        "median_ms": {mode: statistics.median(t) * 1e3 for mode, t in times.items()},
        "median_block_ratio": {mode: statistics.median(r) for mode, r in ratios.items()},
        "block_ratios": ratios,
    }


def warm_and_alternate(
    model: str, steps: dict[str, Callable[[], Any]], blocks: int, reference: str = "plain"
) -> dict[str, Any]:
    """Two warm-up steps of each, then :func:`alternate`; the result names ``model``."""
    for step in [*steps.values(), *steps.values()]:
        step()
    return {"model": model, **alternate(steps, blocks, reference)}


def alternate_table(result: dict[str, Any], digits: int = 2) -> list[str]:
    """Markdown rows of an :func:`alternate` result: each step's median and its ratio."""
    ms, ratio = result["median_ms"], result["median_block_ratio"]
    lines = ["| step | median ms | ms / plain (median over blocks) |", "|---|---|---|"]
    return lines + [f"| {mode} | {ms[mode]:.{digits}f} | {ratio[mode]:.2f}x |" for mode in ms]


def run_models(
    models: list[str], modes: list[str], blocks: int, retain_memory: bool = False
) -> list[dict[str, Any]]:
    """One fresh worker process per model; prints a line per model as it finishes."""
    extra = ["--modes", ",".join(modes), "--blocks", str(blocks)]
    extra += ["--retain-freed-memory"] if retain_memory else []
    return run_worker_processes(__file__, models, extra)


def run_worker_processes(
    script: str, models: list[str], extra: list[str], digits: int = 2
) -> list[dict[str, Any]]:
    """Run ``script --worker MODEL *extra`` in a fresh process per model and collect the
    result each prints after ``RESULT_TAG`` (a failed worker gives ``{"error": ...}``);
    prints each model's ratios as it finishes."""
    results = []
    for model in models:
        command = [sys.executable, script, "--worker", model, *extra]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
        if not lines:
            results.append({"model": model, "error": done.stderr.strip().splitlines()[-1:]})
            print(f"{model:12s} failed: {results[-1]['error']}", flush=True)
            continue
        result = json.loads(lines[-1][len(RESULT_TAG) :])
        ratios = ", ".join(f"{m} {r:.{digits}f}x" for m, r in result["median_block_ratio"].items())
        print(f"{model:12s} {ratios}", flush=True)
        results.append(result)
    return results


def write_results(
    results: list[dict[str, Any]], modes: list[str], stem: str, total_s: float, title: str
) -> str:
    """``results/STEM.json`` and ``.md``; returns the markdown table."""
    meta = training.run_meta(total_s)
    meta.update(opacus=training._opacus_available(), threads=training.THREADS)
    commit, dirty = meta["commit"], meta["uncommitted_changes"]
    reference = modes[0]
    rows = [
        "| model | "
        + " | ".join(f"{m} ms" for m in modes)
        + " | "
        + " | ".join(f"{m} / {reference}" for m in modes[1:])
        + " | blocks |",
        "|---" * (2 * len(modes) + 1) + "|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | error: {r['error']} |")
            continue
        cells = [f"{r['median_ms'][m]:.1f}" if m in r["median_ms"] else "n/a" for m in modes]
        cells += [
            f"{r['median_block_ratio'][m]:.2f}x" if m in r["median_block_ratio"] else "n/a"
            for m in modes[1:]
        ]
        rows.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['blocks']} |")
    table = "\n".join(rows)
    header = (
        f"{title}: commit {commit[:10]}{' (with uncommitted changes)' if dirty else ''}, "
        f"torch {meta['torch']}, opacus {meta['opacus'] or 'not installed'}, {meta['cpu']}, "
        f"{training.THREADS} threads; modes alternate in blocks of {BLOCK_STEPS} steps in one "
        f"process per model; ratio = median over blocks of the mode's block median / the "
        f"{reference} block's; total {total_s / 60:.1f} min.\n"
    )
    training.RESULTS.mkdir(exist_ok=True)
    (training.RESULTS / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "modes": modes, "results": results}, indent=2) + "\n"
    )
    (training.RESULTS / f"{stem}.md").write_text(header + "\n" + table + "\n")
    return table


def main(
    default_modes: tuple[str, ...] = DEFAULT_MODES,
    stem: str = "interleaved",
    title: str = "Interleaved step-time ratios",
) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=",".join(training.MODELS))
    parser.add_argument("--modes", default=",".join(default_modes), help="first = reference")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per mode (at most)")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="call dptorch.host_memory.retain_freed_memory() in every worker (all modes)",
    )
    parser.add_argument("--output", default=stem, help="results file stem (default: %(default)s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(training.MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(training.MODES)}")
    if args.worker:
        result = run_worker(args.worker, modes, args.blocks, args.retain_freed_memory)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    started = time.perf_counter()
    results = run_models(args.models.split(","), modes, args.blocks, args.retain_freed_memory)
    if args.retain_freed_memory:
        title += " (retain_freed_memory in every worker)"
    print(write_results(results, modes, args.output, time.perf_counter() - started, title))


if __name__ == "__main__":
    main()
