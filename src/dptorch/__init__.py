"""dptorch: differentially private training (DP-SGD) for any PyTorch model.

The three-line change::

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0)
    ...
    engine.get_epsilon(delta=1e-5)
"""

from __future__ import annotations

from dptorch.callbacks import CSVLogger, StepRecord, StepReporter, TensorBoardLogger
from dptorch.data import BatchMemoryManager, DPDataLoader
from dptorch.diagnostics import sweep_max_grad_norm
from dptorch.errors import (
    DPError,
    DPTypeError,
    DPValueError,
    DPWarning,
    MissingDependencyError,
    ParameterMismatchError,
    PrivacyBudgetExceededError,
    SampleRateError,
    TrainingLoopError,
    UnsupportedModuleError,
)
from dptorch.host_memory import retain_freed_memory
from dptorch.optimizers import DPOptimizer
from dptorch.per_sample import register_rule
from dptorch.privacy_engine import PrivacyEngine
from dptorch.validators import ModuleValidator

__version__ = "0.1.0"

__all__ = [
    "BatchMemoryManager",
    "CSVLogger",
    "DPDataLoader",
    "DPError",
    "DPOptimizer",
    "DPTypeError",
    "DPValueError",
    "DPWarning",
    "MissingDependencyError",
    "ModuleValidator",
    "ParameterMismatchError",
    "PrivacyBudgetExceededError",
    "PrivacyEngine",
    "SampleRateError",
    "StepRecord",
    "StepReporter",
    "TensorBoardLogger",
    "TrainingLoopError",
    "UnsupportedModuleError",
    "__version__",
    "register_rule",
    "retain_freed_memory",
    "sweep_max_grad_norm",
]
