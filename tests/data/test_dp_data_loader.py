"""Tests for DPDataLoader, empty batches and sample-rate inference."""

from __future__ import annotations

import multiprocessing
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)

from dptorch.data import DPDataLoader, PoissonBatchSampler, infer_sample_rate
from dptorch.data.empty_batch import EmptyBatchCollate, empty_batch_like
from dptorch.errors import DPTypeError, DPValueError, SampleRateError

N = 20
TINY_Q = 1e-9  # every batch is empty except with probability ~N * TINY_Q


def _tensor_dataset(n: int = N) -> TensorDataset:
    return TensorDataset(torch.randn(n, 4), torch.arange(n))


class DictDataset(Dataset):
    """Examples as nested dicts with tensors, python numbers and strings."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "x": torch.full((4,), float(i)),
            "label": i,
            "weight": 0.5,
            "name": f"ex{i}",
            "extra": {"mask": torch.ones(2, 3, dtype=torch.bool)},
        }


class ListDataset(Dataset):
    """Examples as lists [features, label]."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> list[Any]:
        return [torch.full((4,), float(i), dtype=torch.float64), i]


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.randn(N, 4))


class NoLength(Dataset):
    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(4)


def seq_first_collate(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """A custom layout: features [4, B] (batch second), labels [B]."""
    xs, ys = zip(*examples, strict=True)
    return torch.stack(xs, dim=1), torch.stack(ys)


def tagging_collate(examples: list[Any]) -> dict[str, Any]:
    x, y = default_collate(examples)
    return {"x": x, "y": y, "ids": [int(v) for v in y]}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- empty batches -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "collate_fn", "check"),
    [
        (
            _tensor_dataset(),
            None,
            lambda b: (
                isinstance(b, list)
                and b[0].shape == (0, 4)
                and b[0].dtype == torch.float32
                and b[1].shape == (0,)
                and b[1].dtype == torch.int64
            ),
        ),
        (
            ListDataset(),
            None,
            lambda b: (
                isinstance(b, list)
                and b[0].shape == (0, 4)
                and b[0].dtype == torch.float64
                and b[1].shape == (0,)
                and b[1].dtype == torch.int64
            ),
        ),
        (
            DictDataset(),
            None,
            lambda b: (
                b["x"].shape == (0, 4)
                and b["x"].dtype == torch.float32
                and b["label"].shape == (0,)
                and b["label"].dtype == torch.int64
                and b["weight"].dtype == torch.float64
                and b["name"] == []
                and b["extra"]["mask"].shape == (0, 2, 3)
                and b["extra"]["mask"].dtype == torch.bool
            ),
        ),
        (
            _tensor_dataset(),
            seq_first_collate,
            lambda b: isinstance(b, tuple) and b[0].shape == (4, 0) and b[1].shape == (0,),
        ),
        (
            _tensor_dataset(),
            tagging_collate,
            lambda b: b["x"].shape == (0, 4) and b["y"].shape == (0,) and b["ids"] == [],
        ),
    ],
    ids=["tuple", "list", "nested-dict", "batch-second", "custom-dict"],
)
def test_empty_batches_keep_structure_and_dtype(
    dataset: Dataset, collate_fn: Callable | None, check: Callable[[Any], bool]
) -> None:
    loader = DPDataLoader(dataset, sample_rate=TINY_Q, steps=3, collate_fn=collate_fn)
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert check(batch), batch
        tensors = [batch] if isinstance(batch, torch.Tensor) else _tensors(batch)
        assert all(t.numel() == 0 for t in tensors)  # no example data leaks in


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def test_model_runs_on_an_empty_batch() -> None:
    loader = DPDataLoader(_tensor_dataset(), sample_rate=TINY_Q, steps=1)
    x, y = next(iter(loader))
    layer = torch.nn.Linear(4, 3)
    out = layer(x)  # [0, 3]
    assert out.shape == (0, 3)
    loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
    loss.backward()
    assert layer.weight.grad is not None
    assert torch.count_nonzero(layer.weight.grad) == 0


