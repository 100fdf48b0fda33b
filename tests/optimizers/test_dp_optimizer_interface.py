"""The DPOptimizer from make_private keeps the wrapped torch optimizer's interface.

PyTorch is the oracle where it can be: learning-rate schedules are compared with the same
scheduler driving a plain torch optimizer, and checkpoints with an uninterrupted run.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, StepLR
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPOptimizer, PrivacyEngine
from dptorch.errors import DPValueError, TrainingLoopError

N = 64
BATCH = 16

OptimizerFactory = Callable[[Iterator[nn.Parameter]], Optimizer]

OPTIMIZERS: list[tuple[str, OptimizerFactory]] = [
    ("sgd-momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01)),
    ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1)),
]
optimizer_cases = pytest.mark.parametrize(
    "make_optimizer", [f for _, f in OPTIMIZERS], ids=[name for name, _ in OPTIMIZERS]
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _loader(seed: int = 0) -> DataLoader:
    data = torch.Generator().manual_seed(100)
    dataset = TensorDataset(
        torch.randn(N, 4, generator=data), torch.randint(0, 2, (N,), generator=data)
    )
    return DataLoader(dataset, batch_size=BATCH, generator=torch.Generator().manual_seed(seed))


def _private(
    model: nn.Module,
    optimizer: Optimizer,
    *,
    noise_seed: int | None = 0,
    max_grad_norm: float = 1.0,
) -> tuple[PrivacyEngine, DPOptimizer, DataLoader]:
    engine = PrivacyEngine()
    generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
    _, dp_optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=_loader(),
        noise_multiplier=1.0,
        max_grad_norm=max_grad_norm,
        noise_generator=generator,
    )
    return engine, dp_optimizer, loader


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 4, generator=data), torch.randint(0, 2, (BATCH,), generator=data)


def _train_step(model: nn.Module, optimizer: Optimizer, batch: tuple[torch.Tensor, ...]) -> None:
    x, y = batch
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- the wrapped optimizer's interface ---------------------------------------------------


@optimizer_cases
def test_private_steps_train_through_the_wrapped_optimizer(
    make_optimizer: OptimizerFactory,
) -> None:
    model = _model()
    inner = make_optimizer(model.parameters())
    engine, optimizer, loader = _private(model, inner)

    assert isinstance(optimizer, Optimizer)
    assert optimizer.original_optimizer is inner
    assert optimizer.param_groups is inner.param_groups
    assert optimizer.state is inner.state
    assert optimizer.defaults is inner.defaults

    start = _params(model)
    for batch in loader:
        _train_step(model, optimizer, batch)
    assert all(not torch.equal(a, b) for a, b in zip(start, _params(model), strict=True))
    assert len(inner.state) == len(start)  # the inner optimizer kept state for every parameter
    assert engine.accountant.history == [(1.0, BATCH / N, len(loader))]


@optimizer_cases
def test_learning_rate_set_on_the_wrapper_reaches_the_inner_optimizer(
    make_optimizer: OptimizerFactory,
) -> None:
    model = _model()
    inner = make_optimizer(model.parameters())
    _, optimizer, _ = _private(model, inner)
    optimizer.param_groups[0]["lr"] = 0.0
    assert inner.param_groups[0]["lr"] == 0.0
    before = _params(model)
    _train_step(model, optimizer, _fixed_batch())
    assert _equal(_params(model), before)  # lr 0: the inner update really used the new lr


@optimizer_cases
def test_state_dict_round_trip_gives_the_same_next_step(make_optimizer: OptimizerFactory) -> None:
    model = _model()
    _, optimizer, loader = _private(model, make_optimizer(model.parameters()), noise_seed=1)
    for batch in loader:
        _train_step(model, optimizer, batch)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_model = copy.deepcopy(model.state_dict())

    restored = _model(seed=123)
    restored.load_state_dict(saved_model)
    _, restored_optimizer, _ = _private(
        restored, make_optimizer(restored.parameters()), noise_seed=5
    )
    restored_optimizer.load_state_dict(saved_optimizer)
    assert restored_optimizer.state_dict()["param_groups"] == saved_optimizer["param_groups"]

    optimizer.generator.manual_seed(5)  # both next steps draw the same noise
    _train_step(model, optimizer, _fixed_batch())
    _train_step(restored, restored_optimizer, _fixed_batch())
    assert _equal(_params(model), _params(restored))
    assert not _equal(_params(restored), list(saved_model.values()))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_gradients_and_the_captured_batch(set_to_none: bool) -> None:
    model = _model()
    _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _fixed_batch()
    F.cross_entropy(model(x), y).backward()
    optimizer.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            # dptorch never lets autograd compute the (non-private) gradient of a hooked
            # layer, so before the first step there may be no .grad to zero at all.
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    # The backward before zero_grad no longer counts: there is nothing to step on.
    with pytest.raises(TrainingLoopError, match="no backward pass"):
        optimizer.step()


def test_released_gradients_are_freed_by_zero_grad() -> None:
    """Nothing dptorch keeps holds a step's noisy gradients once the user drops them, so
    they are not alive next to the next step's (peak memory: one set, not two)."""
    model = _model()
    _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train_step(model, optimizer, _fixed_batch())
    released = [weakref.ref(p.grad) for p in model.parameters()]
    assert all(ref() is not None for ref in released)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in released)
    _train_step(model, optimizer, _fixed_batch())  # the foreign-gradient check still passes


