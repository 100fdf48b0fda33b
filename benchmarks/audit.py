"""Audit power: lower bounds of honest runs and of runs with planted privacy faults.

Run: ``.venv/bin/python benchmarks/audit.py`` (about two minutes on two CPU cores). Writes
``benchmarks/results/audit.json`` and ``audit.md``. Every row is dptorch's real DP-SGD on the
built-in setup (MLP, 256 generated examples, q = 0.5, 20 steps for one-run audits), sigma
calibrated so the PRV accountant reports the target epsilon at delta = 1e-5.
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from dptorch.audit import (
    FAULTS,
    AuditReport,
    audit_dpsgd,
    audit_dpsgd_many_runs,
    planted_fault,
    small_classification_data,
    small_mlp,
    small_setup,
)

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [None, *sorted(FAULTS)]


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run(fault: str | None, audit: Any) -> tuple[AuditReport, float]:
    start = time.perf_counter()
    with planted_fault(fault) if fault else contextlib.nullcontext():
        report = audit()
    return report, time.perf_counter() - start


def _one_run_rows(target: float, canaries: int, seeds: range) -> list[dict[str, Any]]:
    setup = small_setup(target_epsilon=target)
    rows = []
    for fault in CASES:
        for seed in seeds:

            def audit(seed: int = seed) -> AuditReport:
                return audit_dpsgd(
                    small_mlp,
                    small_classification_data(),
                    noise_multiplier=setup.noise_multiplier,
                    max_grad_norm=setup.max_grad_norm,
                    sample_rate=setup.sample_rate,
                    steps=setup.steps,
                    num_canaries=canaries,
                    delta=setup.delta,
                    seed=seed,
                )

            report, seconds = _run(fault, audit)
            rows.append(_row("one-run", fault, seed, canaries, report, seconds))
    return rows


def _many_run_rows(target: float, runs: int) -> list[dict[str, Any]]:
    setup = small_setup(target_epsilon=target, steps=10)
    rows = []
    for fault in (None, "noise", "no-clipping"):

        def audit() -> AuditReport:
            return audit_dpsgd_many_runs(
                small_mlp,
                small_classification_data(64),
                noise_multiplier=setup.noise_multiplier,
                max_grad_norm=setup.max_grad_norm,
                sample_rate=setup.sample_rate,
                steps=setup.steps,
                runs=runs,
                delta=setup.delta,
            )

        report, seconds = _run(fault, audit)
        rows.append(_row("many-run", fault, 0, runs, report, seconds))
    return rows


def _row(
    method: str, fault: str | None, seed: int, size: int, report: AuditReport, seconds: float
) -> dict[str, Any]:
    return {
        "method": method,
        "fault": fault or "none (honest)",
        "seed": seed,
        "canaries_or_runs": size,
        "lower": round(report.epsilon_lower_bound, 3),
        "upper": round(report.epsilon_upper_bound, 3),
        "violated": report.violated,
        "details": dict(report.details),
        "seconds": round(seconds, 2),
    }


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Audit power (commit {meta['commit']}, torch {meta['torch']}, {meta['machine']}, "
        f"{meta['threads']} thread)",
        "",
        "Command: `.venv/bin/python benchmarks/audit.py`. Gradient canaries, 95% confidence, "
        "delta = 1e-5. One-run: q = 0.5, 20 steps. Many-run: one canary, q = 0.5, 10 steps.",
        "",
        "| method | planted fault | seed | canaries / runs | lower bound | accountant eps "
        "| violated | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['fault']} | {r['seed']} | {r['canaries_or_runs']} | "
            f"{r['lower']:.3f} | {r['upper']:.3f} | {'**yes**' if r['violated'] else 'no'} | "
            f"{r['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    meta = {
        "commit": _commit(),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "threads": 1,
    }
    rows = _one_run_rows(4.0, 1000, range(5))
    rows += _one_run_rows(6.0, 5000, range(3))
    rows += _many_run_rows(1.0, 400)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / "audit.md").write_text(_markdown(meta, rows))
    print(_markdown(meta, rows))


if __name__ == "__main__":
    main()
