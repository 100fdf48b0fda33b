"""Per-step logging: a record of each DP step, handed to callbacks (CSV, TensorBoard, yours).

A :class:`StepReporter` builds a :class:`StepRecord` after each ``optimizer.step()`` and calls
every callback's ``on_step(record)``. Epsilon is asked of the accountant only every
``epsilon_every`` steps (composing the privacy loss is not free); in between it is ``None``.

The clipped fraction in a record is computed from raw per-example gradients, so it is NOT
covered by the privacy guarantee; its name says ``nonprivate``. Publish the logs of a run on
private data only without that column.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TextIO

from torch import Tensor

from dptorch.errors import DPValueError, MissingDependencyError
from dptorch.optimizers import DPOptimizer

__all__ = [
    "CSVLogger",
    "StepRecord",
    "StepReporter",
    "TensorBoardLogger",
    "TrainingCallback",
]


@dataclass(frozen=True)
class StepRecord:
    """What one DP step did.

    Attributes:
        step: DP steps (logical batches) done so far, this one included.
        epsilon: privacy spent after this step at ``delta``; ``None`` on steps where it was
            not computed.
        delta: the delta of ``epsilon`` (``None`` when no epsilon is tracked).
        loss: the loss passed to :meth:`StepReporter.report`, if any.
        nonprivate_clipped_fraction: share of the step's examples whose gradient was
            clipped; NOT private (raw data). NaN for an empty batch.
        noise_multiplier: sigma used by the step.
        max_grad_norm: C used by the step.
    """

    step: int
    epsilon: float | None
    delta: float | None
    loss: float | None
    nonprivate_clipped_fraction: float | None
    noise_multiplier: float
    max_grad_norm: float


class TrainingCallback(Protocol):
    """Anything with ``on_step(record)``; a ``close()`` method, if present, is called at the end."""

    def on_step(self, record: StepRecord) -> None: ...


class _EpsilonSource(Protocol):
    def get_epsilon(self, delta: float) -> float: ...


class StepReporter:
    """Turns each optimizer step into a :class:`StepRecord` for the callbacks.

    Args:
        optimizer: the :class:`DPOptimizer` from ``make_private``.
        callbacks: receivers of every record.
        privacy: where epsilon comes from (the ``PrivacyEngine`` or its accountant);
            ``None`` records no epsilon.
        delta: the delta to report epsilon at (required with ``privacy``).
        epsilon_every: compute epsilon on every N-th step (and on :meth:`report` with
            ``epsilon=True``).
        start_step: steps already done (when resuming from a checkpoint).

    Example:
        >>> reporter = StepReporter(optimizer, [CSVLogger("log.csv")], privacy=engine,
        ...                         delta=1e-5)  # doctest: +SKIP
        >>> for x, y in loader:  # doctest: +SKIP
        ...     ...; optimizer.step(); reporter.report(loss=loss)
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        callbacks: Sequence[TrainingCallback] = (),
        *,
        privacy: _EpsilonSource | None = None,
        delta: float | None = None,
        epsilon_every: int = 20,
        start_step: int = 0,
    ) -> None:
        if privacy is not None and delta is None:
            raise DPValueError(
                "privacy= was given without delta=; epsilon is only defined at a delta, e.g. "
                "StepReporter(optimizer, callbacks, privacy=engine, delta=1e-5)."
            )
        if isinstance(epsilon_every, bool) or not isinstance(epsilon_every, int):
            raise DPValueError(f"epsilon_every={epsilon_every!r} must be a positive int.")
        if epsilon_every < 1:
            raise DPValueError(f"epsilon_every={epsilon_every!r} must be a positive int.")
        self.optimizer = optimizer
        self.callbacks = list(callbacks)
        self.privacy = privacy
        self.delta = delta if privacy is not None else None
        self.epsilon_every = epsilon_every
        self.step = int(start_step)
        self.last_epsilon: float | None = None  # the latest epsilon computed

    def report(
        self, *, loss: float | Tensor | None = None, epsilon: bool = False
    ) -> StepRecord | None:
        """Record the step the optimizer just took and pass it to every callback.

        Call it after each ``optimizer.step()``. Steps that only accumulated a physical batch
        (under BatchMemoryManager) are not DP steps: they return ``None`` and count nothing.

        Args:
            loss: the step's loss (a tensor is read with ``.item()``).
            epsilon: compute epsilon now even if this is not an ``epsilon_every`` step.
        """
        if getattr(self.optimizer, "is_accumulating", False):
            return None
        self.step += 1
        stats = self.optimizer.last_step_stats
        clipped: float | None = None
        if stats is not None:
            clipped = stats.clipped_fraction if stats.batch_size else math.nan
        record = StepRecord(
            step=self.step,
            epsilon=self._epsilon(epsilon or self.step % self.epsilon_every == 0),
            delta=self.delta,
            loss=float(loss.item() if isinstance(loss, Tensor) else loss)
            if loss is not None
            else None,
            nonprivate_clipped_fraction=clipped,
            noise_multiplier=float(self.optimizer.noise_multiplier),
            max_grad_norm=float(self.optimizer.max_grad_norm),
        )
        for callback in self.callbacks:
            callback.on_step(record)
        return record

    def close(self) -> None:
        """Close every callback that has a ``close()`` method."""
        for callback in self.callbacks:
            close = getattr(callback, "close", None)
            if callable(close):
                close()

    def epsilon_now(self) -> float | None:
        """Epsilon spent so far at ``delta`` (``None`` without ``privacy``); not a record."""
        return self._epsilon(True)

    def _epsilon(self, wanted: bool) -> float | None:
        if not wanted or self.privacy is None or self.delta is None:
            return None
        self.last_epsilon = float(self.privacy.get_epsilon(self.delta))
        return self.last_epsilon


