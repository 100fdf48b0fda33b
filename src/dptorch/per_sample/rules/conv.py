"""Per-sample gradients of ``nn.Conv1d/2d/3d``.

Two exact forms, chosen per call by cost:

* **Instantiated**, in one of three ways:

  - *by a grouped convolution*: the per-example weight gradients of a batch are the weight
    gradient of ONE convolution whose groups are the examples: fold the batch into the
    channels (``[1, B*C_in, ...]``), ask autograd's convolution kernel for the weight gradient
    of a ``B * groups``-group convolution, and read it as ``[B, *weight.shape]``. Same
    arithmetic as the ordinary weight gradient (which is skipped), no patch matrix;
  - *by unfolded patches and one batched matmul*: ``G[i] @ patches[i]`` per example. It
    writes the patch matrix (``B * P * C_in * K`` values) but runs as dense GEMMs; the grouped
    kernel is slow where each group is narrow (few input channels), or wide with few output
    positions, and there this form wins (see :func:`_unfold_is_faster`);
  - *by one grouped forward convolution*, for a layer that reads a single input channel:
    each example's input correlated with its output gradient as the kernel (stride and
    dilation swapped), see :func:`per_sample_conv_weight_grads_by_forward_conv`.
  Where the per-example gradients are much larger than the layer's input and output
  gradient (:func:`_recompute_saves_memory`), only their norms are kept; the weighted sum
  is then one ordinary batched weight-gradient kernel with each example's output gradient
  scaled by its clipping factor (:class:`~dptorch.per_sample.terms.RecomputedTerm`).
* **Ghost, on unfolded patches.** A convolution is a Linear layer applied at every output
  position ``p`` to the input patch under the kernel, so ``g_i = sum_p G[i, :, p] (x)
  patch[i, p]`` per group: an outer-product term. Cheaper only when the output has few
  positions (the Gram matrices are ``P x P``).

Patches and the folded convolution use the module's own padding (numbers, ``"same"``,
``"valid"``, any ``padding_mode``), stride and dilation, so they match the forward exactly.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import RuleContext, compute_dtype, input_and_grad
from dptorch.per_sample.terms import (
    DenseTerm,
    GradTerm,
    OuterTerm,
    RecomputedTerm,
    rowwise_sq_norm,
    scale_samples,
)

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


def _windows(x: Tensor, conv: ConvNd) -> Tensor:
    """``[B, C_in, o_1..o_n, k_1..k_n]``: a view of each output position's input window."""
    windows = _padded_input(x, conv)
    for dim in range(len(conv.kernel_size)):
        span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        windows = windows.unfold(2 + dim, span, conv.stride[dim])
    # [B, C, o_1..o_n, span_1..span_n]: keep every dilation-th element of each window.
    index: tuple[Any, ...] = (Ellipsis, *(slice(None, None, d) for d in conv.dilation))
    return windows[index]


def unfold_patches(x: Tensor, conv: ConvNd) -> Tensor:
    """``[B, P, C_in * prod(kernel)]`` patches, channel-major like ``conv.weight``."""
    spatial = len(conv.kernel_size)
    out_dims = range(2, 2 + spatial)
    kernel_dims = range(2 + spatial, 2 + 2 * spatial)
    patches = _windows(x, conv).permute(0, *out_dims, 1, *kernel_dims)  # [B, o..., C, k...]
    positions = math.prod(patches.shape[1 : 1 + spatial])
    return patches.reshape(x.shape[0], positions, x.shape[1] * math.prod(conv.kernel_size))


