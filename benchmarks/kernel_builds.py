"""The compiled noise kernel built for each x86-64 instruction set, side by side.

Run: ``.venv/bin/python benchmarks/kernel_builds.py`` (``--models mlp,cnn``, ``--blocks N``;
about 2 minutes on two CPU cores, Linux on x86-64 with gcc). Writes
``benchmarks/results/kernel_builds.json`` and ``.md``.

``_gaussian_kernel.c`` is compiled with ``target_clones``: copies for AVX-512 (x86-64-v4),
AVX2 (v3) and the baseline, of which the loader runs the widest the CPU has. Here the file is
compiled once per level without the clones (setup.py's flags, ``-march=LEVEL``;
:func:`build_for_level`, which tests/test_kernel_builds.py also uses to check that every
build gives the same bits), and

1. one draw of the MLP's 670k coordinates into a reused buffer, on one thread, alternates
   between the builds;
2. for each model, in a fresh process, plain PyTorch and ONE private model whose steps
   alternate in blocks between the builds (the module dptorch.cpu_sampler calls is swapped
   around each block), as ``interleaved.py`` alternates modes.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleaved  # the alternating-blocks timer
import training  # the benchmark models and their step functions

from dptorch import cpu_sampler

SOURCE = Path(__file__).resolve().parents[1] / "src" / "dptorch"
SETUP = SOURCE.parents[1] / "setup.py"
# The instruction sets of the clones, with the CPU flags (/proc/cpuinfo) each needs.
LEVELS = {
    "x86-64": frozenset(),
    "x86-64-v3": frozenset({"avx2", "fma", "bmi2"}),
    "x86-64-v4": frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
}
MLP_COORDINATES = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10


def cpu_runs(level: str) -> bool:
    """Whether this CPU has every instruction set extension ``level`` needs."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return LEVELS[level] <= set(line.split(":", 1)[1].split())
    return not LEVELS[level]


def setup_compile_flags() -> list[str]:
    """The non-Windows ``compile_args`` of setup.py, so a build here is what users build."""
    found = re.findall(r"compile_args = (\[[^\]]*\])", SETUP.read_text())
    if not found:
        raise RuntimeError("setup.py no longer assigns compile_args = [...]")
    flags: list[str] = ast.literal_eval(found[-1])
    return flags


def build_for_level(name: str, level: str, into: Path) -> ModuleType:
    """``dptorch.<name>`` (a C file in src/dptorch) compiled for ``level`` alone: its
    ``target_clones`` attributes removed, ``-march=level``, with OpenMP as on Linux."""
    source = (SOURCE / f"{name}.c").read_text()
    single, clones = re.subn(r"__attribute__\(\(target_clones\([^)]*\)\)\)", "", source)
    if clones == 0:
        raise RuntimeError(f"{name}.c has no target_clones attribute left to remove")
    c_file = into / f"{name}_{level}.c"
    c_file.write_text(single)
    library = into / level / f"{name}.so"
    library.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "gcc",
        "-shared",
        "-fPIC",
        *setup_compile_flags(),
        "-fopenmp",
        f"-march={level}",
        f"-I{sysconfig.get_paths()['include']}",
        str(c_file),
        "-o",
        str(library),
    ]
    subprocess.run(command, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location(f"dptorch.{name}", library)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"could not load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _builds(into: Path) -> dict[str, ModuleType]:
    return {
        level: build_for_level("_gaussian_kernel", level, into)
        for level in LEVELS
        if cpu_runs(level)
    }


def time_draws(
    builds: dict[str, ModuleType], rounds: int = 15, calls: int = 20
) -> dict[str, float]:
    """Median ms of one 670k-value draw per build, one thread, builds alternating."""
    buffer = torch.empty(MLP_COORDINATES)
    times: dict[str, list[float]] = {level: [] for level in builds}
    for _ in range(rounds):
        for level, module in builds.items():
            start = time.perf_counter()
            for seed in range(calls):
                module.fill(buffer.data_ptr(), buffer.numel(), seed, 1.0)
            times[level].append((time.perf_counter() - start) / calls)
    return {level: statistics.median(t) * 1e3 for level, t in times.items()}


def _with_build(module: ModuleType, step: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        cpu_sampler._KERNEL = module
        return step()

    return run


def run_worker(model: str, blocks: int) -> dict[str, Any]:
    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as into:
        builds = _builds(Path(into))
        plain = training._prepare(model, "plain")[0]
        private = training._prepare(model, "dptorch-auto")[0]
        steps = {"plain": plain}
        steps.update({f"dptorch, {level}": _with_build(m, private) for level, m in builds.items()})
        return interleaved.warm_and_alternate(model, steps, blocks)


def time_steps(models: list[str], blocks: int) -> list[dict[str, Any]]:
    return interleaved.run_worker_processes(__file__, models, ["--blocks", str(blocks)], 3)


def write(
    draws: dict[str, float], steps: list[dict[str, Any]], total_s: float, models: str
) -> None:
    meta = training.run_meta(total_s)
    commit, dirty = meta["commit"], meta["uncommitted_changes"]
    levels = list(draws)
    lines = [
        f"# Noise kernel builds: commit {commit[:10]}{' (uncommitted changes)' if dirty else ''}"
        f", torch {meta['torch']}, {meta['cpu']}, {total_s / 60:.1f} min",
        "",
        f"Command: `.venv/bin/python benchmarks/kernel_builds.py --models {models}`. Builds "
        "alternate.",
        "",
        "| one draw of 670k values, 1 thread | ms |",
        "|---|---|",
        *[f"| {level} | {ms:.3f} |" for level, ms in draws.items()],
        "",
        "| model | plain ms | "
        + " | ".join(f"dptorch, {level} ms" for level in levels)
        + " | "
        + " | ".join(f"{level} / plain" for level in levels)
        + " | blocks |",
        "|---|---|" + "---|" * (2 * len(levels)) + "---|",
    ]
    for row in steps:
        if "error" in row:
            lines.append(f"| {row['model']} | failed: {row['error']} |")
            continue
        ms, ratio = row["median_ms"], row["median_block_ratio"]
        names = [f"dptorch, {level}" for level in levels]
        lines.append(
            f"| {row['model']} | {ms['plain']:.2f} | "
            + " | ".join(f"{ms[n]:.2f}" for n in names)
            + " | "
            + " | ".join(f"{ratio[n]:.3f}x" for n in names)
            + f" | {row['blocks']} |"
        )
    out = training.RESULTS
    out.mkdir(exist_ok=True)
    (out / "kernel_builds.md").write_text("\n".join(lines) + "\n")
    payload = {**meta, "draw_ms": draws, "steps": steps}
    (out / "kernel_builds.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated benchmark models")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per build")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(interleaved.RESULT_TAG + json.dumps(run_worker(args.worker, args.blocks)))
        return
    start = time.perf_counter()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as into:
        draws = time_draws(_builds(Path(into)))
    print("one draw of 670k values: " + ", ".join(f"{k} {v:.3f} ms" for k, v in draws.items()))
    steps = time_steps(args.models.split(","), args.blocks)
    write(draws, steps, time.perf_counter() - start, args.models)


if __name__ == "__main__":
    main()
