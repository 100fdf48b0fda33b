"""One-run audits through dptorch's real DP-SGD path: honest runs pass, planted faults fail.

Setting (``small_setup()``): q = 0.5, 20 steps, sigma calibrated to an accountant epsilon of
4.0 at delta 1e-5, 1000 gradient canaries. Measured (seeds 0-2): honest lower bounds
1.39-1.65; every planted fault 5.21 (900 of 900 guesses right); the sample-rate fault leaves
the lower bound as it was but drops the upper bound to 0.35.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from dptorch.audit import (
    FAULTS,
    audit_dpsgd,
    planted_fault,
    small_classification_data,
    small_mlp,
    small_setup,
)
from dptorch.audit.canaries import InputCanaries
from dptorch.clipping import FlatClipping
from dptorch.errors import DPTypeError, DPValueError, DPWarning
from dptorch.optimizers import dp_optimizer
from dptorch.privacy_engine import PrivacyEngine

SETUP = small_setup(target_epsilon=4.0)


def _audit(seed: int = 0, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "noise_multiplier": SETUP.noise_multiplier,
        "max_grad_norm": SETUP.max_grad_norm,
        "sample_rate": SETUP.sample_rate,
        "steps": SETUP.steps,
        "delta": SETUP.delta,
        "num_canaries": 1000,
        "seed": seed,
    }
    settings.update(overrides)
    return audit_dpsgd(small_mlp, small_classification_data(), **settings)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_honest_run_stays_below_its_accountant(seed: int) -> None:
    report = _audit(seed)
    assert report.epsilon_upper_bound == pytest.approx(4.0, abs=0.05)
    assert not report.violated
    # The audit has power: well above 0 (a broken score would give ~0), below the upper bound.
    # The lower bound is itself random: over seeds 0-39 it had mean 1.25 (sd 0.22, smallest
    # 0.94) with dptorch's CPU noise kernel and 1.31 (sd 0.25, smallest 0.92) with torch's
    # sampler, about one seed in ten below 1.0; 0.5 leaves room for any honest stream.
    assert 0.5 < report.epsilon_lower_bound < report.epsilon_upper_bound


def test_noise_ten_times_smaller_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = dp_optimizer.gaussian_noise

    def tenth(shape: torch.Size, *, std: float, **kwargs: Any) -> torch.Tensor:
        return real(shape, std=std / 10, **kwargs)

    monkeypatch.setattr(dp_optimizer, "gaussian_noise", tenth)
    report = _audit()
    assert report.violated, report.summary()


def test_skipped_clipping_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Canary gradients have norm 1000 C, so without clipping they stand out at once.
    monkeypatch.setattr(FlatClipping, "factors", lambda self, norms: torch.ones_like(norms))
    report = _audit()
    assert report.violated, report.summary()


def test_accountant_told_a_ten_times_smaller_sample_rate_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real: Callable[..., Any] = PrivacyEngine._accounting_hook
    monkeypatch.setattr(PrivacyEngine, "_accounting_hook", lambda self, q: real(self, q / 10))
    report = _audit()
    assert report.epsilon_upper_bound < 0.5  # what the fooled accountant claims
    assert report.violated, report.summary()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_shipped_fault_is_caught(fault: str) -> None:
    with planted_fault(fault):
        report = _audit(seed=1)
    assert report.violated, report.summary()
    # The patch is gone after the block: the same audit is honest again.
    assert not _audit(seed=1).violated


def test_scores_count_the_steps_that_sampled_each_canary() -> None:
    """Without noise the score is exactly how many steps sampled the canary: 0 if excluded,
    a whole number >= 1 (almost surely, at q = 0.5 over 20 steps) if included."""
    with pytest.warns(DPWarning, match="noise_multiplier=0"):
        report = _audit(noise_multiplier=0.0, num_canaries=200)
    scores, included = report.scores, report.included
    np.testing.assert_allclose(scores[~included], 0.0, atol=1e-4)
    np.testing.assert_allclose(scores[included], np.round(scores[included]), atol=1e-3)
    assert scores[included].min() >= 1
    # Each of 20 steps samples a canary with probability 0.5: mean 10 (std of the mean 0.22).
    assert scores[included].mean() == pytest.approx(10.0, abs=1.0)
    assert report.epsilon_upper_bound == float("inf") and not report.violated


def test_equal_seeds_give_equal_reports_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = _audit(seed=5, num_canaries=100)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = _audit(seed=5, num_canaries=100)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert first.epsilon_lower_bound == second.epsilon_lower_bound
    assert not np.array_equal(first.scores, _audit(seed=6, num_canaries=100).scores)


def test_input_canaries_are_learned_without_noise() -> None:
    """Black-box canaries through the model itself: included ones gain margin. Non-private
    training (sigma 0), seed 0; the gap is about 3 standard errors."""
    with pytest.warns(DPWarning, match="noise_multiplier=0"):
        report = audit_dpsgd(
            lambda: torch.nn.Sequential(
                torch.nn.Linear(10, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2)
            ),
            small_classification_data(),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            sample_rate=0.2,
            steps=200,
            num_canaries=200,
            learning_rate=2.0,
            canary=InputCanaries(),
        )
    assert report.canary == "input" and report.scores.shape == (200,)
    gap = report.scores[report.included].mean() - report.scores[~report.included].mean()
    assert gap > 2.0


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_canaries": 1}, DPValueError, "num_canaries"),
        ({"canary": "poison"}, DPValueError, "canary='poison'"),
        ({"canary": 3}, DPTypeError, "canary=3"),
        ({"steps": 0}, DPValueError, "steps=0"),
        ({"sample_rate": 1.5}, DPValueError, "sample_rate=1.5"),
    ],
)
def test_bad_arguments_are_refused(overrides: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _audit(**overrides)


def test_bad_data_is_refused() -> None:
    with pytest.raises(DPValueError, match="integer class tensor"):
        audit_dpsgd(
            small_mlp,
            (torch.randn(8, 10), torch.randn(8)),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.5,
            steps=2,
        )
    with pytest.raises(DPTypeError, match="TensorDataset"):
        audit_dpsgd(
            small_mlp,
            [torch.randn(8, 10)],  # type: ignore[arg-type]
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.5,
            steps=2,
        )
