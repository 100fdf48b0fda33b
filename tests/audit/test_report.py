"""``AuditReport``: verdict, JSON, text and the optional plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dptorch.audit import AuditReport
from dptorch.errors import MissingDependencyError


def _report(lower: float, upper: float) -> AuditReport:
    rng = np.random.default_rng(0)
    included = rng.random(100) < 0.5
    return AuditReport(
        epsilon_lower_bound=lower,
        epsilon_upper_bound=upper,
        delta=1e-5,
        confidence=0.95,
        method="one-run",
        canary="gradient",
        scores=rng.normal(size=100) + included,
        included=included,
        settings={"noise_multiplier": 1.0},
        details={"num_guesses": 10, "num_correct": 9},
    )


def test_verdict_text_and_json() -> None:
    honest, broken = _report(1.0, 4.0), _report(5.0, 4.0)
    assert not honest.violated and broken.violated
    assert "consistent" in honest.summary() and "VIOLATION" in broken.summary()
    data = json.loads(json.dumps(broken.to_dict()))
    assert data["violated"] is True and len(data["scores"]) == 100
    # JSON has no infinity: an unbounded accountant epsilon is written as a string.
    assert _report(1.0, float("inf")).to_dict()["epsilon_upper_bound"] == "inf"


def test_plot_writes_a_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "scores.png"
    ax = _report(1.0, 4.0).plot(str(path))
    assert path.stat().st_size > 0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["included", "excluded"]


def test_plot_without_matplotlib_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # makes importing it fail
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        _report(1.0, 4.0).plot()
