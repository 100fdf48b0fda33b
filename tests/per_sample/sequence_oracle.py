"""One-example-at-a-time oracle for models called with several batched inputs.

``losses(model, batch)`` returns one loss per example of ``batch`` (a :class:`Batch`); the
oracle runs it on each example alone, takes autograd's gradient, clips it, and sums. The
private side runs ``make_private`` with no noise on the whole batch and returns what the
optimizer applied. The two must agree: ``sum_i clip_C(g_i) / (q N)`` for ``"mean"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.optimizers import DPOptimizer

DATASET = 40
LOADER_BATCH = 8  # q = 8/40: the expected batch size q*N = 8 differs from the realised one


@dataclass
class Batch:
    """Named tensors, each with the dimension that indexes examples (``None``: shared)."""

    tensors: dict[str, tuple[Tensor, int | None]]

    @property
    def size(self) -> int:
        sizes = {t.shape[d] for t, d in self.tensors.values() if d is not None}
        assert len(sizes) == 1, sizes
        return sizes.pop()

    def example(self, i: int) -> Batch:
        return Batch(
            {
                name: (t if d is None else t.narrow(d, i, 1), d)
                for name, (t, d) in self.tensors.items()
            }
        )

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name][0]

    def get(self, name: str) -> Tensor | None:
        found = self.tensors.get(name)
        return None if found is None else found[0]


Losses = Callable[[nn.Module, Batch], Tensor]  # -> [n] per-example losses
BatchLoss = Callable[[nn.Module, Batch], Tensor]  # -> the scalar loss a training loop uses


def per_example_grads(model: nn.Module, losses: Losses, batch: Batch) -> dict[str, Tensor]:
    """``{name: [B, *shape]}`` gradients of each example's own loss, by plain autograd."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    for i in range(batch.size):
        model.zero_grad(set_to_none=True)
        losses(model, batch.example(i)).sum().backward()
        for n, p in named:
            grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in grads.items()}


def clipped_mean(grads: dict[str, Tensor], max_grad_norm: float) -> dict[str, Tensor]:
    """``sum_i clip_C(g_i) / LOADER_BATCH`` per parameter."""
    size = next(iter(grads.values())).shape[0]
    norms = torch.sqrt(sum(g.reshape(size, -1).pow(2).sum(dim=1) for g in grads.values()))
    factors = torch.clamp(max_grad_norm / norms, max=1.0)
    return {
        n: (g * factors.reshape(-1, *[1] * (g.dim() - 1))).sum(dim=0) / LOADER_BATCH
        for n, g in grads.items()
    }


def median_norm(grads: dict[str, Tensor]) -> float:
    """A clipping norm that clips about half of the examples."""
    size = next(iter(grads.values())).shape[0]
    norms = torch.sqrt(sum(g.reshape(size, -1).pow(2).sum(dim=1) for g in grads.values()))
    return float(norms.median())


def private_grads(
    model: nn.Module,
    losses: Losses,
    batch: Batch,
    max_grad_norm: float,
    *,
    batch_first: bool = True,
    batch_loss: BatchLoss | None = None,
) -> tuple[dict[str, Tensor], DPOptimizer]:
    """The gradient one noiseless private step applies, by parameter name.

    The step's loss is ``batch_loss`` if given, else the mean of ``losses``.
    """
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH)
    engine = PrivacyEngine()
    model, dp_optimizer, _ = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        batch_first=batch_first,
    )
    dp_optimizer.zero_grad()
    loss = batch_loss(model, batch) if batch_loss is not None else losses(model, batch).mean()
    loss.backward()
    dp_optimizer.step()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    engine.detach(model)
    return {n: g for n, g in grads.items() if g is not None}, dp_optimizer


def assert_matches_oracle(
    model: nn.Module,
    losses: Losses,
    batch: Batch,
    *,
    batch_first: bool = True,
    batch_loss: BatchLoss | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> DPOptimizer:
    """The private noiseless step equals the clipped per-example oracle, about half clipped.

    ``losses`` gives the oracle's per-example losses; the private step uses ``batch_loss``
    (default: their mean), which must equal their mean for the two to agree.
    """
    expected_grads = per_example_grads(model, losses, batch)
    max_grad_norm = median_norm(expected_grads)
    expected = clipped_mean(expected_grads, max_grad_norm)
    got, optimizer = private_grads(
        model, losses, batch, max_grad_norm, batch_first=batch_first, batch_loss=batch_loss
    )
    for name, value in expected.items():
        torch.testing.assert_close(
            got.get(name, torch.zeros_like(value)),
            value,
            rtol=rtol,
            atol=atol,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    return optimizer