_COLUMNS = [f.name for f in fields(StepRecord)]


class CSVLogger:
    """Writes one CSV row per record (header: the :class:`StepRecord` field names).

    Missing values (epsilon on steps where it was not computed, no loss) are empty cells.
    Each row is flushed, so the file is readable while training runs. Use it as a context
    manager or call :meth:`close`.

    Args:
        path: the CSV file; replaced if it exists (``append=False``) or continued.
        append: continue an existing file (e.g. after resuming) without a second header.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = Path(path)
        continuing = append and self.path.exists() and self.path.stat().st_size > 0
        self._file: TextIO = self.path.open("a" if append else "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=_COLUMNS)
        if not continuing:
            self._writer.writeheader()

    def on_step(self, record: StepRecord) -> None:
        self._writer.writerow({k: "" if v is None else v for k, v in asdict(record).items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CSVLogger:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class TensorBoardLogger:
    """Writes each record as TensorBoard scalars (needs the ``tensorboard`` package).

    Tags: ``privacy/epsilon``, ``privacy/noise_multiplier``, ``privacy/max_grad_norm``,
    ``train/loss`` and ``nonprivate/clipped_fraction``; the step is the record's step.

    Args:
        log_dir: the run's directory, as for ``torch.utils.tensorboard.SummaryWriter``.
        **writer_options: other ``SummaryWriter`` arguments.

    Raises:
        MissingDependencyError: tensorboard is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike[str], **writer_options: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MissingDependencyError(
                "TensorBoardLogger needs the tensorboard package, which is not installed: "
                "pip install 'dptorch[tensorboard]' (or pip install tensorboard), or log to "
                "CSV with dptorch.callbacks.CSVLogger instead."
            ) from error
        self._writer = SummaryWriter(log_dir=os.fspath(log_dir), **writer_options)

    def on_step(self, record: StepRecord) -> None:
        scalars = {
            "privacy/epsilon": record.epsilon,
            "privacy/noise_multiplier": record.noise_multiplier,
            "privacy/max_grad_norm": record.max_grad_norm,
            "train/loss": record.loss,
            "nonprivate/clipped_fraction": record.nonprivate_clipped_fraction,
        }
        for tag, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(tag, value, global_step=record.step)

    def close(self) -> None:
        self._writer.close()
