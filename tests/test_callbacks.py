"""Step records, the CSV and TensorBoard writers."""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPValueError, PrivacyEngine
from dptorch.accountants import RDPAccountant
from dptorch.callbacks import CSVLogger, StepRecord, StepReporter, TensorBoardLogger
from dptorch.errors import MissingDependencyError
from dptorch.optimizers import DPOptimizer

DELTA = 1e-5


class Recorder:
    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def on_step(self, record: StepRecord) -> None:
        self.records.append(record)


def _train(steps: int, callbacks: list[Any], **reporter_options: Any) -> tuple[list, Any]:
    """``steps`` DP steps; returns the losses and clipped fractions seen, and the optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=10),
        noise_multiplier=1.3,
        max_grad_norm=0.1,
    )
    reporter = StepReporter(optimizer, callbacks, privacy=engine, delta=DELTA, **reporter_options)
    seen = []
    batches = iter(loader)
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        reporter.report(loss=loss)
        seen.append((loss.item(), optimizer.last_step_stats.clipped_fraction))
    reporter.close()
    return seen, optimizer


def _epsilon_after(steps: int) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=1.3, sample_rate=0.25)
    return accountant.get_epsilon(DELTA)


def test_csv_logger_writes_one_row_per_step(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    seen, _ = _train(4, [CSVLogger(path)], epsilon_every=2)
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == [f.name for f in fields(StepRecord)]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["epsilon"] for r in rows[::2]] == ["", ""]  # not computed on steps 1 and 3
    for row in rows[1::2]:
        assert float(row["epsilon"]) == pytest.approx(_epsilon_after(int(row["step"])), rel=1e-12)
        assert float(row["delta"]) == DELTA
    for row, (loss, clipped) in zip(rows, seen, strict=True):
        assert float(row["loss"]) == pytest.approx(loss, rel=1e-6)
        assert float(row["nonprivate_clipped_fraction"]) == pytest.approx(clipped)
        assert float(row["noise_multiplier"]) == 1.3 and float(row["max_grad_norm"]) == 0.1


def test_csv_logger_can_continue_a_file(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    record = StepRecord(1, None, None, None, None, 1.0, 1.0)
    with CSVLogger(path) as logger:
        logger.on_step(record)
    with CSVLogger(path, append=True) as logger:
        logger.on_step(StepRecord(2, 0.5, 1e-5, 0.1, 0.25, 1.0, 1.0))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("step,epsilon")
    assert lines[1] == "1,,,,,1.0,1.0"


def test_records_reach_every_callback_and_count_from_start_step() -> None:
    first, second = Recorder(), Recorder()
    _train(3, [first, second], epsilon_every=1, start_step=10)
    assert first.records == second.records
    assert [r.step for r in first.records] == [11, 12, 13]
    assert all(r.epsilon is not None and r.epsilon > 0 for r in first.records)
    assert all(0 <= cast(float, r.nonprivate_clipped_fraction) <= 1 for r in first.records)


def test_accumulating_steps_are_not_reported() -> None:
    class Accumulating:
        is_accumulating = True

    recorder = Recorder()
    reporter = StepReporter(cast(DPOptimizer, Accumulating()), [recorder])
    assert reporter.report(loss=1.0) is None
    assert recorder.records == [] and reporter.step == 0


def test_reporter_arguments_are_checked() -> None:
    optimizer = cast(DPOptimizer, object())
    with pytest.raises(DPValueError, match="delta="):
        StepReporter(optimizer, privacy=RDPAccountant())
    with pytest.raises(DPValueError, match="epsilon_every=0"):
        StepReporter(optimizer, epsilon_every=0)


def test_tensorboard_logger_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'dptorch\[tensorboard\]'"):
        TensorBoardLogger("runs/x")


def test_tensorboard_logger_writes_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(4, [TensorBoardLogger(tmp_path)], epsilon_every=2)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    epsilon = events.Scalars("privacy/epsilon")
    assert [e.step for e in epsilon] == [2, 4]
    assert epsilon[1].value == pytest.approx(_epsilon_after(4), rel=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    clipped = events.Scalars("nonprivate/clipped_fraction")
    assert len(clipped) == 4 and all(not math.isnan(e.value) for e in clipped)