def channel_major_patches(x: Tensor, conv: ConvNd) -> Tensor:
    """``[B, C_in * prod(kernel), P]`` patches, laid out like ``F.unfold``'s (and the weight's).

    One strided copy of the input's windows, 2-10x faster than ``F.unfold`` on the CPU (a
    3 -> 16 channel 3x3 layer on 32x32, batch 256: 0.7 ms against 6.7 ms). The windows are
    copied straight into each layout: making :func:`unfold_patches`' from this one (a
    transposing copy) was faster for that layer (4.8 against 14.9 ms) but slower for 64
    channels on 8x8 (35 against 22 ms).
    """
    spatial = len(conv.kernel_size)
    out_dims = range(2, 2 + spatial)
    kernel_dims = range(2 + spatial, 2 + 2 * spatial)
    patches = _windows(x, conv).permute(0, 1, *kernel_dims, *out_dims)  # [B, C, k..., o...]
    positions = math.prod(patches.shape[2 + spatial :])
    return patches.reshape(x.shape[0], x.shape[1] * math.prod(conv.kernel_size), positions)


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
    weight_shape = conv.weight.shape
    weight_grad = _weight_grad_kernel(
        grad.reshape(1, batch * grad.shape[1], *grad.shape[2:]),
        x.reshape(1, batch * x.shape[1], *x.shape[2:]),
        conv,
        [batch * weight_shape[0], *weight_shape[1:]],
        groups=batch * conv.groups,
    )
    return weight_grad.view(batch, *weight_shape)


_FORWARD_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def per_sample_conv_weight_grads_by_forward_conv(x: Tensor, grad: Tensor, conv: ConvNd) -> Tensor:
    """``[B, *conv.weight.shape]`` for a layer with ONE input channel per group (a first
    layer on grey images, a depthwise convolution), by one grouped FORWARD convolution.

    With one input channel per group, ``g_i[o, 0, k] = sum_p G_i[o, p] x_i[c(o), s p + d k]``
    (stride ``s``, dilation ``d``, ``x`` padded, ``c(o)`` the input channel of output channel
    ``o``). Read as a function of ``k`` this is a correlation of the input channel with the
    output gradient ``G_i[o]`` as the kernel, taken with stride ``d`` and dilation ``s``: a
    convolution whose groups are the ``B * C_in`` example channels, each with its
    ``C_out / C_in`` gradient maps as kernels. Its first ``k`` outputs per dimension are the
    gradient (a further one may exist where the forward's stride left input unread).
    """
    assert conv.in_channels == conv.groups, "one input channel per group"
    batch, spatial = x.shape[0], len(conv.kernel_size)
    padding = _explicit_padding(conv)
    if padding is None:
        x, padding = _padded_input(x, conv), [0] * spatial
    channels = x.reshape(1, batch * conv.in_channels, *x.shape[2:])
    kernels = grad.reshape(batch * conv.out_channels, 1, *grad.shape[2:])
    correlations = _FORWARD_CONVOLUTIONS[spatial](
        channels,
        kernels,
        None,
        stride=list(conv.dilation),
        padding=padding,
        dilation=list(conv.stride),
        groups=batch * conv.groups,
    )
    window: tuple[Any, ...] = (0, slice(None), *(slice(0, k) for k in conv.kernel_size))
    return correlations[window].reshape(batch, *conv.weight.shape)


