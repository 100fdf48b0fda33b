"""Fuzz: DPDataLoader over random example structures, with many empty Poisson batches.

Every batch, empty or not, must have the structure a non-empty batch has: the same
containers and keys, tensors of the same dtype and trailing shape with batch dimension 0,
per-example lists (of strings) empty. Structures that have no batch dimension must be
refused with a DPTypeError naming their place, not crash the step later.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, default_collate

from dptorch.data import DPDataLoader
from dptorch.data.empty_batch import empty_batch_like
from dptorch.errors import DPTypeError

Pair = namedtuple("Pair", ["left", "right"])

dtypes = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.float16])
shapes = st.lists(st.integers(1, 3), max_size=3).map(tuple)
# A template leaf: ("tensor", dtype, shape), ("array", shape), ("int",), ("float",),
# or ("str",); examples are drawn from it with fresh values.
leaves = st.one_of(
    st.tuples(st.just("tensor"), dtypes, shapes),
    st.tuples(st.just("array"), shapes),
    st.sampled_from([("int",), ("float",), ("str",)]),
)
structures = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: ("tuple", xs)),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: ("list", xs)),
        st.dictionaries(st.sampled_from("abcd"), inner, min_size=1, max_size=3).map(
            lambda d: ("dict", d)
        ),
        st.tuples(inner, inner).map(lambda xs: ("pair", list(xs))),
    ),
    max_leaves=6,
)


def _example(template: Any, index: int) -> Any:
    kind = template[0]
    generator = torch.Generator().manual_seed(index)
    if kind == "tensor":
        return torch.randn(template[2], generator=generator).to(template[1])
    if kind == "array":
        return np.full(template[1], float(index))
    if kind == "int":
        return index
    if kind == "float":
        return index / 7
    if kind == "str":
        return f"example-{index}"
    if kind == "tuple":
        return tuple(_example(t, index) for t in template[1])
    if kind == "list":
        return [_example(t, index) for t in template[1]]
    if kind == "pair":
        return Pair(*(_example(t, index) for t in template[1]))
    return {key: _example(t, index) for key, t in template[1].items()}


class Examples(Dataset):
    def __init__(self, template: Any, size: int) -> None:
        self.template, self.size = template, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        return _example(self.template, index)


def _same_structure(empty: Any, full: Any, path: str = "batch") -> None:
    if isinstance(full, torch.Tensor | np.ndarray):
        assert type(empty) is type(full), path
        assert empty.shape == (0, *full.shape[1:]), path
        assert empty.dtype == full.dtype, path
    elif isinstance(full, dict):
        assert isinstance(empty, dict) and set(empty) == set(full), path
        for key in full:
            _same_structure(empty[key], full[key], f"{path}[{key!r}]")
    elif isinstance(full, list | tuple) and full and isinstance(full[0], str):
        assert empty == [], path  # the per-example strings: none left
    else:
        assert type(empty) is type(full) and len(empty) == len(full), path
        for index, (a, b) in enumerate(zip(empty, full, strict=True)):
            _same_structure(a, b, f"{path}[{index}]")


@settings(max_examples=60, deadline=None)
@given(template=structures, size=st.integers(1, 12), q=st.sampled_from([0.02, 0.1, 0.5, 1.0]))
def test_every_batch_has_the_structure_of_a_full_batch(template: Any, size: int, q: float) -> None:
    dataset = Examples(template, size)
    full = default_collate([dataset[i] for i in range(size)])
    loader = DPDataLoader(
        dataset, sample_rate=q, steps=6, generator=torch.Generator().manual_seed(0)
    )
    sizes = []
    for batch in loader:
        _same_structure(_strip(batch, full), full)
        sizes.append(_batch_size(batch))
    assert len(sizes) == 6
    assert all(0 <= s <= size for s in sizes)


def _strip(batch: Any, full: Any) -> Any:
    """``batch`` sliced to 0 examples (an empty batch is returned as it is)."""
    if isinstance(batch, torch.Tensor | np.ndarray):
        return batch[:0]
    if isinstance(batch, dict):
        return {k: _strip(v, full[k]) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and (not batch or isinstance(batch[0], str)):
        return []  # per-example strings (an empty batch has [] here)
    rebuilt = [_strip(a, b) for a, b in zip(batch, full, strict=True)]
    return type(batch)(*rebuilt) if hasattr(batch, "_fields") else type(batch)(rebuilt)


def _batch_size(batch: Any) -> int:
    leaves = _tensors(batch)
    return int(leaves[0].shape[0]) if leaves else 0


def _tensors(batch: Any) -> list[Any]:
    if isinstance(batch, torch.Tensor | np.ndarray):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, list | tuple):
        return [t for v in batch for t in _tensors(v)]
    return []


@settings(max_examples=30, deadline=None)
@given(template=structures)
def test_collates_without_a_batch_dimension_are_refused_by_path(template: Any) -> None:
    example = _example(template, 0)

    def batch_statistic(examples: list[Any]) -> Any:
        return {"data": default_collate(examples), "count": torch.tensor(len(examples))}

    with pytest.raises(DPTypeError, match=r"batch\['count'\].*no batch dimension"):
        empty_batch_like(example, batch_statistic)

    def keys_change(examples: list[Any]) -> Any:
        return {f"n{len(examples)}": default_collate(examples)}

    with pytest.raises(DPTypeError, match="keys change"):
        empty_batch_like(example, keys_change)
