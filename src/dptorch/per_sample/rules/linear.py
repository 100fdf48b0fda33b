"""Per-sample gradients of ``nn.Linear``: ``g_i = sum_t G[i, t] (x) a[i, t]``."""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import (
    RuleContext,
    compute_dtype,
    input_and_grad,
    to_batch_first,
)
from dptorch.per_sample.terms import DenseTerm, GradTerm, OuterTerm


def linear_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    assert isinstance(module, nn.Linear)
    activations, grad = input_and_grad(record)
    activations = to_batch_first(compute_dtype(activations), ctx.batch_first, min_dim=3)
    grad = to_batch_first(compute_dtype(grad), ctx.batch_first, min_dim=3)
    batch = activations.shape[0]
    # Every middle dimension ([B, T..., d]) is a position summed over inside one example.
    positions = math.prod(activations.shape[1:-1])  # explicit: -1 is ambiguous when B = 0
    cols = activations.reshape(batch, 1, positions, module.in_features)  # [B, 1, T, in]
    rows = grad.reshape(batch, 1, positions, module.out_features)  # [B, 1, T, out]
    terms: list[GradTerm] = []
    if ctx.wants(module.weight):
        terms.append(OuterTerm(module.weight, rows=rows, cols=cols))
    if module.bias is not None and ctx.wants(module.bias):
        # One position: the bias gradient IS the output gradient (a view). torch's CPU sum
        # over size-1 dimensions is not free (~0.3 ms for [256, 1, 1, 512]).
        bias_grads = (
            rows.reshape(batch, module.out_features) if positions == 1 else rows.sum(dim=(1, 2))
        )
        terms.append(DenseTerm(module.bias, bias_grads))
    return terms


def batch_first_linear_rule(
    module: nn.Module, record: CallRecord, ctx: RuleContext
) -> list[GradTerm]:
    """:func:`linear_rule` for layers always called batch first (DP recurrent layers' parts)."""
    return linear_rule(module, record, dataclasses.replace(ctx, batch_first=True))
