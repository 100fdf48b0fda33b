"""make_private_with_epsilon: the planned run spends at most the target, and not much less."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPValueError, DPWarning, PrivacyEngine
from dptorch.cli import main


def _setup(size: int = 200) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    data = TensorDataset(torch.randn(size, 5), torch.randint(0, 2, (size,)))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=20)


def _calibrate_and_train(engine: PrivacyEngine, *, target_epsilon: float, epochs: int) -> int:
    """Make ``_setup()``'s model private for ``target_epsilon`` at delta 1e-3 over ``epochs``,
    run them all, and return the number of steps taken."""
    model, optimizer, loader = _setup()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=target_epsilon,
        target_delta=1e-3,
        epochs=epochs,
        max_grad_norm=1.0,
    )
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return epochs * len(loader)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_planned_run_lands_just_under_the_target(accountant: str) -> None:
    engine = PrivacyEngine(accountant=accountant)
    steps = _calibrate_and_train(engine, target_epsilon=2.0, epochs=3)
    assert len(engine.accountant) == steps
    spent = engine.get_epsilon(1e-3)
    assert 2.0 - 0.011 <= spent <= 2.0


def test_needs_exactly_one_of_epochs_and_steps() -> None:
    model, optimizer, loader = _setup()
    for duration in ({}, {"epochs": 1, "steps": 10}):
        with pytest.raises(DPValueError, match="exactly one of epochs= or steps="):
            PrivacyEngine().make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=2.0,
                target_delta=1e-5,
                max_grad_norm=1.0,
                **duration,
            )


def test_delta_above_one_over_n_warns() -> None:
    model, optimizer, loader = _setup(size=200)
    with pytest.warns(DPWarning, match="1/N|1 / N|dataset"):
        PrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=2.0,
            target_delta=0.01,
            steps=10,
            max_grad_norm=1.0,
        )


def test_cli_epsilon_and_noise_agree(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "noise",
                "--target-epsilon",
                "3",
                "--delta",
                "1e-5",
                "--sample-rate",
                "0.01",
                "--epochs",
                "5",
                "--accountant",
                "rdp",
                "--json",
            ]
        )
        == 0
    )
    noise = json.loads(capsys.readouterr().out)
    assert noise["epsilon"] <= 3.0
    assert (
        main(
            [
                "epsilon",
                "--sample-rate",
                "0.01",
                "--noise-multiplier",
                str(noise["noise_multiplier"]),
                "--steps",
                str(noise["steps"]),
                "--delta",
                "1e-5",
                "--accountant",
                "rdp",
                "--json",
            ]
        )
        == 0
    )
    epsilon = json.loads(capsys.readouterr().out)
    assert epsilon["epsilon"] == pytest.approx(noise["epsilon"])
    assert epsilon["rdp_epsilon"] == epsilon["epsilon"]


def test_cli_reports_bad_input_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "epsilon",
                "--sample-rate",
                "2",
                "--noise-multiplier",
                "1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
                "--accountant",
                "rdp",
            ]
        )
        == 2
    )
    assert "sample_rate" in capsys.readouterr().err


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_already_recorded_is_counted_in_the_calibration(accountant: str) -> None:
    # Regression: the noise used to be calibrated for the planned steps alone, so an engine
    # that had already recorded releases (a loaded checkpoint, a private statistic of the
    # data) ended the planned run above target_epsilon.
    engine = PrivacyEngine(accountant=accountant)
    for _ in range(30):
        engine.accountant.step(noise_multiplier=2.0, sample_rate=0.1)
    engine.accountant.step(noise_multiplier=8.0, sample_rate=1.0)  # one full-data release
    already = engine.get_epsilon(1e-3)
    assert 0.5 < already < 2.0
    _calibrate_and_train(engine, target_epsilon=3.0, epochs=3)
    assert 3.0 - 0.011 <= engine.get_epsilon(1e-3) <= 3.0


def test_a_budget_already_spent_is_refused_with_what_it_spent() -> None:
    model, optimizer, loader = _setup()
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.step(noise_multiplier=0.3, sample_rate=1.0)
    with pytest.raises(DPValueError, match=r"already recorded.*spend epsilon=.*target_epsilon"):
        engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=2.0,
            target_delta=1e-3,
            epochs=1,
            max_grad_norm=1.0,
        )
    assert len(engine.accountant) == 1  # nothing recorded, nothing made private
