"""dptorch: differentially private training (DP-SGD) for any PyTorch model.

The three-line change::

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0)
    ...
    engine.get_epsilon(delta=1e-5)
"""

from __future__ import annotations

from dptorch.data import DPDataLoader
from dptorch.errors import (
    DPError,
    DPTypeError,
    DPValueError,
    DPWarning,
    ParameterMismatchError,
    SampleRateError,
    TrainingLoopError,
    UnsupportedModuleError,
)
from dptorch.optimizers import DPOptimizer
from dptorch.per_sample import register_rule
from dptorch.privacy_engine import PrivacyEngine
from dptorch.validators import ModuleValidator

__version__ = "0.1.0"

__all__ = [
    "DPDataLoader",
    "DPError",
    "DPOptimizer",
    "DPTypeError",
    "DPValueError",
    "DPWarning",
    "ModuleValidator",
    "ParameterMismatchError",
    "PrivacyEngine",
    "SampleRateError",
    "TrainingLoopError",
    "UnsupportedModuleError",
    "__version__",
    "register_rule",
]
