"""Per-sample gradients of ``nn.Linear``: ``g_i = sum_t G[i, t] (x) a[i, t]``."""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor, nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import (
    RuleContext,
    compute_dtype,
    input_and_grad,
    to_batch_first,
)
from dptorch.per_sample.terms import DenseTerm, GradTerm, OuterTerm, rowwise_sq_norm


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
    wants_weight = ctx.wants(module.weight)
    wants_bias = module.bias is not None and ctx.wants(module.bias)
    if positions == 1:
        return _single_position_terms(module, rows, cols, ctx, wants_weight, wants_bias)
    terms: list[GradTerm] = []
    if wants_weight:
        terms.append(OuterTerm(module.weight, rows=rows, cols=cols))
    if wants_bias:
        terms.append(DenseTerm(module.bias, rows.sum(dim=(1, 2))))
    return terms


def _single_position_terms(
    module: nn.Linear,
    rows: Tensor,
    cols: Tensor,
    ctx: RuleContext,
    wants_weight: bool,
    wants_bias: bool,
) -> list[GradTerm]:
    """Terms of a ``[B, in]`` call, with their squared norms taken now.

    The weight's ghost norm is ``|G_i|^2 |a_i|^2`` and the bias's ``|G_i|^2``: one row norm
    of the output gradient serves both, and it is taken here, inside the backward pass,
    while the gradient is still in cache (the step would read it again from memory).
    """
    batch = rows.shape[0]
    # The bias gradient IS the output gradient (a view). torch's CPU sum over size-1
    # dimensions is not free (~0.3 ms for [256, 1, 1, 512]).
    grad = rows.reshape(batch, module.out_features)
    # With several rows per example the norms clipped are those of each example's mean over
    # its rows, which the engine takes after grouping: per-row norms would go unused.
    grad_sq = rowwise_sq_norm(grad) if ctx.rows_per_example == 1 else None
    terms: list[GradTerm] = []
    if wants_weight:
        weight = OuterTerm(module.weight, rows=rows, cols=cols)
        ghost = ctx.norm_route != "instantiate" and weight.cheaper_route() == "ghost"
        if grad_sq is not None and ghost:
            inputs_sq = rowwise_sq_norm(cols.reshape(batch, module.in_features))
            weight.known_norm_sq = grad_sq * inputs_sq
        terms.append(weight)
    if wants_bias:
        terms.append(DenseTerm(module.bias, grad, known_norm_sq=grad_sq))
    return terms


def batch_first_linear_rule(
    module: nn.Module, record: CallRecord, ctx: RuleContext
) -> list[GradTerm]:
    """:func:`linear_rule` for layers always called batch first (DP recurrent layers' parts)."""
    return linear_rule(module, record, dataclasses.replace(ctx, batch_first=True))
