"""Poisson-sampled data loading: the sampling that DP-SGD's privacy accounting assumes."""

from __future__ import annotations

from dptorch.data.augmentation import AugmentationMultiplicity, flatten_views
from dptorch.data.batch_memory_manager import BatchMemoryManager
from dptorch.data.distributed_sampler import DistributedDPDataLoader, DistributedPoissonBatchSampler
from dptorch.data.dp_data_loader import DPDataLoader
from dptorch.data.poisson_sampler import PoissonBatchSampler
from dptorch.data.sample_rate import infer_sample_rate

__all__ = [
    "AugmentationMultiplicity",
    "BatchMemoryManager",
    "DPDataLoader",
    "DistributedDPDataLoader",
    "DistributedPoissonBatchSampler",
    "PoissonBatchSampler",
    "flatten_views",
    "infer_sample_rate",
]
