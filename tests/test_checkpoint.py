"""Checkpoints: bit-exact resume, the spent budget carried over, atomic writes, safe loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

from dptorch import BatchMemoryManager, DPTypeError, DPValueError, PrivacyEngine
from dptorch.checkpoint import ResumeInfo

DATASET = 40
BATCH = 8  # q = 8/40, round(1/q) = 5 steps per pass
TOTAL_STEPS = 12
DELTA = 1e-5


@dataclass
class Run:
    engine: PrivacyEngine
    model: nn.Module
    optimizer: Any
    loader: Any
    scheduler: StepLR

    def parts(self) -> dict[str, Any]:
        return {
            "module": self.model,
            "optimizer": self.optimizer,
            "data_loader": self.loader,
            "extras": {"scheduler": self.scheduler},
        }


def _dataset() -> TensorDataset:
    data = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(DATASET, 4, generator=data), torch.arange(DATASET) % 2)


def _build(
    *,
    own_noise_generator: bool = False,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    batch_size: int = BATCH,
    accountant: str = "rdp",
) -> Run:
    torch.manual_seed(0)
    # Dropout draws from torch's global RNG, so bit-exactness also tests that it is restored.
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    engine = PrivacyEngine(accountant=accountant)
    model, dp_optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(_dataset(), batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator().manual_seed(7) if own_noise_generator else None,
    )
    return Run(engine, model, dp_optimizer, loader, StepLR(optimizer, step_size=3, gamma=0.5))


def _train(run: Run, *, until: int, done: int = 0) -> None:
    """Step until ``until`` steps are done in all; each ``for`` is one (maybe resumed) pass."""
    while done < until:
        for x, y in run.loader:
            run.optimizer.zero_grad()
            F.cross_entropy(run.model(x), y).backward()
            run.optimizer.step()
            run.scheduler.step()
            done += 1
            if done == until:
                return


def _assert_same_run(resumed: Run, reference: Run) -> None:
    for (name, mine), theirs in zip(
        resumed.model.state_dict().items(), reference.model.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), name
    for mine, theirs in zip(
        resumed.optimizer.state.values(), reference.optimizer.state.values(), strict=True
    ):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()
    assert resumed.engine.accountant.history == reference.engine.accountant.history
    assert resumed.engine.get_epsilon(DELTA) == reference.engine.get_epsilon(DELTA)


@pytest.mark.parametrize("own_noise_generator", [False, True], ids=["global-rng", "generator"])
@pytest.mark.parametrize("interrupt_at", [3, 5, 7], ids=["mid-pass", "pass-end", "second-pass"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, interrupt_at: int, own_noise_generator: bool
) -> None:
    reference = _build(own_noise_generator=own_noise_generator)
    _train(reference, until=TOTAL_STEPS)

    first = _build(own_noise_generator=own_noise_generator)
    _train(first, until=interrupt_at)
    path = tmp_path / "run.pt"
    first.engine.save_checkpoint(path=path, **first.parts(), metadata={"note": "k"})
    epsilon_at_save = first.engine.get_epsilon(DELTA)

    torch.manual_seed(999)  # a new process: the global RNG is somewhere else entirely
    resumed = _build(own_noise_generator=own_noise_generator)
    info = resumed.engine.load_checkpoint(path=path, **resumed.parts())
    assert info == ResumeInfo(steps=interrupt_at, position=interrupt_at % 5, metadata={"note": "k"})
    assert resumed.engine.get_epsilon(DELTA) == epsilon_at_save > 0  # the spent budget
    _train(resumed, until=TOTAL_STEPS, done=interrupt_at)
    _assert_same_run(resumed, reference)


def test_a_crash_while_replacing_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _build()
    _train(run, until=2)
    path = tmp_path / "run.pt"
    run.engine.save_checkpoint(path=path, **run.parts())
    _train(run, until=4, done=2)

    def crash(*args: object) -> None:
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        run.engine.save_checkpoint(path=path, **run.parts())
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temp file left
    fresh = _build()
    assert fresh.engine.load_checkpoint(path=path, **fresh.parts()).steps == 2


def test_a_crash_mid_write_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _build()
    _train(run, until=2)
    path = tmp_path / "run.pt"
    run.engine.save_checkpoint(path=path, **run.parts())
    before = path.read_bytes()

    def torn_save(obj: object, file: Any) -> None:
        file.write(b"half a checkpoint")
        raise RuntimeError("simulated crash in torch.save")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(RuntimeError, match="crash"):
        run.engine.save_checkpoint(path=path, **run.parts())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        ({"noise_multiplier": 1.1}, "noise_multiplier: checkpoint 1.0, this run 1.1"),
        ({"max_grad_norm": 0.5}, "max_grad_norm: checkpoint 1.0, this run 0.5"),
        ({"batch_size": 10}, "sample_rate: checkpoint 0.2, this run 0.25"),
        ({"accountant": "prv"}, "accountant: checkpoint 'rdp', this run 'prv'"),
        ({"own_noise_generator": True}, "noise generator"),
    ],
)
def test_other_dp_settings_are_refused_and_nothing_changes(
    tmp_path: Path, changed: dict[str, Any], field: str
) -> None:
    run = _build()
    _train(run, until=2)
    path = tmp_path / "run.pt"
    run.engine.save_checkpoint(path=path, **run.parts())

    other = _build(**changed)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(DPValueError, match="cannot resume this run") as info:
        other.engine.load_checkpoint(path=path, **other.parts())
    assert field in str(info.value)
    assert len(other.engine.accountant) == 0
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_all_differences_are_reported_at_once(tmp_path: Path) -> None:
    run = _build()
    path = tmp_path / "run.pt"
    run.engine.save_checkpoint(path=path, **run.parts())
    other = _build(noise_multiplier=2.0, max_grad_norm=3.0)
    with pytest.raises(DPValueError) as info:
        other.engine.load_checkpoint(path=path, **other.parts())
    assert "noise_multiplier" in str(info.value) and "max_grad_norm" in str(info.value)


def test_loading_over_recorded_steps_is_refused(tmp_path: Path) -> None:
    run = _build()
    _train(run, until=2)
    path = tmp_path / "run.pt"
    run.engine.save_checkpoint(path=path, **run.parts())
    busy = _build()
    _train(busy, until=3)
    with pytest.raises(DPValueError, match="under-report"):
        busy.engine.load_checkpoint(path=path, **busy.parts())


def test_missing_extras_and_loader_are_named(tmp_path: Path) -> None:
    run = _build()
    path = tmp_path / "run.pt"
    run.engine.save_checkpoint(path=path, **run.parts())
    other = _build()
    with pytest.raises(DPValueError) as info:
        other.engine.load_checkpoint(path=path, module=other.model, optimizer=other.optimizer)
    assert "data_loader" in str(info.value) and "['scheduler']" in str(info.value)


class _Arbitrary:
    """Any class: unpickling it could run code, so weights_only loading must refuse it."""


def test_checkpoints_are_loaded_with_weights_only(tmp_path: Path) -> None:
    run = _build()
    path = tmp_path / "run.pt"
    run.engine.save_checkpoint(path=path, **run.parts())
    saved = torch.load(path, weights_only=True)
    saved["metadata"] = {"payload": _Arbitrary()}
    torch.save(saved, path)
    fresh = _build()
    with pytest.raises(DPValueError, match=r"weights_only=True"):
        fresh.engine.load_checkpoint(path=path, **fresh.parts())


def test_values_that_could_not_be_loaded_are_refused_at_save(tmp_path: Path) -> None:
    run = _build()
    path = tmp_path / "run.pt"
    with pytest.raises(DPTypeError, match=r"checkpoint\['metadata'\]\['best'\] is a _Arbitrary"):
        run.engine.save_checkpoint(path=path, **run.parts(), metadata={"best": _Arbitrary()})
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    run = _build()
    with pytest.raises(DPValueError, match="not a dptorch checkpoint"):
        run.engine.load_checkpoint(path=path, **run.parts())


def test_an_optimizer_from_another_engine_is_refused(tmp_path: Path) -> None:
    run, other = _build(), _build()
    with pytest.raises(DPValueError, match="not made private by this engine"):
        run.engine.save_checkpoint(
            path=tmp_path / "run.pt", module=run.model, optimizer=other.optimizer
        )


def test_saving_inside_a_logical_batch_is_refused(tmp_path: Path) -> None:
    run = _build()
    run.optimizer.set_accumulating(True)  # as BatchMemoryManager does for a non-final part
    x, y = next(iter(run.loader))
    F.cross_entropy(run.model(x), y).backward()
    run.optimizer.step()
    with pytest.raises(DPValueError, match="middle of a logical batch"):
        run.engine.save_checkpoint(path=tmp_path / "run.pt", **run.parts())
    assert list(tmp_path.iterdir()) == []


def _train_split(run: Run, *, until: int, done: int = 0) -> None:
    """Like ``_train``, through a BatchMemoryManager with physical batches of 3."""
    while done < until:
        with BatchMemoryManager(
            data_loader=run.loader, max_physical_batch_size=3, optimizer=run.optimizer
        ) as physical:
            for x, y in physical:
                run.optimizer.zero_grad()
                F.cross_entropy(run.model(x), y).backward()
                run.optimizer.step()
                if run.optimizer.is_accumulating:
                    continue
                run.scheduler.step()
                done += 1
                if done == until:
                    return


@pytest.mark.parametrize("interrupt_at", [3, 7], ids=["mid-pass", "second-pass"])
def test_resume_under_batch_memory_manager_is_bit_exact(tmp_path: Path, interrupt_at: int) -> None:
    reference = _build(own_noise_generator=True)
    _train_split(reference, until=TOTAL_STEPS)

    first = _build(own_noise_generator=True)
    _train_split(first, until=interrupt_at)
    path = tmp_path / "run.pt"
    first.engine.save_checkpoint(path=path, **first.parts())

    torch.manual_seed(999)
    resumed = _build(own_noise_generator=True)
    info = resumed.engine.load_checkpoint(path=path, **resumed.parts())
    assert info.position == interrupt_at % 5
    _train_split(resumed, until=TOTAL_STEPS, done=interrupt_at)
    _assert_same_run(resumed, reference)
