"""Many-run audits through the real DP-SGD path (one canary, independent trainings)."""

from __future__ import annotations

import numpy as np
import pytest

from dptorch.audit import (
    AuditReport,
    audit_dpsgd_many_runs,
    planted_fault,
    small_classification_data,
    small_mlp,
    small_setup,
)
from dptorch.errors import DPValueError


def _many(target_epsilon: float, runs: int) -> AuditReport:
    setup = small_setup(target_epsilon=target_epsilon, steps=10)
    return audit_dpsgd_many_runs(
        small_mlp,
        small_classification_data(64),
        noise_multiplier=setup.noise_multiplier,
        max_grad_norm=1.0,
        sample_rate=setup.sample_rate,
        steps=setup.steps,
        runs=runs,
        delta=setup.delta,
    )


def test_honest_runs_stay_below_the_accountant() -> None:
    """The setup that catches the fault below, run honestly."""
    report = _many(0.5, runs=60)
    assert report.method == "many-run" and report.scores.shape == (60,)
    assert report.included.sum() == 30
    assert not report.violated, report.summary()
    # Without the canary a score is pure noise, N(0, sigma^2 steps) in units of C: 30 draws
    # estimate its std within about 13% (one standard error), so 35% is 2.7 of them.
    sigma = report.settings["noise_multiplier"]
    outside = report.scores[~report.included]
    assert np.std(outside) == pytest.approx(sigma * np.sqrt(10), rel=0.35)


def test_skipped_clipping_is_caught_with_sixty_runs() -> None:
    """60 runs can show at most about log(60 / 15) = 1.4, so the setup claims epsilon 0.5;
    unclipped canaries (norm 1000 C) separate perfectly."""
    with planted_fault("no-clipping"):
        report = _many(0.5, runs=60)
    assert report.epsilon_upper_bound == pytest.approx(0.5, abs=0.01)
    assert report.violated, report.summary()
    scores, included = report.scores, report.included
    assert np.min(scores[included]) > np.max(scores[~included])


def test_too_few_runs_are_refused() -> None:
    with pytest.raises(DPValueError, match="runs=3"):
        _many(1.0, runs=3)
