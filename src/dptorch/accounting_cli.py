"""The ``dptorch epsilon`` and ``dptorch noise`` commands: accounting without training."""

from __future__ import annotations

import argparse
import json
import math
import sys

from dptorch.accountants import create_accountant
from dptorch.accountants.calibration import get_noise_multiplier
from dptorch.errors import DPError

ACCOUNTANTS = ("prv", "rdp", "gdp")


def add_accounting_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``epsilon`` and ``noise`` on the ``dptorch`` parser's subcommands."""
    epsilon = commands.add_parser(
        "epsilon",
        help="epsilon spent by a DP-SGD run (Poisson sampling, Gaussian noise)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    epsilon.add_argument("--sample-rate", type=float, required=True, help="q = batch / N")
    epsilon.add_argument("--noise-multiplier", type=float, required=True, help="sigma")
    _add_duration(epsilon)
    epsilon.add_argument("--delta", type=float, required=True)
    epsilon.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    epsilon.add_argument("--json", action="store_true", help="print one JSON line")
    epsilon.set_defaults(handler=_epsilon)

    noise = commands.add_parser(
        "noise",
        help="smallest noise multiplier that keeps epsilon <= a target",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    noise.add_argument("--target-epsilon", type=float, required=True)
    noise.add_argument("--delta", type=float, required=True)
    noise.add_argument("--sample-rate", type=float, required=True, help="q = batch / N")
    _add_duration(noise)
    noise.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    noise.add_argument("--epsilon-tolerance", type=float, default=0.01)
    noise.add_argument("--json", action="store_true", help="print one JSON line")
    noise.set_defaults(handler=_noise)


def _add_duration(parser: argparse.ArgumentParser) -> None:
    duration = parser.add_mutually_exclusive_group(required=True)
    duration.add_argument("--steps", type=int, help="number of DP-SGD steps")
    duration.add_argument("--epochs", type=float, help="passes over the data (steps = epochs/q)")


def _steps(args: argparse.Namespace) -> int:
    if args.steps is not None:
        return int(args.steps)
    return math.ceil(args.epochs / args.sample_rate)


def _epsilon_of(name: str, sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = create_accountant(name)
    accountant.load_state_dict({"mechanism": name, "history": [(sigma, q, steps)]})
    return accountant.get_epsilon(delta)


def _epsilon(args: argparse.Namespace) -> int:
    try:
        steps = _steps(args)
        value = _epsilon_of(
            args.accountant, args.noise_multiplier, args.sample_rate, steps, args.delta
        )
        rdp = (
            value
            if args.accountant == "rdp"
            else _epsilon_of("rdp", args.noise_multiplier, args.sample_rate, steps, args.delta)
        )
    except DPError as error:
        print(f"dptorch epsilon: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "epsilon": value,
                    "rdp_epsilon": rdp,
                    "accountant": args.accountant,
                    "delta": args.delta,
                    "steps": steps,
                    "sample_rate": args.sample_rate,
                    "noise_multiplier": args.noise_multiplier,
                }
            )
        )
    else:
        print(
            f"epsilon = {value:.4f} ({args.accountant}); rdp: {rdp:.4f} "
            f"at delta = {args.delta:g} after {steps} steps"
        )
    return 0


def _noise(args: argparse.Namespace) -> int:
    try:
        steps = _steps(args)
        sigma = get_noise_multiplier(
            target_epsilon=args.target_epsilon,
            target_delta=args.delta,
            sample_rate=args.sample_rate,
            steps=steps,
            accountant=args.accountant,
            epsilon_tolerance=args.epsilon_tolerance,
        )
        reached = _epsilon_of(args.accountant, sigma, args.sample_rate, steps, args.delta)
    except DPError as error:
        print(f"dptorch noise: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "noise_multiplier": sigma,
                    "epsilon": reached,
                    "target_epsilon": args.target_epsilon,
                    "delta": args.delta,
                    "steps": steps,
                    "sample_rate": args.sample_rate,
                    "accountant": args.accountant,
                }
            )
        )
    else:
        print(
            f"noise multiplier = {sigma:.4f} (epsilon {reached:.4f} <= {args.target_epsilon:g} "
            f"at delta = {args.delta:g}, {steps} steps, {args.accountant})"
        )
    return 0
