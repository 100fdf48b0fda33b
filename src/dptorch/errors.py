"""The one error hierarchy of dptorch, and its warning category.

Every error subclasses :class:`DPError` and the builtin it refines, so callers may catch
either ``dptorch.DPError`` or the familiar ``ValueError`` / ``TypeError``. Messages say what
went wrong, where (argument or module path), and how to fix it.
"""

from __future__ import annotations


class DPError(Exception):
    """Base class of every error dptorch raises on purpose."""


class DPValueError(DPError, ValueError):
    """An argument has a value that would make training or accounting wrong."""


class DPTypeError(DPError, TypeError):
    """An argument has a type dptorch cannot work with."""


class UnsupportedModuleError(DPValueError):
    """A module cannot be trained with per-sample clipping as it is.

    Attributes:
        problems: one human-readable line per offending submodule.
    """

    def __init__(self, problems: list[str], header: str | None = None) -> None:
        self.problems = list(problems)
        lines = [header or "The model cannot be made private as it is:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class ParameterMismatchError(DPValueError):
    """The optimizer does not hold the module's trainable parameters."""


class SampleRateError(DPValueError):
    """The data loader's sampling cannot be described by one Poisson rate q."""


class TrainingLoopError(DPError, RuntimeError):
    """The training loop did something that would break the privacy accounting."""


class DPWarning(UserWarning):
    """A warning about a weakened or unverifiable privacy guarantee."""


class PrivacyBudgetExceededError(DPError, RuntimeError):
    """A step was refused because it would take epsilon past the privacy budget.

    Raised by ``optimizer.step()`` before anything changes: the parameters, the optimizer
    state and the accountant are as they were after the last step within budget.

    Attributes:
        epsilon_spent: epsilon spent so far, at :attr:`delta`.
        epsilon_after: epsilon if the refused step had been taken.
        max_epsilon: the budget.
        delta: the delta at which epsilon is measured.
    """

    def __init__(
        self,
        message: str,
        *,
        epsilon_spent: float,
        epsilon_after: float,
        max_epsilon: float,
        delta: float,
    ) -> None:
        super().__init__(message)
        self.epsilon_spent = epsilon_spent
        self.epsilon_after = epsilon_after
        self.max_epsilon = max_epsilon
        self.delta = delta


class MissingDependencyError(DPError, ImportError):
    """An optional package that a feature needs is not installed (the message says which)."""
