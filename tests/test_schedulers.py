"""Noise and clipping schedulers: every change reaches the accountant, the clipping and the noise."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPOptimizer, PrivacyEngine
from dptorch.accountants import create_accountant
from dptorch.errors import DPTypeError, DPValueError
from dptorch.schedulers import (
    ExponentialGradClip,
    ExponentialNoise,
    LambdaGradClip,
    LambdaNoise,
    StepGradClip,
    StepNoise,
)

N = 60
BATCH = 15  # q = 0.25, 4 steps per epoch
Q = BATCH / N
DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0:dptorch.DPWarning")


def _private(
    *, sigma: float = 1.0, clip: float = 1.0, accountant: str = "prv", reduction: str = "mean"
) -> tuple[nn.Module, DPOptimizer, DataLoader, PrivacyEngine]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(N, 4), torch.randint(0, 2, (N,)))
    engine = PrivacyEngine(accountant=accountant)
    _, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=BATCH, generator=torch.Generator().manual_seed(1)),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        loss_reduction=reduction,  # type: ignore[arg-type]
    )
    return model, optimizer, loader, engine


def _epoch(model: nn.Module, optimizer: DPOptimizer, loader: DataLoader) -> None:
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


NOISE_SCHEDULES: list[tuple[str, Callable[[DPOptimizer], object], list[float]]] = [
    ("exponential", lambda o: ExponentialNoise(o, gamma=0.5), [2.0, 1.0, 0.5, 0.25]),
    ("step", lambda o: StepNoise(o, step_size=2, gamma=0.5), [2.0, 2.0, 1.0, 1.0]),
    ("lambda", lambda o: LambdaNoise(o, noise_lambda=lambda e: 1 + e), [2.0, 4.0, 6.0, 8.0]),
]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(
    ("make", "sigmas"),
    [(m, s) for _, m, s in NOISE_SCHEDULES],
    ids=[n for n, _, _ in NOISE_SCHEDULES],
)
def test_noise_schedule_is_what_the_accountant_composes(
    make: Callable[[DPOptimizer], object], sigmas: list[float], accountant: str
) -> None:
    model, optimizer, loader, engine = _private(sigma=2.0, accountant=accountant)
    scheduler = make(optimizer)
    for _ in sigmas:
        _epoch(model, optimizer, loader)
        scheduler.step()  # type: ignore[attr-defined]
    # One (sigma, q, steps) segment per schedule value (equal neighbours share one).
    expected: list[tuple[float, float, int]] = []
    for sigma in sigmas:
        if expected and expected[-1][0] == sigma:
            expected[-1] = (sigma, Q, expected[-1][2] + 4)
        else:
            expected.append((sigma, Q, 4))
    assert [(pytest.approx(s), q, k) for s, q, k in engine.accountant.history] == expected
    # Epsilon is the composition of exactly those segments, and not of a constant sigma.
    direct = create_accountant(accountant)
    direct.load_state_dict({"mechanism": accountant, "history": expected})
    assert engine.get_epsilon(DELTA) == pytest.approx(direct.get_epsilon(DELTA), rel=1e-9)
    constant = create_accountant(accountant)
    constant.load_state_dict({"mechanism": accountant, "history": [(2.0, Q, 16)]})
    assert not math.isclose(engine.get_epsilon(DELTA), constant.get_epsilon(DELTA), rel_tol=1e-3)


def test_schedules_follow_the_opacus_formulas() -> None:
    _, optimizer, _, _ = _private(sigma=1.0, clip=2.0)
    step_noise = StepNoise(optimizer, step_size=3, gamma=0.1)
    values = [optimizer.noise_multiplier]
    for _ in range(6):
        step_noise.step()
        values.append(optimizer.noise_multiplier)
    assert values == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    assert step_noise.get_noise_multiplier() == pytest.approx(0.01)
    clip = StepGradClip(optimizer, step_size=2, gamma=2.0)
    norms = [optimizer.max_grad_norm]
    for _ in range(4):
        clip.step()
        norms.append(optimizer.max_grad_norm)
    assert norms == pytest.approx([2, 2, 4, 4, 8])
    lam = LambdaGradClip(optimizer, scheduler_function=lambda e: 1 / (1 + e))
    lam.step()
    assert optimizer.max_grad_norm == pytest.approx(4.0)  # 8 * 1/2
    assert lam.get_max_grad_norm() == pytest.approx(4.0)


def test_clip_schedule_changes_clipping_and_noise_std_together() -> None:
    # loss_reduction="sum" and one example far outside the clip: the released gradient
    # (noise 0) has norm exactly max_grad_norm, whatever the schedule made it.
    model, optimizer, _, _ = _private(sigma=0.0, clip=1.0, reduction="sum")
    scheduler = ExponentialGradClip(optimizer, gamma=0.25)
    scheduler.step()
    assert optimizer.max_grad_norm == 0.25
    optimizer.zero_grad()
    (model(torch.full((1, 4), 100.0)).sum() * 10).backward()
    optimizer.step()
    released = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert released.norm().item() == pytest.approx(0.25, rel=1e-5)

    # Noise std is sigma * C with the new C: a zero-gradient step releases only noise.
    big = nn.Linear(100, 50)  # 5050 coordinates
    engine = PrivacyEngine()
    _, noisy, _ = engine.make_private(
        module=big,
        optimizer=torch.optim.SGD(big.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.randn(N, 100)), batch_size=BATCH),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        loss_reduction="sum",
        noise_generator=torch.Generator().manual_seed(5),
    )
    ExponentialGradClip(noisy, gamma=0.3).step()
    noisy.zero_grad()
    (big(torch.randn(3, 100)) * 0.0).sum().backward()
    noisy.step()
    noise = torch.cat([p.grad.flatten() for p in big.parameters()]).double()
    # Relative standard error of a std over 5050 draws is 1/sqrt(2*5050) = 1%; allow 4%.
    assert noise.std().item() == pytest.approx(2.0 * 0.3, rel=0.04)


@pytest.mark.parametrize(
    ("make", "attribute"),
    [
        (lambda o: ExponentialNoise(o, gamma=0.9), "noise_multiplier"),
        (lambda o: StepNoise(o, step_size=2, gamma=0.5), "noise_multiplier"),
        (lambda o: ExponentialGradClip(o, gamma=1.5), "max_grad_norm"),
        (lambda o: StepGradClip(o, step_size=1, gamma=0.5), "max_grad_norm"),
    ],
    ids=["exp-noise", "step-noise", "exp-clip", "step-clip"],
)
def test_state_dict_resumes_the_schedule(
    make: Callable[[DPOptimizer], object], attribute: str
) -> None:
    _, optimizer, _, _ = _private(sigma=1.2, clip=0.8)
    scheduler = make(optimizer)
    for _ in range(3):
        scheduler.step()  # type: ignore[attr-defined]
    state = scheduler.state_dict()  # type: ignore[attr-defined]
    assert all(isinstance(v, int | float) for v in state.values())

    _, resumed_optimizer, _, _ = _private(sigma=1.2, clip=0.8)
    resumed = make(resumed_optimizer)
    resumed.load_state_dict(state)  # type: ignore[attr-defined]
    assert getattr(resumed_optimizer, attribute) == getattr(optimizer, attribute)
    scheduler.step()  # type: ignore[attr-defined]
    resumed.step()  # type: ignore[attr-defined]
    assert getattr(resumed_optimizer, attribute) == getattr(optimizer, attribute)

    with pytest.raises(DPValueError, match="Build the scheduler with the settings"):
        make(resumed_optimizer).load_state_dict({**state, "last_epoch": 1, "gamma": 7.0})  # type: ignore[attr-defined]


def test_bad_settings_are_refused() -> None:
    _, optimizer, _, _ = _private()
    with pytest.raises(DPValueError, match=r"gamma=0 must be a positive finite factor"):
        ExponentialNoise(optimizer, gamma=0)
    with pytest.raises(DPValueError, match=r"step_size=0 must be a positive int"):
        StepGradClip(optimizer, step_size=0, gamma=0.5)
    with pytest.raises(DPTypeError, match=r"noise_lambda=3 must be a function"):
        LambdaNoise(optimizer, noise_lambda=3)  # type: ignore[arg-type]
    with pytest.raises(DPTypeError, match="is not a DPOptimizer"):
        ExponentialNoise(optimizer.original_optimizer, gamma=0.5)  # type: ignore[arg-type]
    scheduler = LambdaNoise(optimizer, noise_lambda=lambda e: 1 - e)
    with pytest.raises(DPValueError, match=r"LambdaNoise gave noise_multiplier=-1.0 at epoch 2"):
        scheduler.step()
        scheduler.step()
    assert optimizer.noise_multiplier == 0.0  # the last accepted value (epoch 1)