def per_sample_conv_weight_grads_by_unfold(x: Tensor, grad: Tensor, conv: ConvNd) -> Tensor:
    """``[B, *conv.weight.shape]`` like :func:`per_sample_conv_weight_grads`, by unfolded
    patches and one batched matmul per group (``[C_out/g, P] @ [P, C_in/g * K]``)."""
    batch, groups = x.shape[0], conv.groups
    positions = math.prod(grad.shape[2:])
    # [B, C_in * K, P] -> [B, g, P, C_in/g * K]: a transposed view, which the matmul reads
    # as it is (no copy).
    patches = channel_major_patches(x, conv).view(batch, groups, -1, positions).transpose(2, 3)
    rows = grad.reshape(batch, groups, conv.out_channels // groups, positions)
    return torch.matmul(rows, patches).view(batch, *conv.weight.shape)  # [B, g, C_out/g, C_in/g*K]


def _unfold_is_faster(conv: ConvNd, positions: int) -> bool:
    """Whether to instantiate by patches and a batched matmul rather than the grouped kernel.

    Measured on the CPU (2 threads, batch 256) by ``benchmarks/conv_routes.py`` (norms and
    weighted sum included; 14 layer shapes; the figures below are from its run on a Xeon at
    commit dd41891, whose results file a later run on an AMD EPYC replaced; there the rule's
    choice between patches and the grouped kernel was the faster one on 11 of the 13 layers
    it decides, the two others within 20%: 32 -> 64 3x3 stride 2, 10.8 against 9.7 ms, and
    the CNN's 16 -> 32, 4.8 against 4.0).
    The grouped kernel is slow for narrow groups (a 3 -> 16 channel 3x3 stem on 32x32: 11.1
    against 5.7 ms by patches), for 1x1 kernels, whose patches are the input itself (32 -> 64
    and 64 -> 128 on 8x8 outputs: 1.5 against 0.9 ms and 3.4 against 1.6 ms), and wherever
    the output has few positions for the size of a patch, ``4 P <= C_in K / g``: each
    example's ``[C_out, P] @ [P, C_in K]`` is then a well-shaped GEMM and the patch copy small
    (32 -> 64 3x3 on 8x8 outputs: 13.2 against 8.8 ms; 32 -> 32 5x5 on 4x4: 16.4 against 8.4
    ms). It is faster with more positions (16 -> 16 3x3 on 32x32: 10 against 73 ms; 16 -> 32
    3x3 on 7x7: 1.8 against 2.7 ms). Misjudged by this rule: LeNet's 6 -> 16 5x5 on 10x10
    outputs (grouped, 4.7 against 3.9 ms). The benchmark CNN's 16 -> 32 4x4 layer on 5x5
    outputs is a close call (2.2-3.9 ms grouped, 2.5-3.6 by patches over four runs); by
    patches, its whole step timed A/B in one process went from 1.73x to 1.51x plain and from
    1.79x to 1.48x in two runs, and its live-tensor peak from 39 to 31 MB (the grouped
    kernel's temporaries are three times its output).
    """
    per_group_in = conv.in_channels // conv.groups
    if per_group_in == 1 and conv.groups > 1:
        # Depthwise: the patches' matmul is B * groups products of one row each (32
        # channels 3x3 on 16x16: 37.5 ms against 2.4 grouped; 64 on 8x8: 16.7 against 0.8).
        return False
    kernel = math.prod(conv.kernel_size)
    narrow = per_group_in <= 4 and kernel <= 9
    return narrow or kernel == 1 or 4 * positions <= per_group_in * kernel


def _forward_conv_is_faster(conv: ConvNd, positions: int) -> bool:
    """Whether to instantiate by :func:`per_sample_conv_weight_grads_by_forward_conv`: for a
    layer reading a single input channel (a first layer on grey images or signals).

    Measured on the CPU (2 threads, batch 256, norms and weighted sum included) by
    ``benchmarks/conv_routes.py`` (results/conv_routes.md, AMD EPYC): the benchmark CNN's
    1 -> 16 8x8 stride-2 layer 2.54 ms against 3.13 grouped (the previous choice) and 3.36
    by patches; LeNet's 1 -> 6 5x5 1.97 against 3.32 grouped (the previous choice) and 2.07;
    1 -> 32 3x3 3.35 against 3.84 by patches (the previous choice). In an earlier ad hoc run
    a 1 -> 16 k7 Conv1d on 256 samples took 0.61 against 0.73-0.77 grouped and 2.48 by
    patches (the previous choice), and on larger inputs (ad hoc, against grouped / patches):
    1 -> 32 3x3 on 128x128 at batch 64, 12.6 against 18.5 / 28.1 ms; 1 -> 64 7x7 stride 2 on
    224x224 at batch 32, 25.5 against 28.4 / 52.0; 1 -> 32 k9 Conv1d on 4096 samples at
    batch 64, 3.1 against 6.3 / 8.7. Depthwise layers (one input channel per group, many
    groups) keep the grouped kernel, which was faster there (32 channels 3x3 on 16x16: 2.38
    against 2.72; 64 on 8x8: 0.79 against 0.88). Only measured on the CPU, so only taken
    there: on an accelerator the previous choice stands until timed.
    """
    return conv.in_channels == 1 and conv.groups == 1 and conv.weight.device.type == "cpu"


def _ghost_is_cheaper(conv: ConvNd, positions: int) -> bool:
    """Ghost Gram cost ``P^2 (C_out + C_in K) / g`` against the grouped kernel's
    ``P C_out C_in K / g`` per example, with the unfold copy counted against the ghost."""
    patch = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    out = conv.out_channels // conv.groups
    ghost = positions * positions * (out + patch) + 2 * positions * patch
    return ghost < 0.5 * positions * out * patch


def weighted_conv_weight_grad(
    x: Tensor, grad: Tensor, conv: ConvNd, factors: Tensor, sanitize: bool
) -> Tensor:
    """``sum_i c_i g_i`` of the weight: ONE batched weight-gradient kernel (the ordinary one)
    on the output gradient with each example's slice scaled by its factor ``c_i``.

    With ``sanitize`` the input and output gradient of an example with factor 0 are zeroed
    first, so a NaN or inf in either cannot reach the sum (``0 * nan`` is ``nan``).
    """
    scaled = scale_samples(grad, factors, sanitize)
    if sanitize:
        x = scale_samples(x, (factors != 0).to(x.dtype), sanitize=True)
    return _weight_grad_kernel(scaled, x, conv, list(conv.weight.shape), groups=conv.groups)


def _weight_grad_kernel(
    grad: Tensor, x: Tensor, conv: ConvNd, weight_shape: list[int], groups: int
) -> Tensor:
    """The weight gradient of ``conv``'s convolution (its stride, padding and dilation) with
    ``groups`` groups of ``x``, given the output gradient ``grad``: autograd's own kernel.

    Only the weight's shape is read, so a zero-stride view stands in for it (the kernel still
    makes it contiguous internally, a temporary the size of ``weight_shape``).
    """
    padding = _explicit_padding(conv)
    if padding is None:
        x, padding = _padded_input(x, conv), [0] * len(conv.kernel_size)
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        grad,
        x,
        x.new_empty(()).expand(weight_shape),
        None,
        list(conv.stride),
        padding,
        list(conv.dilation),
        False,
        [0] * len(conv.kernel_size),
        groups,
        [False, True, False],
    )
    return weight_grad


