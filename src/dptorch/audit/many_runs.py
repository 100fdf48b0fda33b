"""``audit_dpsgd_many_runs``: the classical audit, one canary and many trainings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dptorch.audit.canaries import CanaryDesign, canary_design
from dptorch.audit.many_run_bound import many_run_lower_bound_from_scores
from dptorch.audit.report import AuditReport
from dptorch.audit.training import TrainingSettings, train_with_canaries
from dptorch.errors import DPValueError

__all__ = ["audit_dpsgd_many_runs"]

# Seeds of successive runs are this far apart, so runs of neighbouring audit seeds differ.
_SEED_STRIDE = 100_003


def audit_dpsgd_many_runs(
    model_fn: Callable[[], nn.Module],
    data: TensorDataset | tuple[Tensor, Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    runs: int = 200,
    delta: float = 1e-5,
    seed: int = 0,
    canary: str | CanaryDesign = "gradient",
    confidence: float = 0.95,
    learning_rate: float = 0.1,
    accountant: str = "prv",
) -> AuditReport:
    """Train ``runs`` models, every other one with a single canary, and lower-bound epsilon.

    Even-numbered runs include the canary, odd ones do not; each run has its own seed (model,
    batches, noise). The canary's scores in the two groups give the Clopper-Pearson bound of
    :func:`~dptorch.audit.many_run_lower_bound_from_scores`. Meant for small models: the
    cost is ``runs`` trainings, and with R runs the bound is at most about ``log(R / 15)``
    (a quarter of the runs per group give the bound, at 97.5% confidence each).

    Args:
        model_fn: builds the model under audit (see :func:`~dptorch.audit.audit_dpsgd`).
        data: real training examples, ``(features, labels)``.
        noise_multiplier: sigma of the audited run.
        max_grad_norm: C.
        sample_rate: q.
        steps: DP-SGD steps per run.
        runs: trainings, at least 4 (half with the canary).
        delta: the delta of both bounds.
        seed: fixes every run.
        canary: ``"gradient"``, ``"input"`` or a design.
        confidence: of the lower bound.
        learning_rate: plain SGD's learning rate.
        accountant: gives the upper bound.

    Returns:
        An :class:`AuditReport` with one score per run.

    Privacy: the bound holds with probability ``confidence`` if each run is (eps, delta)-DP
    with respect to the canary; a lower bound only.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 4:
        raise DPValueError(
            f"runs={runs!r} must be a whole number >= 4: half include the canary, and each "
            "half is split again to choose the threshold and then test it. Try 200 or more."
        )
    design = canary_design(canary)
    settings = TrainingSettings(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        learning_rate=learning_rate,
        accountant=accountant,
    )
    scores = np.empty(runs)
    included = np.arange(runs) % 2 == 0
    upper = 0.0
    for run in range(runs):
        result = train_with_canaries(
            model_fn,
            data,
            design,
            torch.tensor([bool(included[run])]),
            settings,
            delta=delta,
            seed=seed * _SEED_STRIDE + run,
        )
        scores[run] = result.scores[0]
        upper = max(upper, result.epsilon)  # every run is accounted alike; keep the largest
    bound = many_run_lower_bound_from_scores(
        scores[included], scores[~included], delta=delta, confidence=confidence
    )
    return AuditReport(
        epsilon_lower_bound=bound.epsilon,
        epsilon_upper_bound=upper,
        delta=delta,
        confidence=confidence,
        method="many-run",
        canary=design.name,
        scores=scores,
        included=included,
        settings={**settings.as_dict(), "runs": runs, "seed": seed},
        details={
            "threshold": bound.threshold,
            "false_positive_upper": bound.false_positive_upper,
            "false_negative_upper": bound.false_negative_upper,
            "per_test_alpha": bound.alpha,
        },
    )
