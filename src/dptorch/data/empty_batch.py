"""Empty batches that keep the structure, dtypes and trailing shapes of real ones.

Poisson sampling can draw a batch with no examples. The training step must still run on it
(it still adds noise and still counts for the accountant), so the model has to receive an
input of the usual structure with batch dimension 0, not a crash from ``collate_fn([])``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from dptorch.errors import DPTypeError

__all__ = ["EmptyBatchCollate", "empty_batch_like"]

CollateFn = Callable[[list[Any]], Any]


def empty_batch_like(example: Any, collate_fn: CollateFn | None = None) -> Any:
    """Build the batch ``collate_fn`` would give for zero examples like ``example``.

    The batch axes are found by collating ``[example]`` and ``[example, example]`` and
    comparing the two: every tensor (or array) dimension that grows from 1 to 2 is a batch
    dimension and gets size 0, so batch-second layouts such as ``[T, B, d]`` come out right;
    every list or tuple whose length grows is a per-example list (e.g. of strings) and
    becomes ``[]``. Lists, tuples (named ones too) and mappings whose size does not grow are
    structure, and are rebuilt with their type. ``None`` stays ``None``; any other non-tensor
    leaf becomes ``[]``.

    Privacy:
        The result contains no values from ``example``: tensors have zero elements and other
        leaves are dropped. Only the sizes of non-batch dimensions are taken from it.

    Args:
        example: one item of the dataset, e.g. ``dataset[0]``.
        collate_fn: the loader's collate function; ``None`` means torch's ``default_collate``.

    Returns:
        The collated structure with batch size 0, e.g. ``[x[:0], y[:0]]`` for a dataset of
        ``(x, y)`` pairs under ``default_collate``.

    Raises:
        DPTypeError: a tensor in the collated output does not grow with the number of
            examples (a batch-level statistic or a 0-dim tensor), or the two collated batches
            differ in structure; the message gives its path in the batch.
    """
    collate = collate_fn if collate_fn is not None else default_collate
    return _empty(collate([example]), collate([example, example]), "batch")


def _rebuild(like: Any, items: list[Any]) -> Any:
    """A container of the same type as ``like`` (list, tuple, named tuple) holding ``items``."""
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*items)
    try:
        return type(like)(items)
    except TypeError:
        return list(items)


def _rebuild_mapping(like: Any, items: dict[Any, Any]) -> Any:
    try:
        return type(like)(items)
    except TypeError:  # e.g. defaultdict, whose first argument is a factory
        return dict(items)


def _empty(one: Any, two: Any, path: str) -> Any:
    """Empty version of ``one`` (collated from 1 example), given ``two`` (from 2 examples)."""
    if isinstance(one, (torch.Tensor, np.ndarray)):
        if not isinstance(two, type(one)) or one.ndim != two.ndim:
            raise DPTypeError(
                f"collate_fn gives {path} as {type(one).__name__} with {one.ndim} dims for one "
                f"example but as {type(two).__name__} for two; make collate_fn return the "
                "same structure for every batch size so an empty batch can be built."
            )
        grown = [d for d in range(one.ndim) if one.shape[d] != two.shape[d]]
        if not grown:
            raise DPTypeError(
                f"collate_fn gives {path} with shape {tuple(one.shape)} for both one and two "
                "examples, so it has no batch dimension (a batch-level statistic or a "
                "constant?) and no empty version can be built without guessing. Return "
                "per-example values stacked along a batch dimension, or compute batch-level "
                "values in the training step."
            )
        index = tuple(slice(0, 0) if d in grown else slice(None) for d in range(one.ndim))
        return one[index].copy() if isinstance(one, np.ndarray) else one[index].clone()
    if isinstance(one, Mapping):
        if not isinstance(two, Mapping) or set(one) != set(two):
            raise DPTypeError(
                f"collate_fn gives {path} as a mapping whose keys change with the batch size; "
                "return the same keys for every batch so an empty batch can be built."
            )
        items = {k: _empty(v, two[k], f"{path}[{k!r}]") for k, v in one.items()}
        return _rebuild_mapping(one, items)
    if isinstance(one, Sequence) and not isinstance(one, (str, bytes)):
        if not isinstance(two, Sequence) or len(two) != len(one):
            # Grows with the batch: a per-example list (strings, ragged tensors, ...).
            return []
        return _rebuild(
            one,
            [_empty(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(one, two, strict=True))],
        )
    if one is None:
        return None
    # A per-example scalar or string outside any list: nothing of it may survive.
    return []


def _fresh(template: Any) -> Any:
    """A copy of an empty batch, so that callers mutating one batch do not alter the next."""
    if isinstance(template, torch.Tensor):
        return template.clone()
    if isinstance(template, np.ndarray):
        return template.copy()
    if isinstance(template, Mapping):
        return _rebuild_mapping(template, {k: _fresh(v) for k, v in template.items()})
    if isinstance(template, (list, tuple)):
        return _rebuild(template, [_fresh(v) for v in template])
    return template


class EmptyBatchCollate:
    """Wraps a collate function so that an empty list of examples gives an empty batch.

    Non-empty batches go to ``collate_fn`` unchanged. The empty structure is built on the
    first empty batch from ``dataset[0]`` (see :func:`empty_batch_like`) and cached, so
    nothing is read from the dataset at construction or inside a worker until needed.

    Privacy:
        An empty batch carries no example data, so the step that uses it releases only noise,
        as Poisson subsampling analyses assume.

    Args:
        dataset: the map-style dataset the loader reads (only ``dataset[0]`` is used).
        collate_fn: the user's collate function; ``None`` means ``default_collate``.
    """

    def __init__(self, dataset: Any, collate_fn: CollateFn | None = None) -> None:
        self.dataset = dataset
        self.collate_fn: CollateFn = collate_fn if collate_fn is not None else default_collate
        self._template: Any = None
        self._has_template = False

    def __call__(self, examples: list[Any]) -> Any:
        if len(examples) > 0:
            return self.collate_fn(examples)
        if not self._has_template:
            self._template = empty_batch_like(self.dataset[0], self.collate_fn)
            self._has_template = True
        return _fresh(self._template)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.collate_fn!r})"