def test_mixed_empty_and_full_batches() -> None:
    dataset = _tensor_dataset(5)
    loader = DPDataLoader(dataset, sample_rate=0.1, steps=60, generator=_gen(0))
    sizes = [len(y) for _, y in loader]
    assert len(sizes) == 60
    assert 0 in sizes and max(sizes) > 0  # P(empty) = 0.9^5 ~ 0.59 per step


def test_empty_batches_are_fresh_objects() -> None:
    collate = EmptyBatchCollate(_tensor_dataset())
    first, second = collate([]), collate([])
    assert first[0] is not second[0]
    first[0].requires_grad_()
    assert not second[0].requires_grad


def test_non_empty_batches_use_the_users_collate() -> None:
    collate = EmptyBatchCollate(_tensor_dataset(), tagging_collate)
    batch = collate([(torch.zeros(4), torch.tensor(3))])
    assert batch["ids"] == [3]


def test_batch_level_statistics_cannot_be_emptied() -> None:
    def mean_collate(examples: list[Any]) -> dict[str, torch.Tensor]:
        x, _ = default_collate(examples)
        return {"x": x, "mean": x.mean()}

    with pytest.raises(DPTypeError, match=r"batch\['mean'\].*no batch dimension"):
        empty_batch_like(_tensor_dataset()[0], mean_collate)


# --- DPDataLoader --------------------------------------------------------------------------


def test_loader_attributes() -> None:
    loader = DPDataLoader(_tensor_dataset(), sample_rate=0.25)
    assert loader.sample_rate == 0.25
    assert loader.expected_batch_size == pytest.approx(5.0)
    assert len(loader) == loader.steps == 4
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert loader.batch_sampler.sample_rate == loader.sample_rate
    assert len(DPDataLoader(_tensor_dataset(), sample_rate=0.25, steps=9)) == 9


def test_loader_batches_hold_distinct_examples_in_order() -> None:
    dataset = _tensor_dataset()
    loader = DPDataLoader(dataset, sample_rate=0.3, steps=5, generator=_gen(1))
    for _, y in loader:
        assert y.tolist() == sorted(set(y.tolist()))


def test_same_seed_same_batches() -> None:
    def labels(seed: int) -> list[list[int]]:
        loader = DPDataLoader(_tensor_dataset(), sample_rate=0.3, steps=8, generator=_gen(seed))
        return [y.tolist() for _, y in loader]

    assert labels(11) == labels(11)
    assert labels(11) != labels(12)


@pytest.mark.parametrize("name", ["batch_size", "shuffle", "sampler", "drop_last"])
def test_sampling_arguments_are_refused(name: str) -> None:
    value = {"batch_size": 4, "shuffle": True, "sampler": [0, 1], "drop_last": True}[name]
    with pytest.raises(DPValueError, match=rf"{name}=.*Poisson sampling"):
        DPDataLoader(_tensor_dataset(), sample_rate=0.1, **{name: value})


@pytest.mark.parametrize(
    ("dataset", "fragment"),
    [(Stream(), "IterableDataset"), (_tensor_dataset(0), "empty"), (NoLength(), "len()")],
)
def test_loader_refuses_unindexable_datasets(dataset: Dataset, fragment: str) -> None:
    with pytest.raises(SampleRateError) as info:
        DPDataLoader(dataset, sample_rate=0.1)
    assert fragment in str(info.value)


def test_compat_import_path() -> None:
    from dptorch.data_loader import DPDataLoader as Compat

    assert Compat is DPDataLoader


def test_num_workers_do_not_change_the_batches() -> None:
    def labels(workers: int) -> list[list[int]]:
        loader = DPDataLoader(
            _tensor_dataset(),
            sample_rate=0.05,
            steps=8,
            generator=_gen(4),
            num_workers=workers,
        )
        return [y.tolist() for _, y in loader]

    parallel = labels(2)
    assert parallel == labels(0)
    assert [] in parallel  # an empty batch made it through a worker (P(empty) ~ 0.36)


