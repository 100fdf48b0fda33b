"""Privacy accountants: record each DP-SGD step, then report (epsilon, delta).

Pure numpy/scipy: nothing here imports torch, so accounting can run (and be tested)
without a model. The analyses themselves live in :mod:`dptorch.accountants.analysis`.
"""

from __future__ import annotations

from dptorch.accountants.base import Accountant
from dptorch.accountants.calibration import get_noise_multiplier
from dptorch.accountants.gdp import GaussianAccountant
from dptorch.accountants.prv import PRVAccountant
from dptorch.accountants.rdp import RDPAccountant
from dptorch.accountants.registry import create_accountant, register_accountant

__all__ = [
    "Accountant",
    "GaussianAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
    "get_noise_multiplier",
    "register_accountant",
]
