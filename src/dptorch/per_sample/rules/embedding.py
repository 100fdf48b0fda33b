"""Per-sample gradients of ``nn.Embedding`` without a ``[B, vocab, dim]`` tensor.

The gradient of example ``i`` is ``sum_t e_{idx[i, t]} (x) G[i, t]``: one-hot rows given by
indices. Positions holding ``padding_idx`` get no gradient, as in PyTorch.
"""

from __future__ import annotations

import math

from torch import nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import RuleContext, compute_dtype, input_and_grad, to_batch_first
from dptorch.per_sample.terms import GradTerm, IndexRows, OuterTerm


def embedding_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    assert isinstance(module, nn.Embedding)
    if not ctx.wants(module.weight):
        return []
    index, grad = input_and_grad(record)
    index = to_batch_first(index, ctx.batch_first, min_dim=2)
    grad = to_batch_first(compute_dtype(grad), ctx.batch_first, min_dim=3)
    batch = index.shape[0]
    positions = math.prod(index.shape[1:])  # explicit: -1 is ambiguous when B = 0
    rows = IndexRows(
        index=index.reshape(batch, positions),  # [B, T]
        size=module.num_embeddings,
        ignore=module.padding_idx,
    )
    cols = grad.reshape(batch, 1, positions, module.embedding_dim)  # [B, 1, T, dim]
    return [OuterTerm(module.weight, rows=rows, cols=cols)]
