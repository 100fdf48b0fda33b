"""Per-sample gradient norms and clipped sums in one backward pass."""

from __future__ import annotations

from dptorch.per_sample.capture import is_captured
from dptorch.per_sample.engine import ClippedBatch, ClipPlan, PerSampleEngine
from dptorch.per_sample.rules import RuleContext, register_rule, unregister_rule
from dptorch.per_sample.rules.base import input_and_grad
from dptorch.per_sample.terms import DenseTerm, GradTerm, OuterTerm

__all__ = [
    "ClipPlan",
    "ClippedBatch",
    "DenseTerm",
    "GradTerm",
    "OuterTerm",
    "PerSampleEngine",
    "RuleContext",
    "input_and_grad",
    "is_captured",
    "register_rule",
    "unregister_rule",
]