def test_step_with_closure_returns_its_loss_and_uses_its_backward() -> None:
    explicit, closed = _model(), _model()
    _, explicit_optimizer, _ = _private(explicit, torch.optim.SGD(explicit.parameters(), lr=0.1))
    _, closure_optimizer, _ = _private(closed, torch.optim.SGD(closed.parameters(), lr=0.1))
    x, y = _fixed_batch()
    losses: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        closure_optimizer.zero_grad()
        loss = F.cross_entropy(closed(x), y)
        loss.backward()
        losses.append(loss)
        return loss

    before = _params(closed)
    returned = closure_optimizer.step(closure)
    assert len(losses) == 1
    assert returned is losses[0]
    assert closure_optimizer.last_step_stats is not None
    assert closure_optimizer.last_step_stats.batch_size == BATCH

    _train_step(explicit, explicit_optimizer, (x, y))  # same noise seed, same batch
    assert _equal(_params(closed), _params(explicit))
    assert not _equal(_params(closed), before)


def test_step_without_closure_returns_none() -> None:
    model = _model()
    _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _fixed_batch()
    F.cross_entropy(model(x), y).backward()
    assert optimizer.step() is None


# --- learning-rate schedulers --------------------------------------------------------------

SchedulerFactory = Callable[[Optimizer], LRScheduler]

SCHEDULERS: list[tuple[str, SchedulerFactory]] = [
    ("step-lr", lambda o: StepLR(o, step_size=2, gamma=0.5)),
    ("lambda-lr", lambda o: LambdaLR(o, lambda epoch: 1.0 / (1 + epoch))),
    ("one-cycle-lr", lambda o: OneCycleLR(o, max_lr=0.2, total_steps=8)),
]


def _schedule(group: dict[str, Any]) -> tuple[Any, ...]:
    return (group["lr"], group.get("momentum"), group.get("betas"))


