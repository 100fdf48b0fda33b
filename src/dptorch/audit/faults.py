"""Planted privacy faults: break dptorch on purpose to check that an audit catches it.

Each fault patches one part of the real DP-SGD path for the duration of a ``with`` block
(``unittest.mock.patch``; not thread-safe), and is of a kind that has been found in real DP
libraries: too little noise, no clipping, an accountant told the wrong sample rate, a layer
whose per-sample norm is left out of the clipping norm. An audit with power should report
``violated`` under each; a correct run should not. ``dptorch audit --plant-fault NAME`` runs
them from the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from dptorch.clipping import FlatClipping
from dptorch.errors import DPValueError
from dptorch.optimizers import dp_optimizer
from dptorch.per_sample import engine as per_sample_engine
from dptorch.per_sample.terms import IndexRows
from dptorch.privacy_engine import PrivacyEngine

__all__ = ["FAULTS", "planted_fault"]

FAULTS: dict[str, str] = {
    "noise": "noise std 10x smaller than sigma * C (the accountant still records sigma)",
    "no-clipping": "per-sample gradients are not clipped (the noise still assumes norm C)",
    "sample-rate": "the accountant is told a sample rate 10x smaller than the loader uses",
    "embedding-norm": (
        "Embedding layers' per-sample norms are left out of each example's total norm, "
        "so their gradients go unclipped (a broken norm path in one layer rule)"
    ),
}


@contextmanager
def planted_fault(name: str) -> Iterator[None]:
    """Run the ``with`` block with the privacy fault ``name`` planted (see :data:`FAULTS`).

    Privacy: inside the block dptorch is NOT private and its epsilon is wrong, on purpose.
    """
    patches = {
        "noise": _smaller_noise,
        "no-clipping": _no_clipping,
        "sample-rate": _smaller_accounted_rate,
        "embedding-norm": _embedding_norm_dropped,
    }
    if name not in patches:
        raise DPValueError(
            f"fault={name!r} is not a planted fault; choose one of {sorted(FAULTS)}."
        )
    with patches[name]():
        yield


def _smaller_noise() -> Any:
    real = dp_optimizer.gaussian_noise

    def tenth(shape: torch.Size, *, std: float, **kwargs: Any) -> Tensor:
        return real(shape, std=std / 10, **kwargs)

    return mock.patch.object(dp_optimizer, "gaussian_noise", tenth)


def _no_clipping() -> Any:
    def ones(self: FlatClipping, norms: Tensor) -> Tensor:
        return torch.ones_like(norms)

    return mock.patch.object(FlatClipping, "factors", ones)


def _smaller_accounted_rate() -> Any:
    real = PrivacyEngine._accounting_hook

    def tenth(self: PrivacyEngine, sample_rate: float) -> Callable[..., None]:
        return real(self, sample_rate / 10)  # type: ignore[no-any-return]

    return mock.patch.object(PrivacyEngine, "_accounting_hook", tenth)


def _embedding_norm_dropped() -> Any:
    real = per_sample_engine.combined_norm_sq

    def without_embeddings(terms: list[Any], route: Any, **kwargs: Any) -> Tensor:
        norm_sq = real(terms, route, **kwargs)
        if any(isinstance(getattr(term, "rows", None), IndexRows) for term in terms):
            return torch.zeros_like(norm_sq)
        return norm_sq

    return mock.patch.object(per_sample_engine, "combined_norm_sq", without_embeddings)