# --- from_data_loader and sample-rate inference --------------------------------------------


def _worker_init(worker_id: int) -> None:
    pass


def test_from_data_loader_keeps_loading_settings() -> None:
    context = multiprocessing.get_context("spawn")
    user = DataLoader(
        _tensor_dataset(),
        batch_size=4,
        shuffle=True,
        drop_last=True,
        collate_fn=tagging_collate,
        num_workers=2,
        pin_memory=True,
        worker_init_fn=_worker_init,
        multiprocessing_context=context,
        timeout=7.0,
        prefetch_factor=3,
        persistent_workers=True,
    )
    loader = DPDataLoader.from_data_loader(user)  # built only: no workers are started
    assert loader.dataset is user.dataset
    assert isinstance(loader.collate_fn, EmptyBatchCollate)
    assert loader.collate_fn.collate_fn is tagging_collate
    assert loader.num_workers == 2
    assert loader.pin_memory is True
    assert loader.worker_init_fn is _worker_init
    assert loader.multiprocessing_context is context
    assert loader.timeout == 7.0
    assert loader.prefetch_factor == 3
    assert loader.persistent_workers is True
    # Poisson sampling replaces batch_size, shuffle and drop_last.
    assert loader.drop_last is False
    assert loader.batch_size is None
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert loader.sample_rate == pytest.approx(4 / N)
    assert len(loader) == round(N / 4)


def test_from_data_loader_uses_the_given_generator() -> None:
    user = DataLoader(_tensor_dataset(), batch_size=5)

    def labels(seed: int) -> list[list[int]]:
        loader = DPDataLoader.from_data_loader(user, generator=_gen(seed), steps=6)
        return [y.tolist() for _, y in loader]

    assert labels(3) == labels(3)
    assert labels(3) != labels(4)


def test_from_dp_data_loader_keeps_its_rate_and_steps() -> None:
    first = DPDataLoader(_tensor_dataset(), sample_rate=0.3, steps=11, collate_fn=tagging_collate)
    again = DPDataLoader.from_data_loader(first)
    assert again.sample_rate == 0.3
    assert len(again) == 11
    assert again.collate_fn.collate_fn is tagging_collate  # not wrapped twice
    assert DPDataLoader.from_data_loader(first, sample_rate=0.5).sample_rate == 0.5


@pytest.mark.parametrize(
    ("make", "q"),
    [
        (lambda ds: DataLoader(ds, batch_size=4, shuffle=True), 4 / N),
        (lambda ds: DataLoader(ds, batch_size=4, shuffle=False, drop_last=True), 4 / N),
        (lambda ds: DataLoader(ds), 1 / N),
        (lambda ds: DataLoader(ds, batch_size=N), 1.0),
        (lambda ds: DataLoader(ds, sampler=RandomSampler(ds), batch_size=2), 2 / N),
        (
            lambda ds: DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 5, False)),
            5 / N,
        ),
        (lambda ds: DPDataLoader(ds, sample_rate=0.35), 0.35),
        (lambda ds: DataLoader(ds, batch_sampler=PoissonBatchSampler(N, 0.15)), 0.15),
    ],
    ids=[
        "shuffle",
        "sequential",
        "default",
        "full",
        "random-sampler",
        "batch-sampler",
        "dp",
        "poisson",
    ],
)
def test_infer_sample_rate(make: Callable[[Dataset], DataLoader], q: float) -> None:
    assert infer_sample_rate(make(_tensor_dataset())) == pytest.approx(q)


class MyBatchSampler(BatchSampler):
    """A subclass could batch in any way; it is refused like any custom batch sampler."""


