"""benchmarks/recipe_table.py tabulates the prediction rule it is asked for, and refuses runs
that never recorded it instead of mixing rules in one mean."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_table


def _run(seed: int, plain: float, shifted: float | None) -> dict[str, Any]:
    return {
        "dataset": "mnist",
        "seed": seed,
        "target_epsilon": 3.0,
        "epsilon": 2.99,
        "test_accuracy": plain,
        "test_accuracy_shift_averaged": shifted,
        "wall_s": 60.0,
        "settings": {"epochs": 60, "validation": 0},
    }


def _write(path: Path, runs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(run) + "\n" for run in runs))
    return path


def test_the_table_reports_the_chosen_prediction_rule(tmp_path: Path) -> None:
    source = _write(tmp_path / "runs.jsonl", [_run(0, 0.98, 0.99), _run(1, 0.97, 0.985)])
    plain = recipe_table.table(recipe_table.group(recipe_table.load(source, "mnist")))
    shifted = recipe_table.table(
        recipe_table.group(recipe_table.load(source, "mnist", recipe_table.SCORE_FIELDS["shifts"]))
    )
    assert "| 0.9750 | 0.9700-0.9800 | 2 |" in plain
    assert "| 0.9875 | 0.9850-0.9900 | 2 |" in shifted


def test_runs_without_the_rule_are_refused_by_seed(tmp_path: Path) -> None:
    source = _write(tmp_path / "runs.jsonl", [_run(0, 0.98, 0.99), _run(4, 0.97, None)])
    with pytest.raises(SystemExit, match=r"seeds \[4\].*test_accuracy_shift_averaged"):
        recipe_table.load(source, "mnist", recipe_table.SCORE_FIELDS["shifts"])
