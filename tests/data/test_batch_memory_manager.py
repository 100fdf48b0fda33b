"""BatchMemoryManager: physical batches change memory, never the update or the accounting.

The oracle is the same run without splitting: same seeds, so the same Poisson batches and
the same noise draws; with the update computed in float64 the two runs must agree to
round-off, for every norm route and per-sample rule kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import dptorch
from dptorch import BatchMemoryManager, DPOptimizer, PrivacyEngine
from dptorch.errors import DPTypeError, DPValueError, DPWarning, TrainingLoopError

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0:dptorch.DPWarning")

N = 120
CLASSES = 3


def _mlp() -> nn.Module:
    # Linear (ghost or instantiated), LayerNorm (dense rule), PReLU (torch.func fallback).
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.PReLU(8), nn.Linear(8, CLASSES))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6, CLASSES),
    )


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.embed(idx).mean(dim=1))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], Tensor]]] = {
    "mlp_norm_fallback": (_mlp, lambda n, g: torch.randn(n, 6, generator=g, dtype=torch.float64)),
    "conv_groupnorm": (_cnn, lambda n, g: torch.randn(n, 2, 6, generator=g, dtype=torch.float64)),
    "embedding": (_Tokens, lambda n, g: torch.randint(0, 11, (n, 4), generator=g)),
}


@dataclass
class Run:
    params: list[Tensor]
    optimizer_state: dict[str, object]
    history: list[tuple[float, float, int]]
    logical_steps: int
    chunk_sizes: list[int] = field(default_factory=list)
    accumulating: list[bool] = field(default_factory=list)


def _train(
    model_name: str,
    *,
    physical: int | None,
    norm_route: str = "auto",
    sigma: float = 0.0,
    batch_size: int = 30,
    num_workers: int = 0,
    n: int = N,
) -> Run:
    make_model, make_x = MODELS[model_name]
    data = torch.Generator().manual_seed(1)
    dataset = TensorDataset(make_x(n, data), torch.randint(0, CLASSES, (n,), generator=data))
    torch.manual_seed(0)
    model = make_model().double()
    engine = PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        data_loader=DataLoader(
            dataset,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(2),
            num_workers=num_workers,
        ),
        noise_multiplier=sigma,
        max_grad_norm=0.3,  # small enough that most examples are clipped
        norm_route=norm_route,  # type: ignore[arg-type]
        noise_generator=torch.Generator().manual_seed(3),
    )
    run = Run([], {}, [], 0)

    def epoch(batches: DataLoader) -> None:
        for x, y in batches:
            run.chunk_sizes.append(len(y))
            run.accumulating.append(optimizer.is_accumulating)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    if physical is None:
        epoch(loader)
    else:
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
        ) as physical_loader:
            epoch(physical_loader)
    run.params = [p.detach().clone() for p in model.parameters()]
    run.optimizer_state = optimizer.state_dict()
    run.history = list(engine.accountant.history)
    run.logical_steps = optimizer.logical_steps
    return run


def _logical_sizes(run: Run) -> list[int]:
    """Sum the physical sizes of each logical batch (a logical batch ends where the
    optimizer was not accumulating)."""
    sizes, current = [], 0
    for size, accumulating in zip(run.chunk_sizes, run.accumulating, strict=True):
        current += size
        if not accumulating:
            sizes.append(current)
            current = 0
    assert current == 0, "the run ended inside a logical batch"
    return sizes


def _assert_same_update(split: Run, whole: Run) -> None:
    for a, b in zip(split.params, whole.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    state_a, state_b = split.optimizer_state["state"], whole.optimizer_state["state"]
    assert state_a.keys() == state_b.keys()  # type: ignore[attr-defined]
    for key in state_a:  # type: ignore[attr-defined]
        for name, value in state_a[key].items():  # type: ignore[index]
            torch.testing.assert_close(value, state_b[key][name], rtol=1e-10, atol=1e-12)  # type: ignore[index]


@pytest.mark.parametrize("norm_route", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_noise_free_update_equals_the_big_batch_step(model_name: str, norm_route: str) -> None:
    whole = _train(model_name, physical=None, norm_route=norm_route)
    split = _train(model_name, physical=7, norm_route=norm_route)
    _assert_same_update(split, whole)
    # The split run really split: more physical than logical batches, none over the limit,
    # and each logical batch has exactly the examples the unsplit run drew.
    assert len(split.chunk_sizes) > len(whole.chunk_sizes)
    assert max(split.chunk_sizes) <= 7
    assert _logical_sizes(split) == whole.chunk_sizes
    # One accounting step per logical batch, none per physical one.
    assert split.history == whole.history
    assert sum(steps for _, _, steps in split.history) == len(whole.chunk_sizes)
    assert split.logical_steps == whole.logical_steps == len(whole.chunk_sizes)


def test_one_noise_draw_per_logical_batch() -> None:
    # Same noise generator: the split run matches only if it draws exactly the same noise,
    # i.e. once per logical batch with the same std and divisor.
    whole = _train("mlp_norm_fallback", physical=None, sigma=1.3)
    split = _train("mlp_norm_fallback", physical=4, sigma=1.3)
    _assert_same_update(split, whole)
    assert split.history == whole.history == [(1.3, 30 / N, 4)]


def test_accumulating_flag_marks_all_but_the_last_physical_batch() -> None:
    split = _train("mlp_norm_fallback", physical=7)
    ends = [not flag for flag in split.accumulating]
    assert sum(ends) == split.logical_steps == 4
    assert ends[-1]
    # Every non-final physical batch is full; the final one holds the rest.
    for size, end in zip(split.chunk_sizes, ends, strict=True):
        assert size == 7 or end


def test_empty_logical_batches_step_and_are_accounted() -> None:
    # q = 1/30: about a third of the logical batches are empty (this seed gives both kinds).
    whole = _train("mlp_norm_fallback", physical=None, batch_size=1, n=30)
    split = _train("mlp_norm_fallback", physical=2, batch_size=1, n=30)
    empties = sum(size == 0 for size in whole.chunk_sizes)
    assert 0 < empties < len(whole.chunk_sizes)
    assert _logical_sizes(split) == whole.chunk_sizes
    assert sum(size == 0 for size in split.chunk_sizes) == empties  # one empty physical each
    assert split.history == whole.history == [(0.0, 1 / 30, 30)]
    _assert_same_update(split, whole)


def test_physical_batches_larger_than_the_logical_one_change_nothing() -> None:
    whole = _train("conv_groupnorm", physical=None)
    split = _train("conv_groupnorm", physical=1000)
    assert split.chunk_sizes == whole.chunk_sizes
    assert not any(split.accumulating)
    _assert_same_update(split, whole)


def test_prefetching_workers_keep_logical_batches_together() -> None:
    split = _train("mlp_norm_fallback", physical=7, num_workers=2)
    inline = _train("mlp_norm_fallback", physical=7)
    assert split.chunk_sizes == inline.chunk_sizes
    assert split.accumulating == inline.accumulating
    _assert_same_update(split, inline)


def _setup() -> tuple[nn.Module, DPOptimizer, DataLoader, PrivacyEngine]:
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    engine = PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=32, generator=torch.Generator().manual_seed(0)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    return model, optimizer, loader, engine


def test_leaving_mid_logical_batch_discards_it_and_warns() -> None:
    model, optimizer, loader, engine = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    with (
        pytest.warns(DPWarning, match="middle of a logical batch"),
        BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=4, optimizer=optimizer
        ) as physical,
    ):
        for x, y in physical:
            assert optimizer.is_accumulating  # batches of ~32 split in 4s: first is not last
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            break
    assert len(engine.accountant) == 0
    assert not optimizer.is_accumulating
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_clipping_norm_cannot_change_inside_a_logical_batch() -> None:
    model, optimizer, loader, _ = _setup()
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=4, optimizer=optimizer
    ) as physical:
        batches = iter(physical)  # kept: closing the iterator ends the logical batch
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        with pytest.raises(TrainingLoopError, match=r"max_grad_norm=2\.0.*between logical steps"):
            optimizer.max_grad_norm = 2.0
        assert optimizer.max_grad_norm == 1.0
        optimizer.discard_accumulated()
    optimizer.max_grad_norm = 2.0  # between logical steps it is fine
    assert optimizer.max_grad_norm == 2.0


def test_bad_arguments_are_refused() -> None:
    _, optimizer, loader, _ = _setup()
    with pytest.raises(DPValueError, match=r"max_physical_batch_size=0 must be a positive int"):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=0, optimizer=optimizer)
    with pytest.raises(DPTypeError, match="optimizer=SGD is not a DPOptimizer"):
        BatchMemoryManager(
            data_loader=loader,
            max_physical_batch_size=4,
            optimizer=optimizer.original_optimizer,  # type: ignore[arg-type]
        )


def test_opacus_import_paths() -> None:
    from dptorch.utils.batch_memory_manager import BatchMemoryManager as FromUtils

    assert FromUtils is dptorch.BatchMemoryManager is dptorch.data.BatchMemoryManager
