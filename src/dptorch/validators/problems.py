"""What makes a module unfit for per-sample clipping, found by looking at it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


@dataclass(frozen=True)
class ModuleProblem:
    """One reason one submodule breaks per-sample privacy, and its fix."""

    path: str
    module_type: str
    reason: str
    fix: str
    fixable: bool = False

    def __str__(self) -> str:
        return f"{self.path} ({self.module_type}) {self.reason}; {self.fix}"


def _problem_of(path: str, module: nn.Module) -> ModuleProblem | None:
    kind = type(module).__name__
    if isinstance(module, _BatchNorm) and module.training:
        return ModuleProblem(
            path,
            kind,
            "normalises with statistics of the whole batch, so each example's output and "
            "gradient depend on the other examples and per-sample clipping no longer bounds "
            "one example's influence",
            "run model = ModuleValidator.fix(model) BEFORE building the optimizer to replace it "
            "with GroupNorm",
            fixable=True,
        )
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        return ModuleProblem(
            path,
            kind,
            "tracks running statistics averaged over all training examples and releases them "
            "without noise",
            "construct it with track_running_stats=False, or run ModuleValidator.fix(model)",
            fixable=True,
        )
    if type(module) in (nn.GRU, nn.RNN) and any(p.requires_grad for p in module.parameters()):
        return ModuleProblem(
            path,
            kind,
            "has no dedicated per-sample rule, and torch.func cannot batch its fused kernel, "
            "so its per-example gradients cannot be computed",
            f"run model = ModuleValidator.fix(model) BEFORE building the optimizer to replace "
            f"it with dptorch.layers.DP{kind} (same state_dict, same outputs), or freeze it "
            "with requires_grad_(False)",
            fixable=True,
        )
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return ModuleProblem(
            path,
            kind,
            "scales gradients by token frequency over the whole batch, which mixes examples",
            "construct it with scale_grad_by_freq=False",
        )
    if isinstance(module, nn.Embedding) and module.sparse:
        return ModuleProblem(
            path,
            kind,
            "produces sparse gradients, but DP noise makes every row's gradient dense",
            "construct it with sparse=False",
        )
    return None


def find_problems(module: nn.Module) -> list[ModuleProblem]:
    """Every problem in ``module`` and its submodules, root first."""
    problems: list[ModuleProblem] = []
    if not module.training:
        problems.append(
            ModuleProblem(
                "<root>",
                type(module).__name__,
                "is in eval mode, so layers such as dropout and normalisation would not behave as "
                "in training",
                "call model.train() before make_private",
            )
        )
    if not any(p.requires_grad for p in module.parameters()):
        problems.append(
            ModuleProblem(
                "<root>",
                type(module).__name__,
                "has no trainable parameters, so there is nothing to train privately",
                "set requires_grad=True on the parameters to train",
            )
        )
    for path, sub in module.named_modules():
        problem = _problem_of(path or "<root>", sub)
        if problem is not None:
            problems.append(problem)
    return problems
