"""Per-sample gradients of :class:`dptorch.layers.attention.AppendedPosition`.

That layer appends one learned vector to every example's sequence (``[B, S, E]`` ->
``[B, S + 1, E]``; attention's ``bias_k`` / ``bias_v``), always batch first. Example ``i``'s
gradient of the vector is its output gradient at the appended position: ``G[i, S]``.
"""

from __future__ import annotations

from torch import Tensor, nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import RuleContext, compute_dtype, input_and_grad
from dptorch.per_sample.terms import DenseTerm, GradTerm


def appended_position_rule(
    module: nn.Module, record: CallRecord, ctx: RuleContext
) -> list[GradTerm]:
    weight = module.weight
    if not (isinstance(weight, Tensor) and ctx.wants(weight)):
        return []
    _, grad = input_and_grad(record)
    # The layer is called batch first whatever the model's layout: ctx.batch_first is moot.
    last = compute_dtype(grad)[:, -1]  # [B, E]
    return [DenseTerm(weight, last.reshape(last.shape[0], *weight.shape))]
