"""The CPU noise samplers side by side: dptorch's compiled kernel against torch's mt19937.

Run: ``.venv/bin/python benchmarks/noise_sampler.py`` (``--models mlp,lstm``, ``--blocks N``;
about 5 minutes on two CPU cores). Writes ``benchmarks/results/noise_sampler.json`` and
``.md``.

Three measurements, each alternating what it compares so that a shared machine's drifting
load falls on all alike:

1. the draw alone: ``dptorch.noise.gaussian_noise`` into a reused float32 buffer of the MLP's
   670k and the transformer's 4.2M coordinates, on 1 and 2 threads;
2. the MLP's draw right after a matrix product (as in a step, with torch's OpenMP worker still
   awake), the kernel's chunks threaded by OpenMP, by Python threads, or drawn on one thread;
3. the training step: one process per model (``training.py``'s models, batches and 2 threads),
   plain PyTorch and ONE private model whose steps alternate in blocks between the samplers
   (``dptorch.cpu_sampler.set_cpu_sampler`` around each block), as ``interleaved.py`` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleaved  # the alternating-blocks timer
import training  # the benchmark models and their step functions

from dptorch import noise
from dptorch.cpu_sampler import kernel_available, set_cpu_sampler
from dptorch.noise import gaussian_noise

SAMPLERS = ("kernel", "torch")
DRAW_SIZES = {"MLP (670k)": 669_706, "transformer (4.2M)": 4_200_000}
DEFAULT_MODELS = ("mlp", "cnn", "transformer", "lstm")


def _with_sampler(name: str, step: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        set_cpu_sampler(name)
        try:
            return step()
        finally:
            set_cpu_sampler("kernel")

    return run


def _draw_into(buffer: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One step's draw as the optimizer makes it: std 1, into the reused float32 buffer."""
    return gaussian_noise(
        buffer.shape,
        std=1.0,
        dtype=torch.float32,
        device=buffer.device,
        generator=generator,
        out=buffer,
    )


def time_draws(rounds: int = 15, calls: int = 10) -> list[dict[str, Any]]:
    """Median milliseconds per ``gaussian_noise`` call, samplers alternating by round."""
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for label, numel in DRAW_SIZES.items():
            buffer = torch.empty(numel)
            generator = torch.Generator().manual_seed(0)

            def draw(buffer: torch.Tensor = buffer, generator: torch.Generator = generator) -> Any:
                return _draw_into(buffer, generator)

            times: dict[str, list[float]] = {name: [] for name in SAMPLERS}
            for _ in range(rounds):
                for name in SAMPLERS:
                    step = _with_sampler(name, draw)
                    step()
                    start = time.perf_counter()
                    for _ in range(calls):
                        step()
                    times[name].append((time.perf_counter() - start) / calls)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            rows.append({"threads": threads, "draw": label, "numel": numel, "median_ms": ms})
            print(
                f"draw {label:20s} {threads} thread(s): "
                + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items()),
                flush=True,
            )
    return rows


def time_draws_after_matmul(rounds: int = 200) -> dict[str, float]:
    """Median ms of the MLP's 670k-value draw on 2 threads, each right after a matrix
    product, as in a step (torch's OpenMP worker is then still spinning): the kernel threaded
    by OpenMP, by Python threads, and on one thread."""
    torch.set_num_threads(2)
    buffer = torch.empty(DRAW_SIZES["MLP (670k)"])
    generator = torch.Generator().manual_seed(0)
    a, w = torch.randn(256, 784), torch.randn(512, 784)
    original_openmp, original_workers = noise.kernel_has_openmp, noise._parallel_workers
    variants: dict[str, Callable[[], None]] = {
        "kernel, OpenMP threads": lambda: None,
        "kernel, Python threads": lambda: setattr(noise, "kernel_has_openmp", lambda: False),
        "kernel, one thread": lambda: setattr(noise, "_parallel_workers", lambda out: 1),
    }
    if not original_openmp():
        del variants["kernel, OpenMP threads"]  # built without OpenMP: nothing to compare
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, patch in variants.items():
                patch()
                torch.mm(a, w.t())
                start = time.perf_counter()
                _draw_into(buffer, generator)
                times[name].append(time.perf_counter() - start)
                noise.kernel_has_openmp = original_openmp
                noise._parallel_workers = original_workers
    finally:
        noise.kernel_has_openmp = original_openmp
        noise._parallel_workers = original_workers
    ms = {name: statistics.median(t[10:]) * 1e3 for name, t in times.items()}
    print("after a matrix product: " + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items()))
    return ms


