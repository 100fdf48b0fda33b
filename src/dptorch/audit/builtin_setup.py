"""The small built-in audit setup: a generated dataset and an MLP, fast on a CPU.

Used by ``dptorch audit``, the tests and ``benchmarks/audit.py``. With gradient canaries
the real examples only need to be real training (they never touch a canary's direction), so
a small synthetic task keeps an audit to about a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptorch.accountants import get_noise_multiplier

__all__ = ["AuditSetup", "small_classification_data", "small_mlp", "small_setup"]

FEATURES = 10
CLASSES = 2


def small_classification_data(num_examples: int = 256, *, seed: int = 0) -> TensorDataset:
    """Two Gaussian classes in 10 dimensions, means 1.5 apart: ``(x [N, 10], y [N])``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (num_examples,), generator=generator)
    features = torch.randn(num_examples, FEATURES, generator=generator)
    features[:, 0] += 1.5 * labels.float() - 0.75
    return TensorDataset(features, labels)


def small_mlp() -> nn.Module:
    """``Linear(10, 32) -> ReLU -> Linear(32, 2)``: logits for :func:`small_classification_data`."""
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


@dataclass(frozen=True)
class AuditSetup:
    """A run to audit: the DP-SGD settings, with sigma calibrated to a target epsilon.

    Attributes:
        noise_multiplier: sigma giving ``target_epsilon`` at ``delta`` after ``steps``
            Poisson steps at ``sample_rate`` (PRV accountant).
        max_grad_norm: C.
        sample_rate: q.
        steps: DP-SGD steps.
        delta: delta.
        target_epsilon: the accountant's epsilon the setup aims at.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: float


def small_setup(
    *,
    target_epsilon: float = 4.0,
    sample_rate: float = 0.5,
    steps: int = 20,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
) -> AuditSetup:
    """Settings where one run with about 1000 gradient canaries separates bugs from no bugs.

    Why these defaults: a high sample rate and few steps sample every included canary
    several times, so its score stands clear of the noise exactly as much as the privacy
    analysis allows; and an accountant epsilon near 4 lies below the about ``log(m / 3)``
    that one run with m canaries can show at most, so a broken run can exceed it.
    """
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant="prv",
    )
    return AuditSetup(sigma, max_grad_norm, sample_rate, steps, delta, target_epsilon)