@pytest.mark.parametrize(
    "make_scheduler", [f for _, f in SCHEDULERS], ids=[name for name, _ in SCHEDULERS]
)
@pytest.mark.parametrize(
    "make_optimizer", [OPTIMIZERS[0][1], OPTIMIZERS[1][1]], ids=["sgd-momentum", "adam"]
)
def test_lr_schedulers_drive_the_dp_optimizer_like_a_torch_optimizer(
    make_scheduler: SchedulerFactory, make_optimizer: OptimizerFactory
) -> None:
    model, twin = _model(), _model()
    _, optimizer, _ = _private(model, make_optimizer(model.parameters()))
    reference = make_optimizer(twin.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        scheduler, reference_scheduler = make_scheduler(optimizer), make_scheduler(reference)
        seen, expected = [], []
        for _ in range(6):
            _train_step(model, optimizer, _fixed_batch())
            _train_step(twin, reference, _fixed_batch())
            scheduler.step()
            reference_scheduler.step()
            seen.append(_schedule(optimizer.original_optimizer.param_groups[0]))
            expected.append(_schedule(reference.param_groups[0]))
    assert seen == expected
    assert len({lr for lr, *_ in seen}) > 1  # the schedule really changed the lr
    assert scheduler.get_last_lr() == reference_scheduler.get_last_lr()


# --- refused and diagnostic parts of the interface -----------------------------------------


def test_add_param_group_is_refused_with_a_clear_error() -> None:
    model = _model()
    _, optimizer, _ = _private(model, torch.optim.Adam(model.parameters(), lr=0.01))
    groups_before = len(optimizer.param_groups)
    with pytest.raises(DPValueError, match=r"add_param_group.*before make_private"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(optimizer.param_groups) == groups_before
    assert len(optimizer.original_optimizer.param_groups) == groups_before


def test_step_hooks_registered_on_the_dp_optimizer_run_once_per_step() -> None:
    model = _model()
    _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    for _ in range(2):
        _train_step(model, optimizer, _fixed_batch())
    assert calls == ["pre", "post", "pre", "post"]


def _run(noise_seed: int) -> list[torch.Tensor]:
    model = _model()
    _, optimizer, loader = _private(
        model, torch.optim.Adam(model.parameters(), lr=0.01), noise_seed=noise_seed
    )
    for batch in loader:
        _train_step(model, optimizer, batch)
    return _params(model)


def test_a_seeded_noise_generator_makes_runs_reproducible() -> None:
    first, again, other = _run(noise_seed=1), _run(noise_seed=1), _run(noise_seed=2)
    assert _equal(first, again)
    assert all(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    ("max_grad_norm", "expected_fraction"),
    [(1e6, 0.0), (1e-6, 1.0), (1.0, None)],
    ids=["nothing-clipped", "everything-clipped", "some-clipped"],
)
def test_last_step_stats_report_the_realised_batch_and_clipped_fraction(
    max_grad_norm: float, expected_fraction: float | None
) -> None:
    model = _model()
    _, optimizer, loader = _private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=max_grad_norm
    )
    assert optimizer.last_step_stats is None
    sizes = []
    for batch in loader:  # Poisson batches: sizes vary around BATCH
        _train_step(model, optimizer, batch)
        stats = optimizer.last_step_stats
        assert stats is not None
        assert stats.batch_size == len(batch[0])
        assert 0.0 <= stats.clipped_fraction <= 1.0
        if expected_fraction is not None and stats.batch_size > 0:
            assert stats.clipped_fraction == expected_fraction
        sizes.append(stats.batch_size)
    assert len(sizes) == len(loader)


def test_released_gradient_is_the_seeded_noise_plus_the_normalised_clipped_sum() -> None:
    """The release accumulates each clipped sum into the noise buffer inside its product;
    it must equal the mechanism written out: the same seeded draw, plus the clipped sum
    formed on its own (``ClipPlan.sums``), divided by ``q N``."""
    from dptorch.noise import gaussian_noise

    model = _model()
    _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_seed=3)
    x, y = _fixed_batch()
    F.cross_entropy(model(x), y).backward()
    plan = optimizer.engine.clip(optimizer.clipping)
    sums = plan.sums()
    optimizer.step()
    params = list(model.parameters())
    divisor = optimizer.expected_batch_size
    noise = gaussian_noise(
        torch.Size([sum(p.numel() for p in params)]),
        std=optimizer.noise_multiplier * optimizer.max_grad_norm / divisor,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(3),
    )
    for param, drawn in zip(params, noise.split([p.numel() for p in params]), strict=True):
        expected = drawn.view(param.shape) + sums[param] / divisor
        torch.testing.assert_close(param.grad, expected)


# --- the release buffer is reused, never under a gradient the user still holds -----------


