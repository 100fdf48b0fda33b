"""Per-sample gradient norms and clipped sums in one backward pass."""

from __future__ import annotations

from dptorch.per_sample.capture import is_captured
from dptorch.per_sample.engine import ClippedBatch, PerSampleEngine
from dptorch.per_sample.rules import register_rule

__all__ = ["ClippedBatch", "PerSampleEngine", "is_captured", "register_rule"]
