"""``audit_dpsgd``: audit a DP-SGD run with one training (arXiv 2305.08846)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dptorch.audit.canaries import CanaryDesign, canary_design
from dptorch.audit.one_run_bound import DEFAULT_GUESS_FRACTIONS, one_run_lower_bound_from_scores
from dptorch.audit.report import AuditReport
from dptorch.audit.training import TrainingSettings, train_with_canaries
from dptorch.errors import DPValueError

__all__ = ["audit_dpsgd"]


def audit_dpsgd(
    model_fn: Callable[[], nn.Module],
    data: TensorDataset | tuple[Tensor, Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    num_canaries: int = 1000,
    delta: float = 1e-5,
    seed: int = 0,
    canary: str | CanaryDesign = "gradient",
    confidence: float = 0.95,
    learning_rate: float = 0.1,
    accountant: str = "prv",
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditReport:
    """Train once with ``num_canaries`` random canaries and lower-bound epsilon.

    Each canary is put in the training set independently with probability 1/2; the model is
    trained with dptorch's real DP-SGD path (``PrivacyEngine.make_private``: Poisson loader,
    per-sample engine, ``DPOptimizer``, accountant); every canary is scored, and the best of
    a few "top-k in, bottom-k out" guesses gives the bound of Steinke, Nasr and Jagielski
    (arXiv 2305.08846, Theorem 5.2), union-bounded over the guess counts tried.

    Args:
        model_fn: builds the model under audit: ``x [B, ...] -> logits [B, K]``, trained
            with cross-entropy. Called once, under a seed.
        data: real training examples, ``TensorDataset(features, labels)`` or a pair.
        noise_multiplier: sigma of the audited run.
        max_grad_norm: C of the audited run.
        sample_rate: q, the Poisson rate over real examples plus included canaries.
        steps: DP-SGD steps.
        num_canaries: m; more canaries allow larger lower bounds (about ``log(m / 3)`` at
            most, when every guess is right).
        delta: the delta at which both bounds are stated.
        seed: fixes memberships, model, batches and noise: equal seeds, equal reports.
        canary: ``"gradient"`` (white-box Dirac gradient canaries, the strongest),
            ``"input"`` (black-box out-of-distribution inputs, scored by loss), or a design.
        confidence: of the lower bound, e.g. 0.95.
        learning_rate: plain SGD's learning rate.
        accountant: the accountant giving the upper bound (``"prv"``, ``"rdp"``, ``"gdp"``).
        guess_fractions: the shares of canaries guessed "in" (and "out") that are tried.

    Returns:
        An :class:`AuditReport`; ``report.violated`` is True when the lower bound exceeds the
        accountant's epsilon.

    Privacy: the lower bound holds with probability ``confidence`` whenever training is
    (eps, delta)-DP with respect to each canary: an honest run exceeds its accountant's
    epsilon at most ``1 - confidence`` of the time. It is a lower bound only, and one run
    with m canaries can never show more than about ``log(m / 3)``.
    """
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
        raise DPValueError(
            f"num_canaries={num_canaries!r} must be a whole number >= 2; about 1000 gives "
            "useful bounds."
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
    membership_generator = torch.Generator().manual_seed(seed + 3)
    included = torch.rand(num_canaries, generator=membership_generator) < 0.5  # [m]
    result = train_with_canaries(model_fn, data, design, included, settings, delta=delta, seed=seed)
    member = included.numpy()
    bound = one_run_lower_bound_from_scores(
        result.scores,
        member,
        delta=delta,
        confidence=confidence,
        guess_fractions=guess_fractions,
    )
    return AuditReport(
        epsilon_lower_bound=bound.epsilon,
        epsilon_upper_bound=result.epsilon,
        delta=delta,
        confidence=confidence,
        method="one-run",
        canary=design.name,
        scores=result.scores,
        included=member,
        settings={**settings.as_dict(), "num_canaries": num_canaries, "seed": seed},
        details={
            "num_guesses": bound.num_guesses,
            "num_correct": bound.num_correct,
            "per_test_alpha": bound.alpha,
        },
    )