def _release(model: nn.Module, optimizer: DPOptimizer, batch: tuple[torch.Tensor, ...]) -> None:
    x, y = batch
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_release_reuses_its_buffer_once_zero_grad_dropped_the_gradients() -> None:
    model = _model()
    _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = _fixed_batch()
    _release(model, optimizer, batch)
    first = next(model.parameters()).grad
    assert first is not None
    storage = first.untyped_storage().data_ptr()
    del first
    optimizer.zero_grad()  # set_to_none: nothing views the buffer any more
    _release(model, optimizer, batch)
    second = next(model.parameters()).grad
    assert second is not None and second.untyped_storage().data_ptr() == storage


@pytest.mark.parametrize("how", ["user holds a gradient", "zero_grad(set_to_none=False)"])
def test_release_never_overwrites_a_gradient_still_held(how: str) -> None:
    model = _model()
    _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = _fixed_batch()
    _release(model, optimizer, batch)
    held = [p.grad for p in model.parameters()]
    values = [g.clone() for g in held if g is not None]
    optimizer.zero_grad(set_to_none=how == "user holds a gradient")
    if how == "zero_grad(set_to_none=False)":
        values = [torch.zeros_like(v) for v in values]  # zeroed in place, as torch does
    _release(model, optimizer, batch)
    assert all(torch.equal(g, v) for g, v in zip(held, values, strict=True))
    assert all(p.grad is not g for p, g in zip(model.parameters(), held, strict=True))


def test_reused_and_fresh_release_buffers_give_the_same_gradients() -> None:
    """Drawing into the kept buffer or into fresh memory is the same draw from the same
    generator, so a seeded run does not depend on whether the user kept last step's grads."""
    batch = _fixed_batch()
    runs = []
    for keep_grads in (False, True):
        model = _model()
        _, optimizer, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.1))
        kept, grads = [], []
        for _ in range(3):
            optimizer.zero_grad()
            _release(model, optimizer, batch)
            step_grads = [p.grad for p in model.parameters()]
            grads.append([g.clone() for g in step_grads if g is not None])
            if keep_grads:
                kept.append(step_grads)
            del step_grads
        runs.append(grads)
    for reused, fresh in zip(*runs, strict=True):
        assert _equal(reused, fresh)


def test_release_buffers_are_kept_on_the_cpu_only() -> None:
    from dptorch.optimizers.release_buffers import ReleaseBuffers

    buffers = ReleaseBuffers()
    for device in ("cpu", "meta"):  # meta stands in for an accelerator here
        key = (torch.device(device), torch.float32)
        buffer = torch.empty(6, device=device)
        buffers.keep(key, buffer, [])
        kept = buffers.reusable(key, 6)
        assert (kept is buffer) == (device == "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secure_release_reuses_its_buffer_and_never_overwrites_a_held_gradient(
    dtype: torch.dtype,
) -> None:
    pytest.importorskip("cryptography")
    model = _model().to(dtype)
    _, optimizer, _ = PrivacyEngine(secure_mode=True).make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=_loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    x, y = _fixed_batch()
    batch = (x.to(dtype), y)
    _release(model, optimizer, batch)
    held = next(model.parameters()).grad
    assert held is not None
    value = held.clone()
    optimizer.zero_grad()  # the user still holds `held`: the next release must not reuse it
    _release(model, optimizer, batch)
    assert torch.equal(held, value)
    del held
    optimizer.zero_grad()
    _release(model, optimizer, batch)  # draws into the buffer the second release made
    storage = next(model.parameters()).grad.untyped_storage().data_ptr()
    optimizer.zero_grad()
    _release(model, optimizer, batch)
    assert next(model.parameters()).grad.untyped_storage().data_ptr() == storage


def test_a_reused_buffer_keeps_nothing_of_the_last_step_without_noise() -> None:
    """noise_multiplier 0 draws zeros into the reused buffer: the second release is the
    clipped sum alone, as the first was, not the sum added to what the buffer held."""
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise 0: "not private"
        _, optimizer, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            data_loader=_loader(),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
        )
    batch = _fixed_batch()
    _release(model, optimizer, batch)
    first = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    optimizer.zero_grad()
    _release(model, optimizer, batch)  # lr 0: same weights, same batch, same sum
    assert _equal([p.grad for p in model.parameters() if p.grad is not None], first)
