"""Opacus-compatible import path: ``from dptorch.data_loader import DPDataLoader``.

The implementation lives in :mod:`dptorch.data`.
"""

from __future__ import annotations

from dptorch.data import DPDataLoader, PoissonBatchSampler, infer_sample_rate

__all__ = ["DPDataLoader", "PoissonBatchSampler", "infer_sample_rate"]
