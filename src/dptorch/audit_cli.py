"""The ``dptorch audit`` command: audit dptorch's own DP-SGD on a small built-in setup.

Exit status: 0 when the audit finds no violation, 1 when its lower bound exceeds the
accountant's epsilon (so ``dptorch audit`` can gate a CI job), 2 for unusable settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from dptorch.audit import (
    FAULTS,
    audit_dpsgd,
    audit_dpsgd_many_runs,
    planted_fault,
    small_classification_data,
    small_mlp,
    small_setup,
)
from dptorch.errors import DPError, MissingDependencyError

__all__ = ["add_audit_commands"]


def add_audit_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``audit`` on the ``dptorch`` parser's subcommands."""
    audit = commands.add_parser(
        "audit",
        help="empirically lower-bound epsilon of dptorch's DP-SGD and compare to the accountant",
        description=(
            "Train a small MLP on generated data with dptorch's DP-SGD, plus canaries each "
            "included with probability 1/2, and lower-bound epsilon from how well the canaries' "
            "scores reveal their membership (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846). "
            "A lower bound above the accountant's epsilon is a privacy bug. Exit status 1 then."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    audit.add_argument(
        "--target-epsilon",
        type=float,
        default=4.0,
        help="calibrate sigma so the accountant reports this epsilon (ignored with "
        "--noise-multiplier); one run with m canaries shows at most about log(m/3)",
    )
    audit.add_argument("--noise-multiplier", type=float, default=None, help="sigma, if given")
    audit.add_argument("--max-grad-norm", type=float, default=1.0, help="C")
    audit.add_argument("--sample-rate", type=float, default=0.5, help="Poisson rate q")
    audit.add_argument("--steps", type=int, default=20, help="DP-SGD steps")
    audit.add_argument("--delta", type=float, default=1e-5)
    audit.add_argument("--num-canaries", type=int, default=1000, help="m (one-run audit)")
    audit.add_argument("--canary", choices=("gradient", "input"), default="gradient")
    audit.add_argument(
        "--runs",
        type=int,
        default=None,
        help="use the many-run Clopper-Pearson audit with this many trainings instead",
    )
    audit.add_argument("--confidence", type=float, default=0.95)
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument(
        "--plant-fault",
        choices=sorted(FAULTS),
        default=None,
        help="break dptorch on purpose to see the audit catch it: "
        + "; ".join(f"{name}: {what}" for name, what in FAULTS.items()),
    )
    audit.add_argument("--plot", default=None, help="save score histograms here (matplotlib)")
    audit.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    audit.add_argument("--json", action="store_true", help="print the report as one JSON line")
    audit.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    fault = planted_fault(args.plant_fault) if args.plant_fault else contextlib.nullcontext()
    try:
        setup = small_setup(
            target_epsilon=args.target_epsilon,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
            max_grad_norm=args.max_grad_norm,
        )
        sigma = setup.noise_multiplier if args.noise_multiplier is None else args.noise_multiplier
        common = {
            "noise_multiplier": sigma,
            "max_grad_norm": args.max_grad_norm,
            "sample_rate": args.sample_rate,
            "steps": args.steps,
            "delta": args.delta,
            "seed": args.seed,
            "canary": args.canary,
            "confidence": args.confidence,
        }
        data = small_classification_data(seed=args.seed)
        with fault:
            if args.runs is None:
                report = audit_dpsgd(small_mlp, data, num_canaries=args.num_canaries, **common)
            else:
                report = audit_dpsgd_many_runs(small_mlp, data, runs=args.runs, **common)
        if args.plot:
            report.plot(args.plot)
    except (DPError, MissingDependencyError) as error:
        print(f"dptorch audit: {error}", file=sys.stderr)
        return 2
    if args.json:
        summary = report.to_dict()
        summary["planted_fault"] = args.plant_fault
        print(json.dumps(summary))
    else:
        if args.plant_fault:
            print(f"planted fault: {args.plant_fault} ({FAULTS[args.plant_fault]})")
        print(report.summary())
    return 1 if report.violated else 0
