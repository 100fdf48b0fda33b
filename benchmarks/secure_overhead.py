"""Secure mode's extra step time: ordinary and secure DP steps timed alternately, one process.

Run: ``.venv/bin/python benchmarks/secure_overhead.py`` (``--models mlp,cnn`` for a subset,
``--blocks N``). Writes ``benchmarks/results/secure_overhead.json`` and ``.md``.

``benchmarks/training.py`` times every mode in its own process, minutes apart; on a shared
machine the load changes in between by more than the 10% this measures. Here both modes of
one model live in the same process and run in alternating blocks of a few steps, so they
see the same machine; the reported overhead is the median over blocks of
``secure block / the ordinary block just before it``, beside the ratio of the two medians.
Each model runs in a fresh process (as in training.py), with the same models, batch sizes,
noise multiplier and 2 threads; both modes use ``norm_route="auto"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # the benchmark models and their step functions

RESULT_TAG = "RESULT "
BLOCK_STEPS = 5
STEP_BUDGET_S = 60.0  # per model and mode, beyond the minimum number of blocks
MIN_BLOCKS = 4


def run_worker(model: str, blocks: int) -> dict[str, Any]:
    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    ordinary, _ = training._prepare(model, "dptorch-auto")
    secure, _ = training._prepare(model, "dptorch-secure")
    for step in (ordinary, secure, ordinary, secure):  # warm-up
        step()
    probe = training._timed_steps(secure, 1, budget_s=0)[0]
    blocks = max(MIN_BLOCKS, min(blocks, int(STEP_BUDGET_S / (probe * BLOCK_STEPS))))
    times: dict[str, list[float]] = {"ordinary": [], "secure": []}
    block_ratios: list[float] = []
    for _ in range(blocks):
        pair = {}
        for name, step in (("ordinary", ordinary), ("secure", secure)):
            steps = training._timed_steps(step, BLOCK_STEPS, budget_s=float("inf"))
            times[name] += steps
            pair[name] = statistics.median(steps)
        block_ratios.append(pair["secure"] / pair["ordinary"])
    ordinary_ms = statistics.median(times["ordinary"]) * 1e3
    secure_ms = statistics.median(times["secure"]) * 1e3
    return {
        "model": model,
        "blocks": blocks,
        "block_steps": BLOCK_STEPS,
        "ordinary_ms": ordinary_ms,
        "secure_ms": secure_ms,
        "ratio_of_medians": secure_ms / ordinary_ms,
        "median_block_ratio": statistics.median(block_ratios),
        "block_ratios": block_ratios,
    }


def run_all(models: list[str], blocks: int) -> None:
    results = []
    started = time.perf_counter()
    for model in models:
        command = [sys.executable, __file__, "--worker", model, "--blocks", str(blocks)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
        if not lines:
            result = {"model": model, "error": done.stderr.strip().splitlines()[-1:]}
        else:
            result = json.loads(lines[-1][len(RESULT_TAG) :])
            print(
                f"{model:12s} ordinary {result['ordinary_ms']:.1f} ms, secure "
                f"{result['secure_ms']:.1f} ms, overhead {result['median_block_ratio']:.2f}x",
                flush=True,
            )
        results.append(result)
    total = time.perf_counter() - started
    commit = training._git("rev-parse", "HEAD").strip() or "unknown"
    dirty = bool(training._git("status", "--porcelain").strip())
    meta = {
        "commit": commit,
        "uncommitted_changes": dirty,
        "torch": torch.__version__,
        "cpu": training._cpu_name(),
        "threads": training.THREADS,
        "total_seconds": total,
    }
    rows = [
        "| model | DP step (ms) | secure DP step (ms) | ratio of medians | median block ratio |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | error: {r['error']} | | | |")
            continue
        rows.append(
            f"| {r['model']} | {r['ordinary_ms']:.1f} | {r['secure_ms']:.1f} | "
            f"{r['ratio_of_medians']:.2f}x | {r['median_block_ratio']:.2f}x |"
        )
    header = (
        f"Secure-mode overhead: commit {commit[:10]}{' (with uncommitted changes)' if dirty else ''}"
        f", torch {meta['torch']}, {meta['cpu']}, {training.THREADS} threads; ordinary and "
        f"secure steps alternate in blocks of {BLOCK_STEPS} in one process per model; "
        f"total {total / 60:.1f} min.\n"
    )
    training.RESULTS.mkdir(exist_ok=True)
    (training.RESULTS / "secure_overhead.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    (training.RESULTS / "secure_overhead.md").write_text(header + "\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=",".join(training.MODELS))
    parser.add_argument("--blocks", type=int, default=10, help="blocks per mode (at most)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(args.worker, args.blocks)), flush=True)
        return
    run_all(args.models.split(","), args.blocks)


if __name__ == "__main__":
    main()