def _recompute_saves_memory(conv: ConvNd, x: Tensor, grad: Tensor) -> bool:
    """Whether to keep the input and output gradient (and the norms) instead of the
    per-example weight gradients from the backward pass to the release.

    Chosen where the weight is at least the size of one example's input and output gradient
    together: then the kept tensors are never larger, and during the backward pass, where
    the step's peak is, the input is held anyway (autograd saved it for the layer's own
    backward), so only the per-example gradients would be extra. The work added at the
    release, one batched weight gradient (what non-private training computes for every
    layer), is small for such layers (few output positions). Measured by
    ``benchmarks/training.py``'s live-tensor peak (see benchmarks/README.md): with "at least
    twice" instead, the ResNet's 32 -> 64 3x3 stride-2 layer kept its per-example gradients
    (19 MB at batch 256) and the step's peak was 210.6 MB against 204.6 (plain 176.3), at
    the same step time in an alternating A/B (1.28x and 1.23x plain).
    """
    batch = x.shape[0]
    per_example = (x.numel() + grad.numel()) // max(batch, 1)
    return conv.weight.numel() >= per_example


Instantiation = Literal["forward conv", "unfold", "grouped"]


def instantiation_for(conv: ConvNd, positions: int) -> Instantiation:
    """Which way :func:`per_example_weight_grads` instantiates this layer's gradients."""
    if _forward_conv_is_faster(conv, positions):
        return "forward conv"
    return "unfold" if _unfold_is_faster(conv, positions) else "grouped"


