"""Canaries: examples the auditor adds, and how to score each one after training.

Two designs, each turning ``(model body, real data, which canaries are in)`` into a
:class:`CanaryRun` that the real DP-SGD path trains:

* :class:`GradientCanaries` (white-box, the strongest). The body gets a bias-free canary
  layer, ``nn.Embedding(m + 1, 1)``, that only canary examples reach: canary ``j`` looks up
  row ``j + 1`` (real examples look up the padding row 0, which gets no gradient), and its
  loss is ``-scale * w[j + 1]``. Its gradient is therefore ``-scale`` on one coordinate and 0
  elsewhere (a "Dirac" canary): norm ``scale >> C``, so clipping cuts it to exactly ``C`` on a
  direction no other example touches. The score is the sum of the released gradients
  projected on that direction, in units of ``C / expected batch size``: about the number of
  steps that sampled the canary if it was in, 0 if not, plus ``N(0, sigma^2 steps)``.
* :class:`InputCanaries` (black-box). Out-of-distribution inputs with random labels go
  through the model as they are; the score is how much training raised each one's margin
  (its label's logit minus the best other logit). An excluded canary's label is a coin flip
  the model never saw, so its margin change is as likely down as up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from dptorch.errors import DPTypeError, DPValueError
from dptorch.optimizers import DPOptimizer

__all__ = [
    "CanaryDesign",
    "CanaryRun",
    "GradientCanaries",
    "GradientCanaryModel",
    "InputCanaries",
    "canary_design",
    "split_features_labels",
]


@dataclass
class CanaryRun:
    """Everything one audited training needs from the canary design.

    Attributes:
        model: what is trained (the body, or the body with a canary layer).
        dataset: real examples plus the included canaries.
        loss: ``loss(model, batch)``, the mean loss of a batch from ``dataset``.
        scores: after training, one score per canary (all m, included or not); higher
            means "more likely included".
        step_hook: called after every released step, if the design watches training.
    """

    model: nn.Module
    dataset: Dataset[Any]
    loss: Callable[[nn.Module, Any], Tensor]
    scores: Callable[[], np.ndarray]
    step_hook: Callable[[DPOptimizer], None] | None = field(default=None)


class CanaryDesign(Protocol):
    """How canaries are made and scored (see :class:`GradientCanaries`)."""

    @property
    def name(self) -> str:
        """A short name for reports (``"gradient"``, ``"input"``)."""
        ...

    def prepare(
        self,
        body: nn.Module,
        data: TensorDataset,
        included: Tensor,
        *,
        max_grad_norm: float,
        generator: torch.Generator,
    ) -> CanaryRun: ...


class GradientCanaryModel(nn.Module):
    """``body(x)`` plus a canary layer that only canary examples reach.

    Args:
        body: the model under audit, ``x [B, ...] -> logits [B, K]``.
        num_canaries: m.
        scale: the canary gradient's norm; far above the clipping norm.
    """

    def __init__(self, body: nn.Module, num_canaries: int, scale: float) -> None:
        super().__init__()
        self.body = body
        # Row 0 is the padding row of real examples: PyTorch (and dptorch's per-sample
        # rule) give it no gradient, so real examples never touch a canary direction.
        self.canary = nn.Embedding(num_canaries + 1, 1, padding_idx=0)
        nn.init.zeros_(self.canary.weight)
        self.scale = float(scale)

    def forward(self, x: Tensor, canary_index: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, K], canary output [B])``; ``canary_index`` is -1 for real examples."""
        logits = self.body(x)
        hit = self.canary(canary_index + 1).squeeze(-1) * self.scale  # [B]
        return logits, hit


