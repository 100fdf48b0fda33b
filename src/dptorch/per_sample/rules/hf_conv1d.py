"""Per-sample gradients of Hugging Face's ``Conv1D`` (GPT-2's projections).

``transformers.pytorch_utils.Conv1D`` is a linear layer with its weight stored transposed:
``y = x @ W + b`` with ``W`` of shape ``[in, out]``. So ``g_i = sum_t a[i, t] (x) G[i, t]``,
the ``nn.Linear`` outer product with the two factors swapped. The rule reads only the
module's ``weight`` and ``bias``: it is looked up by the class's qualified name, so neither
it nor ``import dptorch`` imports ``transformers``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import (
    RuleContext,
    compute_dtype,
    input_and_grad,
    to_batch_first,
)
from dptorch.per_sample.terms import DenseTerm, GradTerm, OuterTerm


def hf_conv1d_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    weight = module.weight
    assert isinstance(weight, Tensor)
    activations, grad = input_and_grad(record)
    activations = to_batch_first(compute_dtype(activations), ctx.batch_first, min_dim=3)
    grad = to_batch_first(compute_dtype(grad), ctx.batch_first, min_dim=3)
    batch = activations.shape[0]
    in_features, out_features = weight.shape
    positions = math.prod(activations.shape[1:-1])  # explicit: -1 is ambiguous when B = 0
    rows = activations.reshape(batch, 1, positions, in_features)  # [B, 1, T, in]
    cols = grad.reshape(batch, 1, positions, out_features)  # [B, 1, T, out]
    terms: list[GradTerm] = []
    if ctx.wants(weight):
        terms.append(OuterTerm(weight, rows=rows, cols=cols))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and ctx.wants(bias):
        terms.append(DenseTerm(bias, cols.sum(dim=(1, 2))))
    return terms
