"""What a per-layer rule is: a function from one captured call to gradient terms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dptorch.errors import DPValueError
from dptorch.per_sample.capture import ActivationCapture, CallRecord
from dptorch.per_sample.terms import GradTerm, NormRoute


@dataclass(frozen=True)
class RuleContext:
    """What a rule needs besides the call itself.

    Attributes:
        batch_first: whether sequence-shaped inputs (``[B, T, ...]``) put the batch first;
            with ``False`` they are ``[T, B, ...]`` (convolution and normalisation layers
            always take the batch first, as in PyTorch).
        trainable: the parameters that get private gradients; rules skip all others.
        capture: the capture, so a rule that re-runs a forward can pause it.
        norm_route: the engine's route setting, for rules whose ghost and instantiated forms
            need different factors (convolution); rules returning outer-product terms can
            ignore it, the terms choose for themselves.
        rows_per_example: ``K`` consecutive batch rows per example (augmentation
            multiplicity). A rule may ignore it (the engine groups every term's rows before
            the norms are taken); one that takes norms inside the backward pass uses it to
            take them of each example's mean gradient instead of each row's.
    """

    batch_first: bool
    trainable: frozenset[Tensor]
    capture: ActivationCapture
    norm_route: NormRoute = "auto"
    rows_per_example: int = 1

    def wants(self, param: Tensor | None) -> bool:
        return param is not None and param in self.trainable


Rule = Callable[[nn.Module, CallRecord, RuleContext], list[GradTerm]]


def input_and_grad(record: CallRecord) -> tuple[Tensor, Tensor]:
    """The first positional input and the output gradient of a single-output layer call."""
    if not record.args or not isinstance(record.args[0], Tensor):
        raise DPValueError(
            f"{record.path} ({type(record.module).__name__}) was called without a tensor as its "
            "first positional argument; dptorch's rule for this layer needs it. Call the layer "
            "as layer(x)."
        )
    grad = record.grads[0]
    assert grad is not None, "rules only see records that received a gradient"
    return record.args[0], grad


def to_batch_first(tensor: Tensor, batch_first: bool, min_dim: int) -> Tensor:
    """Move a ``[T, B, ...]`` tensor to ``[B, T, ...]`` when the layout says so."""
    if not batch_first and tensor.dim() >= min_dim:
        return tensor.movedim(1, 0)
    return tensor


def compute_dtype(tensor: Tensor) -> Tensor:
    """Norms of half-precision factors are accumulated in float32 to keep clipping exact."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor
