"""Noise and clipping-norm schedules for a :class:`~dptorch.optimizers.DPOptimizer`.

Opacus's names and calling pattern: build the scheduler over the optimizer, call
``scheduler.step()`` once per epoch (or whatever period you choose). Each schedule is a
closed form of the epoch and the value the optimizer had when the scheduler was built, so a
resumed run (:meth:`state_dict` / :meth:`load_state_dict`) continues exactly.

A noise change is privacy-relevant and needs nothing extra: every releasing step records the
noise multiplier it used with the accountant, so its history holds one ``(sigma, q, steps)``
segment per schedule value and epsilon composes exactly those. A clipping change moves both
the clipping and the noise std, which is always ``noise_multiplier * max_grad_norm``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from dptorch.errors import DPError, DPTypeError, DPValueError
from dptorch.optimizers import DPOptimizer

__all__ = [
    "ExponentialGradClip",
    "ExponentialNoise",
    "LambdaGradClip",
    "LambdaNoise",
    "StepGradClip",
    "StepNoise",
]


class _Scheduler(ABC):
    """Sets ``optimizer.<attribute>`` to ``schedule(epoch)`` at every :meth:`step`.

    Building it counts as epoch 0 and leaves the value as it was (every schedule is 1x at
    epoch 0 unless a lambda says otherwise).
    """

    attribute: ClassVar[str]

    def __init__(self, optimizer: DPOptimizer) -> None:
        if not isinstance(optimizer, DPOptimizer):
            raise DPTypeError(
                f"optimizer={type(optimizer).__name__} is not a DPOptimizer; pass the optimizer "
                f"returned by PrivacyEngine.make_private to {type(self).__name__}."
            )
        self.optimizer = optimizer
        self.base_value = float(getattr(optimizer, self.attribute))
        self.last_epoch = -1
        self.step()

    @abstractmethod
    def _factor(self, epoch: int) -> float:
        """The value at ``epoch`` relative to :attr:`base_value`."""

    def _value(self, epoch: int) -> float:
        return self.base_value * self._factor(epoch)

    def step(self) -> None:
        """Move to the next epoch and set the optimizer's value for it."""
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        value = self._value(self.last_epoch)
        try:
            setattr(self.optimizer, self.attribute, value)
        except DPValueError as error:
            raise DPValueError(
                f"{type(self).__name__} gave {self.attribute}={value!r} at epoch "
                f"{self.last_epoch} (base {self.base_value!r}): {error}"
            ) from error

    def state_dict(self) -> dict[str, Any]:
        """Epoch, base value and settings, as plain Python types (no functions).

        A lambda schedule's function is not saved: rebuild the scheduler with it, then load.
        """
        return {"last_epoch": self.last_epoch, "base_value": self.base_value, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`, and set the optimizer's value for that epoch.

        Raises:
            DPTypeError: ``state`` is not a dict.
            DPValueError: a key is missing, or the settings differ from this scheduler's.
        """
        if not isinstance(state, dict):
            raise DPTypeError(
                f"state has type {type(state).__name__}; pass the dict returned by "
                f"{type(self).__name__}.state_dict()."
            )
        missing = sorted({"last_epoch", "base_value"} - set(state))
        differ = [
            f"{key}: saved {state.get(key)!r}, this scheduler {value!r}"
            for key, value in self._settings().items()
            if state.get(key) != value
        ]
        if missing or differ:
            problems = [f"missing {key}" for key in missing] + differ
            raise DPValueError(
                f"Cannot load this state into {type(self).__name__} ({'; '.join(problems)}). "
                "Build the scheduler with the settings it was saved with."
            )
        self.last_epoch = int(state["last_epoch"])
        self.base_value = float(state["base_value"])
        self._apply()

    def _settings(self) -> dict[str, Any]:
        return {}


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float):
        raise DPTypeError(f"gamma={gamma!r} ({type(gamma).__name__}) must be a number.")
    if not (math.isfinite(gamma) and gamma > 0):
        raise DPValueError(
            f"gamma={gamma!r} must be a positive finite factor per period, e.g. gamma=0.9 "
            "to shrink the value by 10% each time."
        )
    return float(gamma)


def _check_step_size(step_size: int) -> int:
    if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
        raise DPValueError(
            f"step_size={step_size!r} must be a positive int: the number of scheduler.step() "
            "calls between changes."
        )
    return step_size


def _check_callable(name: str, function: object) -> Callable[[int], float]:
    if not callable(function):
        raise DPTypeError(
            f"{name}={function!r} must be a function of the epoch (an int) returning a "
            "multiplicative factor, e.g. lambda epoch: 0.95 ** epoch."
        )
    return function  # type: ignore[return-value]


class _Exponential(_Scheduler):
    def __init__(self, optimizer: DPOptimizer, *, gamma: float) -> None:
        self.gamma = _check_gamma(gamma)
        super().__init__(optimizer)

    def _factor(self, epoch: int) -> float:
        return self.gamma**epoch

    def _settings(self) -> dict[str, Any]:
        return {"gamma": self.gamma}


class _Step(_Scheduler):
    def __init__(self, optimizer: DPOptimizer, *, step_size: int, gamma: float) -> None:
        self.step_size = _check_step_size(step_size)
        self.gamma = _check_gamma(gamma)
        super().__init__(optimizer)

    def _factor(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)

    def _settings(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma}


class _Lambda(_Scheduler):
    def __init__(self, optimizer: DPOptimizer, function: Callable[[int], float]) -> None:
        self._function = function
        super().__init__(optimizer)

    def _factor(self, epoch: int) -> float:
        try:
            return float(self._function(epoch))
        except DPError:
            raise
        except (TypeError, ValueError) as error:
            raise DPValueError(
                f"{type(self).__name__}'s function failed at epoch {epoch}: {error}. It must "
                "return a number, the factor to multiply the initial value by."
            ) from error


class ExponentialNoise(_Exponential):
    """``noise_multiplier = initial * gamma ** epoch``.

    Privacy: the accountant records each step's noise multiplier, so epsilon follows the
    schedule exactly; a ``gamma < 1`` spends budget faster as training goes on.
    """

    attribute = "noise_multiplier"

    def get_noise_multiplier(self) -> float:
        return self._value(self.last_epoch)


class StepNoise(_Step):
    """``noise_multiplier = initial * gamma ** (epoch // step_size)``.

    Privacy: as for :class:`ExponentialNoise`, the accountant records every value used.
    """

    attribute = "noise_multiplier"

    def get_noise_multiplier(self) -> float:
        return self._value(self.last_epoch)


class LambdaNoise(_Lambda):
    """``noise_multiplier = initial * noise_lambda(epoch)``.

    Privacy: as for :class:`ExponentialNoise`, the accountant records every value used.
    """

    attribute = "noise_multiplier"

    def __init__(self, optimizer: DPOptimizer, *, noise_lambda: Callable[[int], float]) -> None:
        super().__init__(optimizer, _check_callable("noise_lambda", noise_lambda))

    def get_noise_multiplier(self) -> float:
        return self._value(self.last_epoch)


class ExponentialGradClip(_Exponential):
    """``max_grad_norm = initial * gamma ** epoch``.

    Privacy: the clipping bound and the noise std ``sigma * max_grad_norm`` change together,
    so the noise-to-sensitivity ratio (what the accountant charges) is unchanged.
    """

    attribute = "max_grad_norm"

    def get_max_grad_norm(self) -> float:
        return self._value(self.last_epoch)


class StepGradClip(_Step):
    """``max_grad_norm = initial * gamma ** (epoch // step_size)``.

    Privacy: as for :class:`ExponentialGradClip`.
    """

    attribute = "max_grad_norm"

    def get_max_grad_norm(self) -> float:
        return self._value(self.last_epoch)


class LambdaGradClip(_Lambda):
    """``max_grad_norm = initial * scheduler_function(epoch)``.

    Privacy: as for :class:`ExponentialGradClip`.
    """

    attribute = "max_grad_norm"

    def __init__(
        self, optimizer: DPOptimizer, *, scheduler_function: Callable[[int], float]
    ) -> None:
        super().__init__(optimizer, _check_callable("scheduler_function", scheduler_function))

    def get_max_grad_norm(self) -> float:
        return self._value(self.last_epoch)
