"""Per-sample gradients of affine normalisation layers (LayerNorm, RMSNorm, GroupNorm,
InstanceNorm without running statistics).

Each normalises within one example, so ``g_i(weight) = sum (G_i * xhat_i)`` and
``g_i(bias) = sum G_i`` over the positions of example ``i``. These gradients are as small as
the parameters, so they are instantiated.

The product ``G_i * xhat_i`` is formed in the memory of ``xhat``, which the rule computed and
nothing else holds: one temporary the size of the layer's input instead of two. On the CPU a
fresh block of that size can be faulted in page by page (glibc returns large freed blocks to
the kernel), so the second one could cost more than the arithmetic (benchmarks/README.md,
"GroupNorm's product": 19.4 against 2.7 ms for a ``[256, 16, 32, 32]`` input alone, 250 against
245 ms for the ResNet benchmark's whole step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import RuleContext, compute_dtype, input_and_grad, to_batch_first
from dptorch.per_sample.terms import DenseTerm, GradTerm


def _affine_terms(
    module: nn.Module, grad_weight: Tensor, grad_bias: Tensor, ctx: RuleContext
) -> list[GradTerm]:
    """Terms for the affine parameters from their per-sample gradients ``[B, *shape]``."""
    terms: list[GradTerm] = []
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None and ctx.wants(weight):
        terms.append(DenseTerm(weight, grad_weight))
    if bias is not None and ctx.wants(bias):
        terms.append(DenseTerm(bias, grad_bias))
    return terms


def _times_grad(normalized: Tensor, grad: Tensor) -> Tensor:
    """``normalized * grad``, in place in ``normalized`` (the rule's own temporary) unless
    the product needs a wider dtype or a broadcast shape than ``normalized`` has."""
    if normalized.dtype == torch.result_type(normalized, grad) and normalized.shape == grad.shape:
        return normalized.mul_(grad)
    return normalized * grad


def _trailing_shape_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    """LayerNorm and RMSNorm: parameters cover the trailing ``normalized_shape`` dims."""
    assert isinstance(module, nn.LayerNorm | nn.RMSNorm)
    x, grad = input_and_grad(record)
    shape = tuple(module.normalized_shape)
    x = to_batch_first(compute_dtype(x), ctx.batch_first, min_dim=len(shape) + 2)
    grad = to_batch_first(compute_dtype(grad), ctx.batch_first, min_dim=len(shape) + 2)
    if isinstance(module, nn.LayerNorm):
        normalized = F.layer_norm(x, shape, None, None, module.eps)
    else:
        normalized = F.rms_norm(x, shape, None, module.eps)
    batch = x.shape[0]
    # Sum over every position between the batch and the normalised dims.
    per_position = (batch, math.prod(x.shape[1 : x.dim() - len(shape)]), *shape)
    grad_w = _times_grad(normalized, grad).reshape(per_position).sum(dim=1)
    grad_b = grad.reshape(per_position).sum(dim=1)
    return _affine_terms(module, grad_w, grad_b, ctx)


def layer_norm_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    return _trailing_shape_rule(module, record, ctx)


def _channel_terms(
    module: nn.Module, ctx: RuleContext, normalized: Tensor, grad: Tensor
) -> list[GradTerm]:
    """GroupNorm and InstanceNorm: one weight per channel (dim 1), summed over positions."""
    batch, channels = grad.shape[0], grad.shape[1]
    per_channel = (batch, channels, math.prod(grad.shape[2:]))
    grad_w = _times_grad(normalized, grad).reshape(per_channel).sum(dim=2)
    grad_b = grad.reshape(per_channel).sum(dim=2)
    return _affine_terms(module, grad_w, grad_b, ctx)


def group_norm_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    assert isinstance(module, nn.GroupNorm)
    x, grad = input_and_grad(record)
    x, grad = compute_dtype(x), compute_dtype(grad)
    normalized = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _channel_terms(module, ctx, normalized, grad)


def instance_norm_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
    x, grad = input_and_grad(record)
    x, grad = compute_dtype(x), compute_dtype(grad)
    normalized = F.instance_norm(x, eps=module.eps)
    return _channel_terms(module, ctx, normalized, grad)
