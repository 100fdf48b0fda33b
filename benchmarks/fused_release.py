"""A/B of the release path: clipped sums accumulated into the noise buffer, or added to it.

Run: ``.venv/bin/python benchmarks/fused_release.py`` (``--models mlp,cnn``, ``--blocks N``).
Writes ``benchmarks/results/fused_release.json`` and ``.md``.

Since commit 84a58f8 the optimizer draws the noise first and each layer's weighted sum
``sum_i c_i g_i`` is accumulated into its view of the noise buffer by the contraction itself
(``baddbmm_`` / ``addmv_`` / ``index_add_``; ``ClipPlan.add_sum_``). Before, every sum was a
new parameter-sized tensor, added to the noise in a second pass. This script times both in
one process per model (the ``unfused`` blocks swap ``ClipPlan.add_sum_`` for "form the sum,
then ``add_``"), alternating blocks of 5 steps with the plain PyTorch step of
``training.py``'s benchmark models; each ratio is the median over blocks of the block median
divided by the plain block's just before it. Same mechanism either way (tested: the released
gradient equals the seeded draw plus the separately formed clipped sum / qN).
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

BLOCK_STEPS = 5
RESULT_TAG = "RESULT "


def _unfused_add_sum_(
    plan: Any, param: torch.Tensor, out: torch.Tensor, alpha: float = 1.0
) -> None:
    """The release before fusion: the clipped sum as its own tensor, then one ``add_``."""
    if param in plan.terms:
        out.add_(plan.sum(param), alpha=alpha)


def _block(step: Callable[[], Any]) -> float:
    step()  # one untimed step after switching modes
    times = []
    for _ in range(BLOCK_STEPS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_worker(model: str, blocks: int) -> dict[str, Any]:
    from dptorch.per_sample.engine import ClipPlan

    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    fused = ClipPlan.add_sum_
    plain, _ = training._prepare(model, "plain")
    private, _ = training._prepare(model, "dptorch-auto")
    for _ in range(3):
        plain()
        private()
    ratios: dict[str, list[float]] = {"unfused": [], "fused": []}
    plain_ms: list[float] = []
    for _ in range(blocks):
        reference = _block(plain)
        plain_ms.append(reference * 1e3)
        ClipPlan.add_sum_ = _unfused_add_sum_  # type: ignore[method-assign]
        ratios["unfused"].append(_block(private) / reference)
        ClipPlan.add_sum_ = fused  # type: ignore[method-assign]
        ratios["fused"].append(_block(private) / reference)
    return {
        "model": model,
        "blocks": blocks,
        "plain_ms": statistics.median(plain_ms),
        "ratio": {mode: statistics.median(values) for mode, values in ratios.items()},
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="mlp,cnn,transformer,gpt")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(args.worker, args.blocks)), flush=True)
        return
    started = time.time()
    results = []
    for model in args.models.split(","):
        blocks = args.blocks if model in ("mlp", "cnn") else max(4, args.blocks // 3)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", model, "--blocks", str(blocks)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith(RESULT_TAG))
        results.append(json.loads(line.removeprefix(RESULT_TAG)))
        print(results[-1]["model"], results[-1]["ratio"], flush=True)
    total = time.time() - started
    commit = training._git("rev-parse", "HEAD").strip() or "unknown"
    dirty = bool(training._git("status", "--porcelain").strip())
    rows = [
        "| model | plain ms | unfused / plain | fused / plain | blocks |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['model']} | {r['plain_ms']:.1f} | {r['ratio']['unfused']:.2f}x | "
            f"{r['ratio']['fused']:.2f}x | {r['blocks']} |"
        )
    header = (
        f"Release path A/B: commit {commit[:10]}{' (with uncommitted changes)' if dirty else ''}, "
        f"torch {torch.__version__}, {training._cpu_name()}, {training.THREADS} threads; "
        f"dptorch-auto with the clipped sums accumulated into the noise (fused) or formed and "
        f"then added (unfused), blocks of {BLOCK_STEPS} steps alternating with plain PyTorch in "
        f"one process per model; total {total / 60:.1f} min.\n"
    )
    training.RESULTS.mkdir(exist_ok=True)
    meta = {"commit": commit, "uncommitted_changes": dirty, "torch": torch.__version__}
    (training.RESULTS / "fused_release.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    (training.RESULTS / "fused_release.md").write_text(header + "\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
