"""Per-layer rules, looked up by exact module type.

Exact types (not ``isinstance``) because a subclass may change ``forward``; such a subclass
falls back to ``torch.func``, which is always correct. :func:`register_rule` is the explicit
extension point for custom layers.
"""

from __future__ import annotations

from torch import nn

from dptorch.errors import DPTypeError
from dptorch.per_sample.rules.appended_position import appended_position_rule
from dptorch.per_sample.rules.base import Rule, RuleContext
from dptorch.per_sample.rules.conv import conv_rule
from dptorch.per_sample.rules.embedding import embedding_rule
from dptorch.per_sample.rules.functional import SUBTREE_OWNERS, functional_rule, owned_parameters
from dptorch.per_sample.rules.hf_conv1d import hf_conv1d_rule
from dptorch.per_sample.rules.linear import batch_first_linear_rule, linear_rule
from dptorch.per_sample.rules.normalization import (
    group_norm_rule,
    instance_norm_rule,
    layer_norm_rule,
)

_BUILTIN_RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: linear_rule,
    nn.Conv1d: conv_rule,
    nn.Conv2d: conv_rule,
    nn.Conv3d: conv_rule,
    nn.Embedding: embedding_rule,
    nn.LayerNorm: layer_norm_rule,
    nn.RMSNorm: layer_norm_rule,
    nn.GroupNorm: group_norm_rule,
    nn.InstanceNorm1d: instance_norm_rule,
    nn.InstanceNorm2d: instance_norm_rule,
    nn.InstanceNorm3d: instance_norm_rule,
}
# Layer types defined outside per_sample, looked up by "module.qualname" (still an exact
# type, not isinstance), so that importing dptorch imports neither transformers (seconds)
# nor dptorch.layers.
_RULES_BY_NAME: dict[str, Rule] = {
    "transformers.pytorch_utils.Conv1D": hf_conv1d_rule,
    "dptorch.layers.attention.AppendedPosition": appended_position_rule,
    "dptorch.layers.recurrent_base._SequenceLinear": batch_first_linear_rule,
    "dptorch.layers.recurrent_linear.RecurrentLinear": batch_first_linear_rule,
}
_custom_rules: dict[type[nn.Module], Rule] = {}


def _named_rule(kind: type[nn.Module]) -> Rule | None:
    return _RULES_BY_NAME.get(f"{kind.__module__}.{kind.__qualname__}")


def register_rule(module_type: type[nn.Module], rule: Rule, *, overwrite: bool = False) -> None:
    """Use ``rule`` for modules of exactly ``module_type``.

    A rule is ``rule(module, record, ctx) -> list[GradTerm]``: from one forward call (its
    inputs ``record.args`` / ``record.kwargs`` and output gradients ``record.grads``, see
    :func:`dptorch.per_sample.rules.base.input_and_grad`), the per-example gradients of the
    parameters the module owns directly (``ctx.wants(param)``), as
    :class:`~dptorch.per_sample.terms.DenseTerm` (``[B, *param.shape]``) or
    :class:`~dptorch.per_sample.terms.OuterTerm` (factors whose outer product is the gradient).
    With ``loss_reduction="mean"`` the output gradients are those of the batch-mean loss; the
    engine rescales, so the rule never needs to.

    Privacy: a rule must return the exact per-sample gradients. A registered (not built-in)
    rule is checked on the first non-empty step: autograd still computes that layer's ordinary
    gradient on that step, and the step is refused if the rule's per-example gradients do not
    add up to it. From the second step on, the ordinary gradient is skipped as for built-ins.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise DPTypeError(
            f"register_rule(module_type={module_type!r}) needs an nn.Module subclass."
        )
    if (module_type in _custom_rules or module_type in _BUILTIN_RULES) and not overwrite:
        raise DPTypeError(
            f"A rule for {module_type.__name__} exists already; pass overwrite=True to replace it."
        )
    _custom_rules[module_type] = rule


def unregister_rule(module_type: type[nn.Module]) -> None:
    """Forget a rule registered with :func:`register_rule` (built-in rules stay)."""
    _custom_rules.pop(module_type, None)


def has_registered_rule(module: nn.Module) -> bool:
    """Whether ``module``'s rule came from :func:`register_rule` (so is checked first)."""
    return type(module) in _custom_rules


def rule_for(module: nn.Module) -> Rule:
    """The rule for ``module``: a registered one, a built-in one, else the torch.func fallback."""
    kind = type(module)
    return (
        _custom_rules.get(kind) or _BUILTIN_RULES.get(kind) or _named_rule(kind) or functional_rule
    )


def has_dedicated_rule(module: nn.Module) -> bool:
    kind = type(module)
    return kind in _custom_rules or kind in _BUILTIN_RULES or _named_rule(kind) is not None


__all__ = [
    "SUBTREE_OWNERS",
    "Rule",
    "RuleContext",
    "has_dedicated_rule",
    "has_registered_rule",
    "owned_parameters",
    "register_rule",
    "rule_for",
    "unregister_rule",
]