REFUSED: dict[str, tuple[Callable[[], DataLoader], str]] = {
    "weighted": (
        lambda: DataLoader(
            _tensor_dataset(), batch_size=4, sampler=WeightedRandomSampler([1.0] * N, N)
        ),
        "WeightedRandomSampler",
    ),
    "subset": (
        lambda: DataLoader(_tensor_dataset(), batch_size=4, sampler=SubsetRandomSampler([0, 1])),
        "SubsetRandomSampler",
    ),
    "with-replacement": (
        lambda: DataLoader(
            _tensor_dataset(),
            batch_size=4,
            sampler=RandomSampler(range(N), replacement=True),
        ),
        "replacement=True",
    ),
    "partial-epoch": (
        lambda: DataLoader(
            _tensor_dataset(), batch_size=4, sampler=RandomSampler(range(N), num_samples=5)
        ),
        "num_samples=5",
    ),
    "batch-sampler-subclass": (
        lambda: DataLoader(
            _tensor_dataset(), batch_sampler=MyBatchSampler(SequentialSampler(range(N)), 4, False)
        ),
        "custom batch_sampler (MyBatchSampler)",
    ),
    "batch-sampler-list": (
        lambda: DataLoader(_tensor_dataset(), batch_sampler=[[0, 1], [2, 3, 4]]),
        "custom batch_sampler (list)",
    ),
    "poisson-wrong-size": (
        lambda: DataLoader(_tensor_dataset(), batch_sampler=PoissonBatchSampler(N + 1, 0.1)),
        "num_samples=21",
    ),
    "batch-size-none": (lambda: DataLoader(_tensor_dataset(), batch_size=None), "batch_size=None"),
    "batch-size-too-large": (
        lambda: DataLoader(_tensor_dataset(), batch_size=N + 1),
        f"batch_size={N + 1} is larger than len(dataset)={N}",
    ),
}
UNINDEXABLE: dict[str, tuple[Callable[[], DataLoader], str]] = {
    "iterable": (lambda: DataLoader(Stream(), batch_size=4), "IterableDataset"),
    "empty": (lambda: DataLoader(_tensor_dataset(0), batch_size=4), "is empty"),
    "no-len": (lambda: DataLoader(NoLength(), batch_size=4), "has no len()"),
}


@pytest.mark.parametrize("case", list(REFUSED) + list(UNINDEXABLE))
def test_uninferable_loaders_are_refused(case: str) -> None:
    make, fragment = {**REFUSED, **UNINDEXABLE}[case]
    for convert in (infer_sample_rate, DPDataLoader.from_data_loader):
        with pytest.raises(SampleRateError) as info:
            convert(make())
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert fragment in message
        if case in REFUSED:
            # Says why it matters for privacy, and how to fix it.
            assert "epsilon" in message
            assert "sample_rate=" in message


def test_all_problems_are_reported_at_once() -> None:
    loader = DataLoader(
        _tensor_dataset(), batch_size=N + 1, sampler=WeightedRandomSampler([1.0] * N, N)
    )
    with pytest.raises(SampleRateError) as info:
        infer_sample_rate(loader)
    assert "WeightedRandomSampler" in str(info.value)
    assert "larger than len(dataset)" in str(info.value)


@pytest.mark.parametrize("case", list(REFUSED))
def test_explicit_sample_rate_bypasses_sampler_checks(case: str) -> None:
    make, _ = REFUSED[case]
    loader = DPDataLoader.from_data_loader(make(), sample_rate=0.1, steps=2)
    assert loader.sample_rate == 0.1
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    batches = list(loader)
    assert len(batches) == 2
    for x, y in batches:  # collated, also where the user's loader did not batch
        assert x.shape == (len(y), 4)


@pytest.mark.parametrize("case", list(UNINDEXABLE))
def test_explicit_sample_rate_cannot_rescue_unindexable_datasets(case: str) -> None:
    make, fragment = UNINDEXABLE[case]
    with pytest.raises(SampleRateError, match=re.escape(fragment)):
        DPDataLoader.from_data_loader(make(), sample_rate=0.1)


@pytest.mark.parametrize("q", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_explicit_sample_rate_is_validated(q: float) -> None:
    with pytest.raises(SampleRateError, match="outside"):
        DPDataLoader.from_data_loader(DataLoader(_tensor_dataset(), batch_size=2), sample_rate=q)
