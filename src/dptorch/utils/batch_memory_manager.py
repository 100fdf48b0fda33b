"""Opacus-compatible import path: ``from dptorch.utils.batch_memory_manager import ...``.

The implementation lives in :mod:`dptorch.data.batch_memory_manager`.
"""

from __future__ import annotations

from dptorch.data.batch_memory_manager import BatchMemoryManager

__all__ = ["BatchMemoryManager"]
