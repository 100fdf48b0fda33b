"""DP optimizers (Opacus import path: ``dptorch.optimizers.DPOptimizer``)."""

from __future__ import annotations

from dptorch.optimizers.dp_optimizer import DPOptimizer, StepStats

__all__ = ["DPOptimizer", "StepStats"]