def run_worker(model: str, blocks: int) -> dict[str, Any]:
    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    plain = training._prepare(model, "plain")[0]
    private = training._prepare(model, "dptorch-auto")[0]
    steps = {
        "plain": plain,
        "dptorch, kernel noise": _with_sampler("kernel", private),
        "dptorch, torch noise": _with_sampler("torch", private),
    }
    return interleaved.warm_and_alternate(model, steps, blocks)


def time_steps(models: list[str], blocks: int) -> list[dict[str, Any]]:
    return interleaved.run_worker_processes(__file__, models, ["--blocks", str(blocks)], 2)


def write(
    draws: list[dict[str, Any]],
    after_matmul: dict[str, float],
    steps: list[dict[str, Any]],
    total_s: float,
) -> None:
    meta = training.run_meta(total_s)
    commit, dirty = meta["commit"], meta["uncommitted_changes"]
    lines = [
        f"# CPU noise samplers: commit {commit[:10]}{' (uncommitted changes)' if dirty else ''}, "
        f"torch {meta['torch']}, {meta['cpu']}, {total_s / 60:.1f} min",
        "",
        "Command: `.venv/bin/python benchmarks/noise_sampler.py`. Samplers alternate.",
        "",
        "| draw into a reused float32 buffer | threads | kernel ms | torch ms | torch / kernel |",
        "|---|---|---|---|---|",
    ]
    for row in draws:
        ms = row["median_ms"]
        lines.append(
            f"| {row['draw']} | {row['threads']} | {ms['kernel']:.2f} | "
            f"{ms['torch']:.2f} | {ms['torch'] / ms['kernel']:.1f}x |"
        )
    lines += [
        "",
        "| MLP (670k), 2 threads, each draw right after a matrix product | ms |",
        "|---|---|",
        *[f"| {name} | {ms:.2f} |" for name, ms in after_matmul.items()],
    ]
    lines += [
        "",
        "| model (training.py, 2 threads) | plain ms | dptorch, kernel noise: ms / plain | "
        "dptorch, torch noise: ms / plain | blocks |",
        "|---|---|---|---|---|",
    ]
    for r in steps:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | |")
            continue
        ms, ratio = r["median_ms"], r["median_block_ratio"]
        k, t = "dptorch, kernel noise", "dptorch, torch noise"
        lines.append(
            f"| {r['model']} | {ms['plain']:.1f} | {ms[k]:.1f} / {ratio[k]:.2f}x | "
            f"{ms[t]:.1f} / {ratio[t]:.2f}x | {r['blocks']} |"
        )
    training.RESULTS.mkdir(exist_ok=True)
    (training.RESULTS / "noise_sampler.json").write_text(
        json.dumps(
            {"meta": meta, "draws": draws, "after_matmul_ms": after_matmul, "steps": steps},
            indent=2,
        )
        + "\n"
    )
    (training.RESULTS / "noise_sampler.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--blocks", type=int, default=12, help="blocks per mode and model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not kernel_available():
        sys.exit("the compiled kernel is not built: reinstall dptorch with a C compiler")
    if args.worker:
        result = run_worker(args.worker, args.blocks)
        print(interleaved.RESULT_TAG + json.dumps(result), flush=True)
        return
    start = time.perf_counter()
    draws = time_draws()
    after_matmul = time_draws_after_matmul()
    steps = time_steps(args.models.split(","), args.blocks)
    write(draws, after_matmul, steps, time.perf_counter() - start)


if __name__ == "__main__":
    main()
