"""The demo's plot and CSV log, and plot_training itself."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from dptorch.callbacks import StepRecord
from dptorch.cli import main
from dptorch.errors import MissingDependencyError
from dptorch.plotting import plot_training

TINY = ["--epochs", "2", "--limit", "512", "--batch-size", "64", "--no-progress"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_the_plot_and_one_csv_row_per_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    plot, log = tmp_path / "demo.png", tmp_path / "demo.csv"
    assert main(["demo", *TINY, "--plot", str(plot), "--csv", str(log), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    with log.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows] == list(range(1, 17))  # 2 passes of round(1/q) = 8
    # Epsilon is computed on each pass's last step; the last one is the reported epsilon.
    assert [r["step"] for r in rows if r["epsilon"]] == ["8", "16"]
    assert float(rows[-1]["epsilon"]) == pytest.approx(summary["epsilon"], rel=1e-12)
    assert all(0 <= float(r["nonprivate_clipped_fraction"]) <= 1 for r in rows)


def test_demo_without_matplotlib_says_so_and_still_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    plot = tmp_path / "demo.png"
    assert main(["demo", *TINY, "--epochs", "1", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    assert (
        "--plot needs matplotlib" in captured.err and "pip install 'dptorch[demo]'" in captured.err
    )
    assert "test accuracy:" in captured.out and not plot.exists()


def test_plot_training_draws_runs_with_gaps(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [
        StepRecord(
            s, 0.1 * s if s % 2 == 0 else None, 1e-5, None, math.nan if s == 3 else 0.5, 1.0, 1.0
        )
        for s in range(1, 6)
    ]
    path = plot_training(tmp_path / "p.png", records=records, accuracy=[(5, 0.7)], title="t")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_training_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match="pip install 'dptorch\\[demo\\]'"):
        plot_training(tmp_path / "p.png")


@pytest.mark.slow
def test_default_demo_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "demo.png"
    assert main(["demo", "--no-progress", "--plot", str(plot)]) == 0
    assert f"plot: {plot}" in capsys.readouterr().out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
