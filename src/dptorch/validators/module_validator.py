"""``ModuleValidator``: find, and where possible fix, layers that break per-sample privacy."""

from __future__ import annotations

import copy
import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from dptorch.errors import UnsupportedModuleError
from dptorch.validators.problems import ModuleProblem, find_problems


def _group_norm_for(batch_norm: _BatchNorm, num_groups: int | None) -> nn.GroupNorm:
    channels = batch_norm.num_features
    groups = num_groups if num_groups is not None else math.gcd(32, channels)
    norm = nn.GroupNorm(groups, channels, eps=batch_norm.eps, affine=batch_norm.affine)
    if batch_norm.affine:
        # The affine part means the same thing in both layers, so it is kept.
        norm.weight.data.copy_(batch_norm.weight.data)
        norm.bias.data.copy_(batch_norm.bias.data)
    return norm.to(device=batch_norm.weight.device if batch_norm.affine else None)


def _replacement(module: nn.Module, num_groups: int | None) -> nn.Module | None:
    if isinstance(module, _BatchNorm) and module.training:
        return _group_norm_for(module, num_groups)
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        fixed = copy.deepcopy(module)
        fixed.track_running_stats = False
        fixed.running_mean = None
        fixed.running_var = None
        fixed.num_batches_tracked = None
        return fixed
    return None


class ModuleValidator:
    """Checks a model before private training (Opacus-compatible names)."""

    @staticmethod
    def validate(module: nn.Module, *, strict: bool = False) -> list[ModuleProblem]:
        """Every problem found; with ``strict`` raise :class:`UnsupportedModuleError` instead."""
        problems = find_problems(module)
        if strict and problems:
            raise UnsupportedModuleError([str(p) for p in problems])
        return problems

    @staticmethod
    def is_valid(module: nn.Module) -> bool:
        return not find_problems(module)

    @staticmethod
    def fix(module: nn.Module, *, num_groups: int | None = None) -> nn.Module:
        """A copy of ``module`` with fixable layers replaced (BatchNorm -> GroupNorm, ...).

        Build the optimizer AFTER fixing: the copy has new parameter objects.
        """
        fixed = copy.deepcopy(module)
        root_replacement = _replacement(fixed, num_groups)
        if root_replacement is not None:
            return root_replacement
        for parent in list(fixed.modules()):
            for name, child in list(parent.named_children()):
                replacement = _replacement(child, num_groups)
                if replacement is not None:
                    setattr(parent, name, replacement)
        return fixed
