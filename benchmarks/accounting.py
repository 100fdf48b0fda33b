"""Accounting speed and tightness: dptorch against Opacus's accountants, in one process.

Run: ``make bench-accounting`` (or ``.venv/bin/python benchmarks/accounting.py``). Writes
``benchmarks/results/accounting.json`` and ``accounting.md``. Opacus is optional: without it
only dptorch's rows are measured, and the table says so.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dptorch.accountants import create_accountant, get_noise_multiplier
from dptorch.accountants.analysis import pld as pld_analysis
from dptorch.accountants.analysis import rdp as rdp_analysis

RESULTS = Path(__file__).resolve().parent / "results"
DELTA = 1e-5
Q = 256 / 60_000
CONSTANT = (1.0, Q, 10_000)  # (sigma, q, steps)


def _clear_caches() -> None:
    """Time cold calls: dptorch's analysis modules memoise one-step curves process-wide."""
    for module in (pld_analysis, rdp_analysis):
        for cached in vars(module).values():
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


def _median_seconds(run: Callable[[], Any], repeats: int = 5) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        _clear_caches()
        start = time.perf_counter()
        value = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def _dptorch_epsilon(name: str) -> Callable[[], float]:
    def run() -> float:
        accountant = create_accountant(name)  # fresh: no cache carried between repeats
        accountant.load_state_dict({"mechanism": name, "history": [CONSTANT]})
        return accountant.get_epsilon(DELTA)

    return run


def _opacus_epsilon(name: str) -> Callable[[], float] | None:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:
        return None
    cls = {"prv": PRVAccountant, "rdp": RDPAccountant}[name]

    def run() -> float:
        accountant = cls()
        accountant.history = [CONSTANT]
        return float(accountant.get_epsilon(DELTA))

    return run


def _calibration(library: str, name: str) -> Callable[[], float] | None:
    kwargs = {"target_epsilon": 3.0, "target_delta": DELTA, "sample_rate": Q, "epochs": 60}
    if library == "dptorch":
        return lambda: get_noise_multiplier(accountant=name, **kwargs)
    try:
        from opacus.accountants.utils import get_noise_multiplier as opacus_noise
    except ImportError:
        return None
    return lambda: float(opacus_noise(accountant=name, **kwargs))


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    warnings.simplefilter("ignore")
    rows: list[dict[str, Any]] = []
    for task, factory in (
        ("epsilon, 10,000 steps", "epsilon"),
        ("noise for eps=3, 60 epochs", "noise"),
    ):
        for name in ("prv", "rdp"):
            for library in ("dptorch", "opacus"):
                if factory == "epsilon":
                    run = _dptorch_epsilon(name) if library == "dptorch" else _opacus_epsilon(name)
                else:
                    run = _calibration(library, name)
                if run is None:
                    rows.append(
                        {
                            "task": task,
                            "accountant": name,
                            "library": library,
                            "seconds": None,
                            "value": None,
                            "note": "opacus not installed",
                        }
                    )
                    continue
                seconds, value = _median_seconds(run, repeats=3 if factory == "noise" else 5)
                rows.append(
                    {
                        "task": task,
                        "accountant": name,
                        "library": library,
                        "seconds": seconds,
                        "value": value,
                    }
                )
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": _commit(),
        "delta": DELTA,
        "sample_rate": Q,
        "constant_history": CONSTANT,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accounting.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| task | accountant | library | median time | value |", "|---|---|---|---|---|"]
    for row in rows:
        shown = "n/a" if row["seconds"] is None else f"{row['seconds'] * 1000:.1f} ms"
        value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(
            f"| {row['task']} | {row['accountant']} | {row['library']} | {shown} | {value} |"
        )
    table = "\n".join(lines)
    (RESULTS / "accounting.md").write_text(
        f"Accounting benchmark (commit {meta['commit']}, torch {meta['torch']}, "
        f"{meta['machine']}); value = epsilon or noise multiplier.\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