WeightTermForm = Literal["ghost", "recomputed", "instantiated"]


def weight_term_form(conv: ConvNd, x: Tensor, out_grad: Tensor, norm_route: str) -> WeightTermForm:
    """How :func:`conv_rule` keeps the weight's per-example gradients for ``norm_route``
    (``"auto"``, ``"ghost"`` or ``"instantiate"``): ghost norms, norms with the sum
    recomputed at the release, or instantiated gradients (by :func:`instantiation_for`)."""
    positions = math.prod(out_grad.shape[2:])
    if norm_route == "ghost" or (norm_route == "auto" and _ghost_is_cheaper(conv, positions)):
        return "ghost"
    return "recomputed" if _recompute_saves_memory(conv, x, out_grad) else "instantiated"


def per_example_weight_grads(x: Tensor, grad: Tensor, conv: ConvNd) -> Tensor:
    """``[B, *conv.weight.shape]`` by the fastest instantiation for this layer."""
    way = instantiation_for(conv, math.prod(grad.shape[2:]))
    if way == "forward conv":
        return per_sample_conv_weight_grads_by_forward_conv(x, grad, conv)
    if way == "unfold":
        return per_sample_conv_weight_grads_by_unfold(x, grad, conv)
    return per_sample_conv_weight_grads(x, grad, conv)


def _recomputed_weight_term(
    conv: ConvNd, x: Tensor, grad: Tensor, rows_per_example: int = 1
) -> RecomputedTerm:
    """The weight's per-example norms, formed a slice of the batch at a time and freed; its
    weighted sum recomputed from ``x`` and ``grad`` when the factors are known.

    Each slice's gradients (and patches) are at most about as large as the ``x`` and
    ``grad`` the term keeps, so forming them never costs more memory than keeping them.
    With ``rows_per_example = K > 1`` the slices hold whole examples and the norms are those
    of each example's mean over its ``K`` rows, the ones the clipping needs: the rows'
    gradients are then never formed again to group them.
    """
    batch = x.shape[0]
    group = rows_per_example if rows_per_example > 1 and batch % rows_per_example == 0 else 1
    per_example_kept = (x.numel() + grad.numel()) // batch
    slice_size = max(1, batch * per_example_kept // conv.weight.numel())
    slice_size = max(group, slice_size - slice_size % group)  # whole examples per slice

    def slice_norms_sq(xs: Tensor, gs: Tensor) -> Tensor:
        grads = per_example_weight_grads(xs, gs, conv).reshape(xs.shape[0], -1)
        if group > 1:  # each example's mean over its rows
            grads = grads.view(-1, group, grads.shape[1]).mean(dim=1)
        return rowwise_sq_norm(grads)

    norms_sq = torch.cat(
        [
            slice_norms_sq(xs, gs)
            for xs, gs in zip(x.split(slice_size), grad.split(slice_size), strict=True)
        ]
    )

    def form() -> Tensor:
        return per_example_weight_grads(x, grad, conv)

    def contract(factors: Tensor, sanitize: bool) -> Tensor:
        return weighted_conv_weight_grad(x, grad, conv, factors, sanitize)

    return RecomputedTerm(conv.weight, norms_sq, form, contract, rows_per_norm=group)


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
        form = weight_term_form(module, x, out_grad, ctx.norm_route)
        if form == "recomputed" and batch > 0:
            terms.append(_recomputed_weight_term(module, x, out_grad, ctx.rows_per_example))
        elif form == "instantiated" and batch > 0:
            grads = per_example_weight_grads(x, out_grad, module)
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
