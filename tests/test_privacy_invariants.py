"""The privacy invariants of one DP-SGD step (DESIGN.md section 3), each tested directly."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.accountants import create_accountant
from dptorch.clipping import FlatClipping
from dptorch.per_sample import PerSampleEngine

pytestmark = pytest.mark.filterwarnings("ignore::dptorch.DPWarning")


def _private(
    model: nn.Module,
    *,
    sigma: float,
    clip: float,
    dataset_size: int = 100,
    batch_size: int = 10,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> tuple[PrivacyEngine, torch.optim.Optimizer, DataLoader]:
    data = TensorDataset(torch.randn(dataset_size, 50), torch.zeros(dataset_size))
    engine = PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(data, batch_size=batch_size),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        loss_reduction=reduction,
        noise_generator=generator,
    )
    return engine, optimizer, loader


def _released(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _zero_gradient_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int = 7) -> None:
    """A step whose per-sample gradients are all exactly zero, so only noise is released."""
    optimizer.zero_grad()
    (model(torch.randn(batch, 50)) * 0.0).sum().backward()
    optimizer.step()


def test_noise_std_is_sigma_c_over_expected_batch_size() -> None:
    torch.manual_seed(1)
    model = nn.Linear(50, 40)  # 2040 released coordinates
    sigma, clip = 1.3, 0.7
    _, optimizer, _ = _private(model, sigma=sigma, clip=clip)  # q*N = 10
    _zero_gradient_step(model, optimizer)
    noise = _released(model).double()
    expected_std = sigma * clip / 10
    # The sample std of n normal draws has relative standard error 1/sqrt(2n) = 1.6% here;
    # 5% is about three standard errors.
    assert noise.std().item() == pytest.approx(expected_std, rel=0.05)
    assert abs(noise.mean().item()) < 4 * expected_std / math.sqrt(noise.numel())
    assert stats.kstest(noise.numpy() / expected_std, "norm").pvalue > 1e-3


def test_noise_is_fresh_each_step_and_reproducible_with_a_seeded_generator() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(50, 3)
        gen = torch.Generator().manual_seed(seed)
        _, optimizer, _ = _private(model, sigma=1.0, clip=1.0, generator=gen)
        released = []
        for _ in range(3):
            _zero_gradient_step(model, optimizer)
            released.append(_released(model).clone())
        return released

    first, again, other = run(7), run(7), run(8)
    assert not torch.equal(first[0], first[1])  # a new draw every step
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)  # same seed, same noise
    assert not torch.equal(first[0], other[0])


def _clipped_sum(
    model: nn.Module, x: torch.Tensor, clip: float, *, squared_loss: bool = True
) -> torch.Tensor:
    engine = PerSampleEngine(model, list(model.parameters()), loss_reduction="sum")
    engine.attach()
    try:
        model.zero_grad()
        out = model(x)
        (out.pow(2) if squared_loss else out).sum().backward()
        batch = engine.clipped_sum(FlatClipping(clip))
        return torch.cat([batch.sums[p].reshape(-1) for p in model.parameters()])
    finally:
        engine.detach()


@pytest.mark.parametrize("clip", [0.1, 1.0, 10.0])
def test_add_remove_one_changes_the_clipped_sum_by_at_most_c(clip: float) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(50, 8), nn.Linear(8, 2)).double()
    x = torch.randn(12, 50, dtype=torch.float64)
    x[3] *= 1000  # an outlier whose raw gradient is far larger than C
    full = _clipped_sum(model, x, clip)
    for removed in range(len(x)):
        without = _clipped_sum(model, torch.cat([x[:removed], x[removed + 1 :]]), clip)
        assert (full - without).norm().item() <= clip * (1 + 1e-9)
    # The outlier's contribution is exactly C: the bound is attained, not loose.
    without_outlier = _clipped_sum(model, torch.cat([x[:3], x[4:]]), clip)
    assert (full - without_outlier).norm().item() == pytest.approx(clip, rel=1e-9)


def test_replacing_one_example_changes_the_clipped_sum_by_at_most_2c() -> None:
    # Replace-one adjacency is two add/remove steps, so its bound is 2C (attained by two
    # clipped gradients pointing in opposite directions); the accountants analyse add/remove.
    torch.manual_seed(3)
    model = nn.Linear(50, 1, bias=False).double()
    x = torch.randn(5, 50, dtype=torch.float64)
    replaced = x.clone()
    replaced[0] = -x[0] * 100
    clip = 0.5
    # A linear loss: the gradient of example i is x_i, so the replacement points the other way.
    original = _clipped_sum(model, x, clip, squared_loss=False)
    diff = (original - _clipped_sum(model, replaced, clip, squared_loss=False)).norm().item()
    assert diff <= 2 * clip * (1 + 1e-9)
    assert diff > clip  # more than C: the 2C bound is the honest one for replacement


def test_nonfinite_example_gets_factor_zero_and_is_counted() -> None:
    torch.manual_seed(4)
    model = nn.Linear(50, 2).double()
    x = torch.randn(6, 50, dtype=torch.float64)
    engine = PerSampleEngine(model, list(model.parameters()), loss_reduction="sum")
    engine.attach()
    poisoned = x.clone()
    poisoned[2] = float("nan")
    model(poisoned).pow(2).sum().backward()
    batch = engine.clipped_sum(FlatClipping(1.0))
    engine.detach()
    assert batch.nonfinite == 1 and batch.factors[2] == 0
    clean = _clipped_sum(model, torch.cat([x[:2], x[3:]]), 1.0)
    summed = torch.cat([batch.sums[p].reshape(-1) for p in model.parameters()])
    assert torch.isfinite(summed).all()
    torch.testing.assert_close(summed, clean)


def test_accountant_records_one_event_per_step_with_the_loaders_q() -> None:
    torch.manual_seed(5)
    model = nn.Linear(50, 2)
    engine, optimizer, loader = _private(model, sigma=0.9, clip=1.0, dataset_size=200, batch_size=8)
    assert loader.sample_rate == pytest.approx(8 / 200)
    steps = 0
    for x, _ in loader:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        steps += 1
    assert steps == len(loader) == 25
    assert len(engine.accountant) == steps
    assert engine.accountant.history == [(0.9, 8 / 200, steps)]
    assert engine.accountant.mechanism() == "prv"  # the default
    reference = create_accountant("prv")
    for _ in range(steps):
        reference.step(noise_multiplier=0.9, sample_rate=8 / 200)
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5)


def test_empty_poisson_batches_train_end_to_end_with_noise_only() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(50, 4), nn.ReLU(), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(1000, 50), torch.randint(0, 2, (1000,)))
    engine = PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        # q = 1e-4: most batches are empty
        data_loader=DataLoader(data, batch_size=1, sampler=None),
        sample_rate=1e-4,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    sizes = []
    for step, (x, y) in enumerate(loader):
        if step == 20:
            break
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # NaN for an empty batch
        optimizer.step()
        sizes.append(len(x))
        for p, old in zip(model.parameters(), before, strict=True):
            assert torch.isfinite(p).all()
            assert not torch.equal(p, old)  # noise still moves every parameter
    assert sizes.count(0) >= 15  # expected 1000 * 1e-4 = 0.1 examples per batch
    assert len(engine.accountant) == 20


def test_make_private_returns_the_same_module_with_unchanged_state_dict() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    keys = list(model.state_dict().keys())
    data = TensorDataset(torch.randn(20, 1, 6, 6), torch.zeros(20))
    same, _, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=5),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert same is model
    assert isinstance(same, nn.Sequential)
    assert list(same.state_dict().keys()) == keys


def test_opacus_import_paths() -> None:
    import dptorch
    from dptorch.accountants import RDPAccountant as Accountant
    from dptorch.data_loader import DPDataLoader
    from dptorch.optimizers import DPOptimizer
    from dptorch.validators import ModuleValidator

    assert dptorch.DPDataLoader is DPDataLoader
    assert dptorch.DPOptimizer is DPOptimizer
    assert dptorch.ModuleValidator is ModuleValidator
    assert Accountant.mechanism() == "rdp"
