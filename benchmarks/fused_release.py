"""A/B of the release path: clipped sums accumulated into the noise buffer, or added to it.

Run: ``.venv/bin/python benchmarks/fused_release.py`` (``--models mlp,cnn``, ``--blocks N``).
Writes ``benchmarks/results/fused_release.json`` and ``.md``.

The optimizer draws the noise first and each layer's weighted sum ``sum_i c_i g_i`` is
accumulated into its view of the noise buffer by the contraction itself (``baddbmm_`` /
``addmv_`` / ``index_add_``; ``ClipPlan.add_sum_``). Before, every sum was a new
parameter-sized tensor, added to the noise in a second pass. The difference is a fraction
of a millisecond on the small models, below what whole-step ratios resolve on this machine
(repeated runs of them moved by more than it), so this script times ``optimizer.step()``
alone (clipping factors, sums, noise, release and the SGD update), on the benchmark models
of ``training.py`` with ``norm_route="auto"``: forward and backward run untimed, then the
step is timed, in blocks of 6 steps per variant; the ``unfused`` blocks swap
``ClipPlan.add_sum_`` for "form the sum, then ``add_``", and the two orders alternate
(ABBA). Same mechanism either way (tested: the released gradient equals the seeded draw plus
the separately formed clipped sum / qN).
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
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # the benchmark models

BLOCK_STEPS = 6
RESULT_TAG = "RESULT "


def _unfused_add_sum_(
    plan: Any, param: torch.Tensor, out: torch.Tensor, alpha: float = 1.0
) -> None:
    """The release before fusion: the clipped sum as its own tensor, then one ``add_``."""
    if param in plan.terms:
        out.add_(plan.sum(param), alpha=alpha)


def run_worker(model_name: str, blocks: int) -> dict[str, Any]:
    import dptorch
    from dptorch.per_sample.engine import ClipPlan

    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    spec = training.MODELS[model_name]
    x, y = spec.batch(torch.Generator().manual_seed(0))
    model, _ = training._dp_layers(spec.build())
    criterion = spec.criterion()
    loader = DataLoader(training.FixedSizeDataset(x, y, training.DATASET_SIZE), batch_size=len(x))
    _, optimizer, _ = dptorch.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data_loader=loader,
        noise_multiplier=training.NOISE_MULTIPLIER,
        max_grad_norm=training.MAX_GRAD_NORM,
    )
    variants = {"unfused": _unfused_add_sum_, "fused": ClipPlan.add_sum_}
    times: dict[str, list[float]] = {mode: [] for mode in variants}
    for index in range(blocks + 1):  # block 0 warms both variants up, untimed
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for mode in order:
            ClipPlan.add_sum_ = variants[mode]  # type: ignore[method-assign]
            for _ in range(BLOCK_STEPS):
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                started = time.perf_counter()
                optimizer.step()
                if index > 0:
                    times[mode].append(time.perf_counter() - started)
    ClipPlan.add_sum_ = variants["fused"]  # type: ignore[method-assign]
    return {
        "model": model_name,
        "blocks": blocks,
        "step_ms": {mode: statistics.median(values) * 1e3 for mode, values in times.items()},
        "times_ms": {mode: [t * 1e3 for t in values] for mode, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="mlp,cnn,transformer,gpt")
    parser.add_argument("--blocks", type=int, default=30, help="blocks on the MLP and CNN")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(args.worker, args.blocks)), flush=True)
        return
    started = time.time()
    results = []
    for model in args.models.split(","):
        blocks = args.blocks if model in ("mlp", "cnn") else max(4, args.blocks // 5)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", model, "--blocks", str(blocks)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith(RESULT_TAG))
        results.append(json.loads(line.removeprefix(RESULT_TAG)))
        print(model, results[-1]["step_ms"], flush=True)
    total = time.time() - started
    commit = training._git("rev-parse", "HEAD").strip() or "unknown"
    dirty = bool(training._git("status", "--porcelain").strip())
    rows = [
        "| model | optimizer.step ms, unfused | fused | saved ms | saved % | steps each |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        before, after = r["step_ms"]["unfused"], r["step_ms"]["fused"]
        rows.append(
            f"| {r['model']} | {before:.2f} | {after:.2f} | {before - after:.2f} | "
            f"{100 * (before - after) / before:.1f}% | {r['blocks'] * BLOCK_STEPS} |"
        )
    header = (
        f"Release path A/B: commit {commit[:10]}{' (with uncommitted changes)' if dirty else ''}, "
        f"torch {torch.__version__}, {training._cpu_name()}, {training.THREADS} threads; median "
        f"time of dptorch's optimizer.step() (norm_route auto) with the clipped sums "
        f"accumulated into the noise (fused) or formed and then added (unfused), blocks of "
        f"{BLOCK_STEPS} steps in alternating order, one process per model; total "
        f"{total / 60:.1f} min.\n"
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
