"""Layers ready for per-sample clipping: drop-in replacements for PyTorch layers that
dptorch could otherwise only handle through the slow ``torch.func`` fallback."""

from __future__ import annotations

from dptorch.layers.attention import DPMultiheadAttention
from dptorch.layers.recurrent import DPGRU, DPLSTM, DPRNN

__all__ = [
    "DPGRU",
    "DPLSTM",
    "DPRNN",
    "DPMultiheadAttention",
]
