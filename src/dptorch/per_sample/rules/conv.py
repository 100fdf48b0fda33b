"""Per-sample gradients of ``nn.Conv1d/2d/3d``.

Two exact forms, chosen per call by cost:

* **Instantiated**, in one of two ways:

  - *by a grouped convolution*: the per-example weight gradients of a batch are the weight
    gradient of ONE convolution whose groups are the examples: fold the batch into the
    channels (``[1, B*C_in, ...]``), ask autograd's convolution kernel for the weight gradient
    of a ``B * groups``-group convolution, and read it as ``[B, *weight.shape]``. Same
    arithmetic as the ordinary weight gradient (which is skipped), no patch matrix;
  - *by unfolded patches and one batched matmul*: ``G[i] @ patches[i]`` per example. It
    writes the patch matrix (``B * P * C_in * K`` values) but runs as dense GEMMs; the grouped
    kernel is slow where each group is narrow (few input channels) or the output has few
    positions, and there this form wins (see :func:`_unfold_is_faster`).
* **Ghost, on unfolded patches.** A convolution is a Linear layer applied at every output
  position ``p`` to the input patch under the kernel, so ``g_i = sum_p G[i, :, p] (x)
  patch[i, p]`` per group: an outer-product term. Cheaper only when the output has few
  positions (the Gram matrices are ``P x P``).

Patches and the folded convolution use the module's own padding (numbers, ``"same"``,
``"valid"``, any ``padding_mode``), stride and dilation, so they match the forward exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
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


def _explicit_padding(conv: ConvNd) -> list[int] | None:
    """Symmetric zero padding per dimension, or ``None`` if it needs an explicit pad."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return [int(p) for p in conv.padding]


def per_sample_conv_weight_grads(x: Tensor, grad: Tensor, conv: ConvNd) -> Tensor:
    """``[B, *conv.weight.shape]``: each example's weight gradient, by one grouped kernel.

    Args:
        x: the layer's input ``[B, C_in, *spatial]``.
        grad: the gradient of its output ``[B, C_out, *out_spatial]``.
        conv: the layer (its stride, padding, dilation and groups).
    """
    batch = x.shape[0]
    padding = _explicit_padding(conv)
    if padding is None:
        x, padding = _padded_input(x, conv), [0] * len(conv.kernel_size)
    weight_shape = conv.weight.shape
    folded_weight = [batch * weight_shape[0], *weight_shape[1:]]
    # Only the weight's shape matters for the weight gradient; a zero-stride view avoids
    # allocating B copies of the weight.
    shape_only = x.new_empty(()).expand(folded_weight)
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, batch * grad.shape[1], *grad.shape[2:]),
        x.reshape(1, batch * x.shape[1], *x.shape[2:]),
        shape_only,
        None,
        list(conv.stride),
        padding,
        list(conv.dilation),
        False,
        [0] * len(conv.kernel_size),
        batch * conv.groups,
        [False, True, False],
    )
    return weight_grad.view(batch, *weight_shape)


def per_sample_conv_weight_grads_by_unfold(x: Tensor, grad: Tensor, conv: ConvNd) -> Tensor:
    """``[B, *conv.weight.shape]`` like :func:`per_sample_conv_weight_grads`, by unfolded
    patches and one batched matmul per group (``[C_out/g, P] @ [P, C_in/g * K]``)."""
    batch, groups = x.shape[0], conv.groups
    positions = math.prod(grad.shape[2:])
    padding = _explicit_padding(conv)
    if len(conv.kernel_size) == 2 and padding is not None:
        # im2col in one kernel: [B, C_in * K, P], channel-major like the weight.
        patches = F.unfold(x, conv.kernel_size, conv.dilation, tuple(padding), conv.stride)
        patches = patches.view(batch, groups, -1, positions).transpose(2, 3)
    else:
        flat = unfold_patches(x, conv)  # [B, P, C_in * K]
        patches = flat.view(batch, positions, groups, -1).transpose(1, 2)
    rows = grad.reshape(batch, groups, conv.out_channels // groups, positions)
    return torch.matmul(rows, patches).view(batch, *conv.weight.shape)  # [B, g, C_out/g, C_in/g*K]


def _unfold_is_faster(conv: ConvNd) -> bool:
    """Whether to instantiate by unfolded patches rather than the grouped kernel.

    Measured on the CPU (2 threads, batch 256, whole training steps timed A/B in one
    process): the grouped kernel is slow for narrow groups, e.g. a 3 -> 16 channel 3x3 stem
    on 32x32 inputs (6 GMAC/s against 60-70 for 16-32 channels), and unfolding that layer
    took the ResNet benchmark from 1.41x to 1.31x plain. With larger kernels the patch matrix
    grows with the kernel volume and the grouped kernel won again (a 1 -> 16 channel 8x8
    stem: 1.45x grouped, 1.75x unfolded); so did every layer with 16 or more input channels
    per group, including 64 -> 64 on 8x8 (1.41x grouped, 1.39-1.41x unfolded: no gain).
    """
    per_group_in = conv.in_channels // conv.groups
    return per_group_in <= 4 and math.prod(conv.kernel_size) <= 9


def _ghost_is_cheaper(conv: ConvNd, positions: int) -> bool:
    """Ghost Gram cost ``P^2 (C_out + C_in K) / g`` against the grouped kernel's
    ``P C_out C_in K / g`` per example, with the unfold copy counted against the ghost."""
    patch = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    out = conv.out_channels // conv.groups
    ghost = positions * positions * (out + patch) + 2 * positions * patch
    return ghost < 0.5 * positions * out * patch


def conv_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    x, out_grad = input_and_grad(record)
    x, out_grad = compute_dtype(x), compute_dtype(out_grad)
    batch, groups = x.shape[0], module.groups
    out_channels = module.out_channels
    positions = math.prod(out_grad.shape[2:])  # explicit: -1 is ambiguous when B = 0
    grad = out_grad.reshape(batch, out_channels, positions)  # [B, C_out, P]
    terms: list[GradTerm] = []
    if ctx.wants(module.weight):
        ghost = ctx.norm_route == "ghost" or (
            ctx.norm_route == "auto" and _ghost_is_cheaper(module, positions)
        )
        if not ghost and batch > 0:
            if _unfold_is_faster(module):
                grads = per_sample_conv_weight_grads_by_unfold(x, out_grad, module)
            else:
                grads = per_sample_conv_weight_grads(x, out_grad, module)
            terms.append(DenseTerm(module.weight, grads))
        else:
            patches = unfold_patches(x, module)  # [B, P, C_in * K]
            per_group = patches.shape[2] // groups
            cols = patches.reshape(batch, positions, groups, per_group).transpose(1, 2)
            rows = grad.reshape(batch, groups, out_channels // groups, positions).transpose(2, 3)
            terms.append(OuterTerm(module.weight, rows=rows, cols=cols))  # [B, g, P, *]
    if module.bias is not None and ctx.wants(module.bias):
        terms.append(DenseTerm(module.bias, grad.sum(dim=2)))
    return terms
