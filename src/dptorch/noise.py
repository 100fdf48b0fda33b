"""Gaussian noise for the clipped sum.

Privacy: noise of standard deviation ``noise_multiplier * sensitivity`` is drawn once per
logical step for every released coordinate, in float32 or better (float64 parameters get
float64 noise), from ``generator`` (the global torch generator when ``None``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Never draw noise in half precision: its rounding would distort the distribution."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gaussian_noise(
    shape: torch.Size,
    *,
    std: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """A ``shape`` tensor of independent ``N(0, std^2)`` draws."""
    out = torch.empty(shape, dtype=noise_dtype(dtype), device=device)
    if std == 0:
        return out.zero_()
    return out.normal_(mean=0.0, std=std, generator=generator)
