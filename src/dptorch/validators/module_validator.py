"""``ModuleValidator``: find, and where possible fix, layers that break per-sample privacy."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from dptorch.errors import DPValueError, UnsupportedModuleError
from dptorch.validators.problems import ModuleProblem, find_problems

BatchNormReplacement = Literal["group_norm", "instance_norm"]


def _same_place(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on the device and in the dtype of ``old``'s first tensor (if it has any)."""
    reference: torch.Tensor | None = next(iter(old.parameters()), None)
    if reference is None:
        reference = next(iter(old.buffers()), None)
    if reference is None:
        return new
    dtype = reference.dtype if reference.is_floating_point() else None
    return new.to(device=reference.device, dtype=dtype)


def _group_norm_for(batch_norm: _BatchNorm, num_groups: int | None) -> nn.GroupNorm:
    channels = batch_norm.num_features
    groups = num_groups if num_groups is not None else math.gcd(32, channels)
    if channels % groups:
        raise DPValueError(
            f"num_groups={groups} does not divide the {channels} channels of a "
            f"{type(batch_norm).__name__}; pick a divisor of {channels}, or leave num_groups "
            "unset for gcd(32, channels)."
        )
    norm = nn.GroupNorm(groups, channels, eps=batch_norm.eps, affine=batch_norm.affine)
    norm = _same_place(norm, batch_norm)  # type: ignore[assignment]
    if batch_norm.affine:
        # The affine part means the same thing in both layers, so it is kept.
        norm.weight.data.copy_(batch_norm.weight.data)
        norm.bias.data.copy_(batch_norm.bias.data)
    norm.train(batch_norm.training)
    return norm


def _instance_norm_for(batch_norm: _BatchNorm) -> nn.Module:
    dims = {nn.BatchNorm1d: nn.InstanceNorm1d, nn.BatchNorm3d: nn.InstanceNorm3d}
    kind = dims.get(type(batch_norm), nn.InstanceNorm2d)  # type: ignore[call-overload]
    norm: Any = kind(batch_norm.num_features, eps=batch_norm.eps, affine=batch_norm.affine)
    norm = _same_place(norm, batch_norm)
    if batch_norm.affine:
        norm.weight.data.copy_(batch_norm.weight.data)
        norm.bias.data.copy_(batch_norm.bias.data)
    norm.train(batch_norm.training)
    return norm


def _replacement(
    module: nn.Module,
    num_groups: int | None,
    batch_norm: BatchNormReplacement,
    replace_layers: bool,
) -> nn.Module | None:
    if isinstance(module, _BatchNorm) and module.training:
        if batch_norm == "instance_norm":
            return _instance_norm_for(module)
        return _group_norm_for(module, num_groups)
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        fixed = copy.deepcopy(module)
        fixed.track_running_stats = False
        fixed.running_mean = None
        fixed.running_var = None
        fixed.num_batches_tracked = None
        return fixed
    if replace_layers:
        return _dp_layer_for(module)
    return None


def _dp_layer_for(module: nn.Module) -> nn.Module | None:
    """The DP-ready drop-in for a stock layer whose only per-sample path is slow or missing."""
    # Imported here: dptorch.layers imports the per-sample machinery, which imports this.
    from dptorch.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention

    swaps: dict[type[nn.Module], Any] = {
        nn.MultiheadAttention: DPMultiheadAttention,
        nn.LSTM: DPLSTM,
        nn.GRU: DPGRU,
        nn.RNN: DPRNN,
    }
    target = swaps.get(type(module))
    if target is None or not any(p.requires_grad for p in module.parameters()):
        return None  # frozen layers need no per-sample gradients: keep them as they are
    replacement: nn.Module = target.from_module(module)
    return replacement


class ModuleValidator:
    """Checks a model before private training (Opacus-compatible names)."""

    @staticmethod
    def validate(module: nn.Module, *, strict: bool = False) -> list[ModuleProblem]:
        """Every problem found; with ``strict`` raise :class:`UnsupportedModuleError` instead.

        Each problem names the submodule's dotted path and type, why it breaks per-sample
        privacy, and what :meth:`fix` (or the user) can do about it.
        """
        problems = find_problems(module)
        if strict and problems:
            raise UnsupportedModuleError([str(p) for p in problems])
        return problems

    @staticmethod
    def is_valid(module: nn.Module) -> bool:
        return not find_problems(module)

    @staticmethod
    def fix(
        module: nn.Module,
        *,
        num_groups: int | None = None,
        batch_norm: BatchNormReplacement = "group_norm",
        replace_layers: bool = True,
    ) -> nn.Module:
        """A copy of ``module`` with fixable layers replaced.

        * ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (in training mode) become ``GroupNorm``
          with ``gcd(32, C)`` groups (or ``num_groups``), or ``InstanceNorm`` with
          ``batch_norm="instance_norm"``; affine weights are kept.
        * ``InstanceNorm`` with running statistics loses them.
        * With ``replace_layers`` (default), trainable ``nn.MultiheadAttention``,
          ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` become :class:`~dptorch.layers.DPMultiheadAttention`,
          :class:`~dptorch.layers.DPLSTM`, :class:`~dptorch.layers.DPGRU`,
          :class:`~dptorch.layers.DPRNN`: same state_dict keys, same outputs, one-pass
          per-sample gradients.

        Device, dtype and train/eval mode are kept. Build the optimizer AFTER fixing: the
        copy has new parameter objects.
        """
        if batch_norm not in ("group_norm", "instance_norm"):
            raise DPValueError(
                f"batch_norm={batch_norm!r} must be 'group_norm' or 'instance_norm'."
            )
        fixed = copy.deepcopy(module)
        root_replacement = _replacement(fixed, num_groups, batch_norm, replace_layers)
        if root_replacement is not None:
            return root_replacement
        for parent in list(fixed.modules()):
            for name, child in list(parent.named_children()):
                replacement = _replacement(child, num_groups, batch_norm, replace_layers)
                if replacement is not None:
                    setattr(parent, name, replacement)
        return fixed
