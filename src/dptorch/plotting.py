"""A one-figure summary of a private run: test accuracy, epsilon and clipped fraction by step.

Needs matplotlib (``pip install 'dptorch[demo]'``). Drawn with matplotlib's object API and the
Agg canvas, so it sets no global backend and opens no window.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from dptorch.callbacks import StepRecord
from dptorch.errors import MissingDependencyError

__all__ = ["plot_training"]

_SMOOTHING_STEPS = 20  # window of the running mean drawn over the noisy per-step fraction


def plot_training(
    path: str | os.PathLike[str],
    *,
    records: Sequence[StepRecord] = (),
    accuracy: Sequence[tuple[int, float]] = (),
    title: str | None = None,
) -> Path:
    """Write a PNG with three panels against the step: accuracy, epsilon, clipped fraction.

    Args:
        path: the PNG file to write.
        records: the run's step records (from :class:`~dptorch.callbacks.StepReporter`);
            records without epsilon are skipped in the epsilon panel.
        accuracy: ``(step, test accuracy)`` points, e.g. one per epoch.
        title: the figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Privacy: the clipped-fraction panel is computed from raw per-example gradients and is
    labelled non-private; do not publish it for a run on private data.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError(
            "plot_training needs matplotlib, which is not installed: "
            "pip install 'dptorch[demo]' (or pip install matplotlib)."
        ) from error
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    acc_axes, eps_axes, clip_axes = figure.subplots(1, 3)

    if accuracy:
        steps, values = zip(*accuracy, strict=True)
        acc_axes.plot(steps, values, marker="o")
    acc_axes.set(title="test accuracy", xlabel="step", ylim=(0, 1))

    with_epsilon = [(r.step, r.epsilon) for r in records if r.epsilon is not None]
    if with_epsilon:
        steps, values = zip(*with_epsilon, strict=True)
        eps_axes.plot(steps, values)
    delta = next((r.delta for r in records if r.delta is not None), None)
    eps_axes.set(title="epsilon" + (f" (delta={delta:g})" if delta else ""), xlabel="step")

    clipped = [
        (r.step, r.nonprivate_clipped_fraction)
        for r in records
        if r.nonprivate_clipped_fraction is not None
        and not math.isnan(r.nonprivate_clipped_fraction)
    ]
    if clipped:
        steps, values = zip(*clipped, strict=True)
        clip_axes.plot(steps, values, alpha=0.3, label="per step")
        clip_axes.plot(steps, _running_mean(values, _SMOOTHING_STEPS), label="running mean")
        clip_axes.legend(loc="lower right")
    clip_axes.set(title="clipped fraction (NON-PRIVATE)", xlabel="step", ylim=(0, 1))

    if title:
        figure.suptitle(title)
    target = Path(path)
    figure.savefig(target, dpi=110)
    return target


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    means, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        means.append(total / min(index + 1, window))
    return means