@dataclass(frozen=True)
class GradientCanaries:
    """White-box Dirac gradient canaries (see the module docstring).

    Args:
        scale_over_clip: the canary gradient norm as a multiple of ``max_grad_norm``. Large,
            so a run that forgets to clip shows it at once.
    """

    scale_over_clip: float = 1000.0
    name: str = "gradient"

    def prepare(
        self,
        body: nn.Module,
        data: TensorDataset,
        included: Tensor,
        *,
        max_grad_norm: float,
        generator: torch.Generator,
    ) -> CanaryRun:
        features, labels = split_features_labels(data)
        m = included.numel()
        chosen = included.nonzero().squeeze(1)  # [m_in] ids of the canaries trained on
        n_real, n_in = features.shape[0], chosen.numel()
        dataset = TensorDataset(
            torch.cat([features, features.new_zeros((n_in, *features.shape[1:]))]),
            torch.cat([labels, labels.new_zeros(n_in)]),
            torch.cat([torch.full((n_real,), -1, dtype=torch.long), chosen]),
        )
        model = GradientCanaryModel(body, m, self.scale_over_clip * max_grad_norm)
        total = torch.zeros(m, dtype=torch.float64)

        def loss(model: nn.Module, batch: Any) -> Tensor:
            x, y, index = batch
            logits, hit = model(x, index)
            per_example = torch.where(
                index >= 0, -hit, F.cross_entropy(logits, y, reduction="none")
            )
            return per_example.mean()

        def watch(optimizer: DPOptimizer) -> None:
            # The released gradient of canary j's row, in units of C / expected batch size;
            # the minus sign makes an included canary's expected contribution +1 per step
            # that sampled it.
            released = model.canary.weight.grad
            assert released is not None  # every releasing step sets it (noise at least)
            unit = optimizer.max_grad_norm / optimizer.expected_batch_size
            total.sub_(released[1:, 0].detach().double().cpu() / unit)

        return CanaryRun(model, dataset, loss, lambda: total.numpy().copy(), watch)


@dataclass(frozen=True)
class InputCanaries:
    """Black-box input canaries: out-of-distribution points with random labels.

    Canary inputs are Gaussian with ``input_scale`` times the real features' standard
    deviation; labels are uniform over the classes seen in the data. Score: the canary's
    margin (its label's logit minus the largest other logit) after training minus before.
    Much weaker than gradient canaries: use it to audit the model's own layers end to end.

    Args:
        input_scale: how far out of distribution the canaries lie.
    """

    input_scale: float = 3.0
    name: str = "input"

    def prepare(
        self,
        body: nn.Module,
        data: TensorDataset,
        included: Tensor,
        *,
        max_grad_norm: float,
        generator: torch.Generator,
    ) -> CanaryRun:
        features, labels = split_features_labels(data)
        m = included.numel()
        std = float(features.float().std()) or 1.0
        inputs = torch.randn((m, *features.shape[1:]), generator=generator) * std
        inputs = (inputs * self.input_scale).to(features.dtype)
        classes = int(labels.max()) + 1
        targets = torch.randint(0, classes, (m,), generator=generator)
        dataset = TensorDataset(
            torch.cat([features, inputs[included]]), torch.cat([labels, targets[included]])
        )
        before = _margin(body, inputs, targets)

        def loss(model: nn.Module, batch: Any) -> Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y)

        def scores() -> np.ndarray:
            return (_margin(body, inputs, targets) - before).numpy()

        return CanaryRun(body, dataset, loss, scores)


def canary_design(canary: str | CanaryDesign) -> CanaryDesign:
    """``"gradient"`` or ``"input"`` to its design object; a design passes through."""
    if not isinstance(canary, str):
        if not hasattr(canary, "prepare"):
            raise DPTypeError(
                f"canary={canary!r} must be 'gradient', 'input' or a CanaryDesign instance."
            )
        return canary
    designs: dict[str, CanaryDesign] = {"gradient": GradientCanaries(), "input": InputCanaries()}
    if canary not in designs:
        raise DPValueError(
            f"canary={canary!r} is not a canary kind; use 'gradient' (white-box, strongest) "
            "or 'input' (black-box)."
        )
    return designs[canary]


def split_features_labels(data: TensorDataset | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(features [N, ...], integer labels [N])`` from a TensorDataset or a pair of tensors."""
    tensors = data.tensors if isinstance(data, TensorDataset) else data
    if (
        not isinstance(tensors, tuple | list)
        or len(tensors) != 2
        or not all(isinstance(t, Tensor) for t in tensors)
    ):
        raise DPTypeError(
            "data must be TensorDataset(features, labels) or a (features, labels) pair of "
            f"tensors; got {type(data).__name__}."
        )
    features, labels = tensors
    if labels.dtype.is_floating_point or labels.dim() != 1 or labels.numel() == 0:
        raise DPValueError(
            f"data labels must be a non-empty 1-D integer class tensor; got dtype "
            f"{labels.dtype} and shape {tuple(labels.shape)}."
        )
    if features.shape[0] != labels.shape[0]:
        raise DPValueError(
            f"data has {features.shape[0]} feature rows but {labels.shape[0]} labels; give one "
            "label per example."
        )
    return features, labels.long()


def _margin(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """``[m]`` logit of each target minus the largest other logit (float64)."""
    with torch.no_grad():
        logits = model(inputs).double()  # [m, K]
    own = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, targets.unsqueeze(1), float("-inf")).amax(dim=1)
    return own - others
