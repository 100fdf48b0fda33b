"""One audited training run, through dptorch's real DP-SGD path.

Nothing of DP-SGD is re-implemented here: the run goes through
:meth:`PrivacyEngine.make_private` (the Poisson :class:`DPDataLoader`, the per-sample engine,
:class:`DPOptimizer` and the accountant), so a fault in any of them shows in the audit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch.audit.canaries import CanaryDesign
from dptorch.errors import DPValueError
from dptorch.privacy_engine import PrivacyEngine
from dptorch.validation import check_noise_multiplier, check_positive_number

__all__ = ["RunResult", "TrainingSettings", "train_with_canaries"]


@dataclass(frozen=True)
class TrainingSettings:
    """The DP-SGD run being audited.

    Attributes:
        noise_multiplier: sigma.
        max_grad_norm: C.
        sample_rate: q, the Poisson rate of the loader (and of the accountant, if correct).
        steps: DP-SGD steps.
        learning_rate: plain SGD's step size (the scores do not depend on it).
        accountant: ``"prv"``, ``"rdp"`` or ``"gdp"``; gives the upper bound.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    learning_rate: float = 0.1
    accountant: str = "prv"

    def __post_init__(self) -> None:
        check_noise_multiplier(self.noise_multiplier)
        check_positive_number("max_grad_norm", self.max_grad_norm)
        check_positive_number("learning_rate", self.learning_rate)
        if not 0 < self.sample_rate <= 1:
            raise DPValueError(f"sample_rate={self.sample_rate!r} must lie in (0, 1].")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise DPValueError(f"steps={self.steps!r} must be a positive whole number.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunResult:
    """What one audited run produced.

    Attributes:
        scores: one score per canary.
        epsilon: the accountant's epsilon at ``delta`` after the run (the upper bound).
    """

    scores: np.ndarray
    epsilon: float


def train_with_canaries(
    model_fn: Callable[[], nn.Module],
    data: TensorDataset | tuple[Tensor, Tensor],
    design: CanaryDesign,
    included: Tensor,
    settings: TrainingSettings,
    *,
    delta: float,
    seed: int,
) -> RunResult:
    """Train ``model_fn()`` privately on ``data`` plus the included canaries; score them.

    Args:
        model_fn: builds the model under audit (called once, under ``torch.manual_seed(seed)``
            in a forked RNG, so the caller's random state is left alone).
        data: the real examples, ``(features, labels)``.
        design: the canaries (see :mod:`dptorch.audit.canaries`).
        included: ``[m]`` bools, which canaries are trained on.
        settings: the DP-SGD run.
        delta: the delta at which the accountant's epsilon is read.
        seed: fixes the model, the canaries, the Poisson batches and the noise.

    Privacy: the training is dptorch's own; the returned epsilon is what its accountant
    reports for exactly this run.
    """
    if not isinstance(data, TensorDataset):
        data = TensorDataset(*data)
    sampler_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1)
    canary_generator = torch.Generator().manual_seed(seed + 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = model_fn()
        run = design.prepare(
            body,
            data,
            included.bool(),
            max_grad_norm=settings.max_grad_norm,
            generator=canary_generator,
        )
        model = run.model
        size = len(run.dataset)  # type: ignore[arg-type]
        batch_size = max(1, min(size, round(settings.sample_rate * size)))
        engine = PrivacyEngine(accountant=settings.accountant)
        _, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=settings.learning_rate),
            data_loader=DataLoader(run.dataset, batch_size=batch_size, generator=sampler_generator),
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            sample_rate=settings.sample_rate,
            noise_generator=noise_generator,
        )
        if run.step_hook is not None:
            optimizer.attach_step_hook(run.step_hook)
        done = 0
        while done < settings.steps:
            for batch in loader:
                optimizer.zero_grad()
                run.loss(model, batch).backward()
                optimizer.step()
                done += 1
                if done == settings.steps:
                    break
        epsilon = engine.get_epsilon(delta)
        engine.detach(model)  # black-box scoring runs the model without capture hooks
        scores = run.scores()
    if scores.shape != (included.numel(),) or not np.isfinite(scores).all():
        raise DPValueError(
            f"The canary scores are not {included.numel()} finite numbers (shape "
            f"{scores.shape}); lower learning_rate= if training diverged."
        )
    return RunResult(scores=scores, epsilon=_finite_or_inf(epsilon))


def _finite_or_inf(value: float) -> float:
    return float(value) if math.isfinite(value) else math.inf
