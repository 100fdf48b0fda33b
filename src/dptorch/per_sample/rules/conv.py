"""Per-sample gradients of ``nn.Conv1d/2d/3d`` on unfolded input patches.

A convolution is a Linear layer applied at every output position ``p`` to the input patch
under the kernel, so ``g_i = sum_p G[i, :, p] (x) patch[i, p]`` per group. Patches are built
with the module's own padding (numbers, ``"same"``, ``"valid"``, any ``padding_mode``),
stride and dilation, so they match exactly what the forward used.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import RuleContext, compute_dtype, input_and_grad
from dptorch.per_sample.terms import DenseTerm, GradTerm, OuterTerm

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _padded_input(x: Tensor, conv: ConvNd) -> Tensor:
    """The input as the kernel sees it: padded exactly as ``conv`` pads it."""
    if conv.padding_mode != "zeros":
        # PyTorch pads with the mode first, then convolves without padding.
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    pads: list[int] = []  # F.pad wants (last-dim left, last-dim right, ...)
    for dim in reversed(range(len(conv.kernel_size))):
        if conv.padding == "valid":
            left = right = 0
        elif conv.padding == "same":
            total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = int(conv.padding[dim])  # type: ignore[index]
        pads += [left, right]
    return F.pad(x, pads) if any(pads) else x


def unfold_patches(x: Tensor, conv: ConvNd) -> Tensor:
    """``[B, P, C_in * prod(kernel)]`` patches, channel-major like ``conv.weight``."""
    spatial = len(conv.kernel_size)
    patches = _padded_input(x, conv)
    for dim in range(spatial):
        span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        patches = patches.unfold(2 + dim, span, conv.stride[dim])
    # [B, C, o_1..o_n, span_1..span_n]: keep every dilation-th element of each window.
    window: tuple[slice, ...] = tuple(slice(None, None, d) for d in conv.dilation)
    index: tuple[Any, ...] = (Ellipsis, *window)
    patches = patches[index]
    batch, channels = x.shape[0], x.shape[1]
    out_dims = list(range(2, 2 + spatial))
    kernel_dims = list(range(2 + spatial, 2 + 2 * spatial))
    patches = patches.permute(0, *out_dims, 1, *kernel_dims)  # [B, o..., C, k...]
    positions = math.prod(patches.shape[1 : 1 + spatial])
    return patches.reshape(batch, positions, channels * math.prod(conv.kernel_size))


def conv_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    x, grad = input_and_grad(record)
    x, grad = compute_dtype(x), compute_dtype(grad)
    batch, groups = x.shape[0], module.groups
    out_channels = module.out_channels
    positions = math.prod(grad.shape[2:])  # explicit: -1 is ambiguous when B = 0
    grad = grad.reshape(batch, out_channels, positions)  # [B, C_out, P]
    terms: list[GradTerm] = []
    if ctx.wants(module.weight):
        patches = unfold_patches(x, module)  # [B, P, C_in * K]
        per_group = patches.shape[2] // groups
        cols = patches.reshape(batch, positions, groups, per_group).transpose(1, 2)  # [B, g, P, C]
        rows = grad.reshape(batch, groups, out_channels // groups, positions).transpose(2, 3)
        terms.append(OuterTerm(module.weight, rows=rows, cols=cols))
    if module.bias is not None and ctx.wants(module.bias):
        terms.append(DenseTerm(module.bias, grad.sum(dim=2)))
    return terms
