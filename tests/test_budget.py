"""The hard privacy budget: the step that would exceed it is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptorch
from dptorch import BatchMemoryManager, DPOptimizer, PrivacyBudgetExceededError, PrivacyEngine
from dptorch import budget as budget_module
from dptorch.accountants import create_accountant
from dptorch.budget import PrivacyBudget
from dptorch.errors import DPError, DPValueError

N = 100
Q = 0.2  # batch_size 20 of 100
DELTA = 1e-5


def _private(
    *,
    accountant: str = "prv",
    sigma: float = 1.0,
    max_epsilon: float | None = None,
) -> tuple[nn.Module, DPOptimizer, DataLoader, PrivacyEngine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    data = TensorDataset(torch.randn(N, 5), torch.randint(0, 2, (N,)))
    engine = PrivacyEngine(accountant=accountant)
    options = {} if max_epsilon is None else {"max_epsilon": max_epsilon, "budget_delta": DELTA}
    _, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        data_loader=DataLoader(data, batch_size=20, generator=torch.Generator().manual_seed(1)),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(2),
        **options,
    )
    return model, optimizer, loader, engine


def _epsilon_after(accountant: str, sigma: float, steps: int) -> float:
    reference = create_accountant(accountant)
    reference.load_state_dict({"mechanism": accountant, "history": [(sigma, Q, steps)]})
    return reference.get_epsilon(DELTA)


def _step(model: nn.Module, optimizer: DPOptimizer, batch: tuple[torch.Tensor, ...]) -> None:
    x, y = batch
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_step_past_the_budget_is_refused_and_changes_nothing(accountant: str) -> None:
    # A budget between epsilon after 7 and after 8 steps: exactly 7 steps fit.
    budget = (_epsilon_after(accountant, 1.0, 7) + _epsilon_after(accountant, 1.0, 8)) / 2
    model, optimizer, loader, engine = _private(accountant=accountant, max_epsilon=budget)
    assert engine.steps_left() == 7
    batches = [batch for _ in range(2) for batch in loader]  # 10 logical batches
    for batch in batches[:7]:
        _step(model, optimizer, batch)
    assert engine.steps_left() == 0
    params = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    history = list(engine.accountant.history)

    with pytest.raises(PrivacyBudgetExceededError) as refused:
        _step(model, optimizer, batches[7])

    error = refused.value
    assert error.epsilon_spent == pytest.approx(engine.get_epsilon(DELTA))
    assert error.epsilon_spent <= budget < error.epsilon_after
    assert error.max_epsilon == budget and error.delta == DELTA
    message = str(error)
    assert f"{error.epsilon_spent:.4g}" in message and f"{budget:g}" in message
    assert "engine.set_budget" in message and "noise_multiplier" in message
    # Nothing moved: parameters, optimizer state (Adam moments, step count), accountant.
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]), name
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, optimizer_state["state"][key][name]), (key, name)
    assert engine.accountant.history == history
    assert optimizer.logical_steps == 7
    assert engine.get_epsilon(DELTA) <= budget


def test_more_noise_fits_where_the_old_noise_did_not() -> None:
    budget = _epsilon_after("prv", 1.0, 3) * 1.0001
    model, optimizer, loader, engine = _private(max_epsilon=budget)
    batches = list(loader)
    for batch in batches[:3]:
        _step(model, optimizer, batch)
    with pytest.raises(PrivacyBudgetExceededError):
        _step(model, optimizer, batches[3])
    optimizer.noise_multiplier = 50.0  # almost free: one more step fits
    assert engine.steps_left() >= 1
    _step(model, optimizer, batches[3])
    assert engine.accountant.history == [(1.0, Q, 3), (50.0, Q, 1)]
    assert engine.get_epsilon(DELTA) <= budget


def test_refusal_comes_at_the_first_physical_batch_of_a_logical_batch() -> None:
    budget = _epsilon_after("prv", 1.0, 2) * 1.0001
    model, optimizer, loader, engine = _private(max_epsilon=budget)
    seen = []
    with (
        pytest.raises(PrivacyBudgetExceededError),
        BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=4, optimizer=optimizer
        ) as physical,
    ):
        for batch in physical:
            seen.append(optimizer.logical_steps)
            _step(model, optimizer, batch)
    # Refused on the first physical batch after the 2nd logical step: nothing accumulated.
    assert seen[-1] == 2 and seen.count(2) == 1
    assert optimizer.logical_steps == 2 and len(engine.accountant) == 2


def test_the_check_does_not_compose_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    searches = []
    real_search = budget_module._search_steps_left

    def counting_search(*args: object, **kwargs: object) -> int:
        searches.append(args)
        return real_search(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(budget_module, "_search_steps_left", counting_search)
    model, optimizer, loader, engine = _private(max_epsilon=50.0)
    for batch in loader:
        _step(model, optimizer, batch)
    assert len(searches) == 1  # 5 steps, one search
    optimizer.noise_multiplier = 2.0
    for batch in loader:
        _step(model, optimizer, batch)
    assert len(searches) == 2  # a new sigma, one more search
    assert engine.accountant.history == [(1.0, Q, 5), (2.0, Q, 5)]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_steps_left_is_the_largest_count_within_budget(accountant: str) -> None:
    reference = create_accountant(accountant)
    reference.load_state_dict({"mechanism": accountant, "history": [(0.8, Q, 4)]})
    limit = reference.get_epsilon(DELTA) + 2.0
    budget = PrivacyBudget(epsilon=limit, delta=DELTA)
    left = budget.steps_left(reference, noise_multiplier=1.5, sample_rate=Q)
    assert left > 3

    def epsilon(steps: int) -> float:
        probe = create_accountant(accountant)
        probe.load_state_dict({"mechanism": accountant, "history": [(0.8, Q, 4), (1.5, Q, steps)]})
        return probe.get_epsilon(DELTA)

    assert epsilon(left) <= limit < epsilon(left + 1)
    # Counting down as the accountant records steps at the planned settings.
    for _ in range(3):
        reference.step(noise_multiplier=1.5, sample_rate=Q)
    assert budget.steps_left(reference, noise_multiplier=1.5, sample_rate=Q) == left - 3


def test_steps_left_follows_a_history_merged_with_its_last_entry() -> None:
    reference = create_accountant("rdp")
    reference.load_state_dict({"mechanism": "rdp", "history": [(1.0, Q, 4)]})
    budget = PrivacyBudget(epsilon=8.0, delta=DELTA)
    left = budget.steps_left(reference, noise_multiplier=1.0, sample_rate=Q)
    assert left == PrivacyBudget(epsilon=8.0, delta=DELTA).steps_left(
        reference, noise_multiplier=1.0, sample_rate=Q
    )
    reference.step(noise_multiplier=1.0, sample_rate=Q)
    assert reference.history == [(1.0, Q, 5)]
    assert budget.steps_left(reference, noise_multiplier=1.0, sample_rate=Q) == left - 1


def test_no_noise_never_fits() -> None:
    with pytest.warns(dptorch.DPWarning, match="noise_multiplier=0"):
        model, optimizer, loader, engine = _private(sigma=0.0, max_epsilon=100.0)
    with pytest.raises(PrivacyBudgetExceededError, match="to inf"):
        _step(model, optimizer, next(iter(loader)))
    assert len(engine.accountant) == 0


def test_set_budget_after_make_private_and_budget_left() -> None:
    model, optimizer, loader, engine = _private()
    for batch in loader:
        _step(model, optimizer, batch)
    spent = engine.get_epsilon(DELTA)
    engine.set_budget(epsilon=spent + 0.5, delta=DELTA)
    assert engine.budget_left() == pytest.approx(0.5)
    engine.set_budget(epsilon=spent * 0.9, delta=DELTA)  # already over: nothing more runs
    assert engine.budget_left() == 0.0
    assert engine.steps_left() == 0
    with pytest.raises(PrivacyBudgetExceededError):
        _step(model, optimizer, next(iter(loader)))


def test_budget_arguments_are_checked() -> None:
    with pytest.raises(DPValueError, match=r"both max_epsilon= and budget_delta="):
        engine = PrivacyEngine()
        model = nn.Linear(2, 2)
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            max_epsilon=3.0,
        )
    with pytest.raises(DPValueError, match="max_epsilon=-1"):
        PrivacyBudget(epsilon=-1, delta=DELTA)
    with pytest.raises(DPValueError, match="delta"):
        PrivacyBudget(epsilon=1.0, delta=1.5)
    _, _, _, engine = _private()
    with pytest.raises(DPValueError, match=r"budget_left\(\) needs a privacy budget"):
        engine.budget_left()


def test_budget_state_round_trip() -> None:
    budget = PrivacyBudget(epsilon=2.5, delta=1e-6)
    restored = PrivacyBudget(epsilon=1.0, delta=0.1)
    restored.load_state_dict(budget.state_dict())
    assert (restored.epsilon, restored.delta) == (2.5, 1e-6)
    assert budget.state_dict() == {"epsilon": 2.5, "delta": 1e-6}
    with pytest.raises(DPValueError, match="lacks delta"):
        restored.load_state_dict({"epsilon": 1.0})


def test_error_is_exported_and_in_the_hierarchy() -> None:
    assert issubclass(dptorch.PrivacyBudgetExceededError, DPError)
    assert issubclass(dptorch.PrivacyBudgetExceededError, RuntimeError)
