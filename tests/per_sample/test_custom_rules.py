"""register_rule: a user's own layer gets one-pass per-sample gradients, checked first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine, register_rule
from dptorch.errors import DPTypeError, DPValueError
from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules import RuleContext, unregister_rule
from dptorch.per_sample.rules.base import input_and_grad
from dptorch.per_sample.terms import DenseTerm, GradTerm


class Scale(nn.Module):
    """``y = x * w`` over the last dimension."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def scale_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    x, grad = input_and_grad(record)  # [B, ..., d] each
    if not ctx.wants(module.weight):
        return []
    per_example = (grad * x).reshape(x.shape[0], -1, x.shape[-1]).sum(dim=1)  # [B, d]
    return [DenseTerm(module.weight, per_example)]


def doubled_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    return [DenseTerm(t.param, 2 * t.grad_sample) for t in scale_rule(module, record, ctx)]  # type: ignore[union-attr]


@pytest.fixture
def registered() -> Iterator[None]:
    yield
    unregister_rule(Scale)


def _private(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    loader = DataLoader(TensorDataset(torch.zeros(40, 1)), batch_size=8)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        loss_reduction="sum",
    )
    return model, optimizer


def test_a_registered_rule_gives_the_oracle_and_is_trusted_after_one_check(
    registered: None,
) -> None:
    register_rule(Scale, scale_rule)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4).double(), Scale(4))
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(6):
        model.zero_grad()
        model(x[i : i + 1]).pow(2).sum().backward()
        grads = [p.grad for p in model.parameters()]
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        for k, g in enumerate(grads):
            expected[k] += min(1.0, 0.05 / norm) * g
    model.zero_grad(set_to_none=True)
    model, optimizer = _private(model)
    scale_weight = model[1].weight
    assert scale_weight not in optimizer.engine._skipped  # not trusted before the check
    for _ in range(2):  # the first step checks against autograd, the second skips it
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
        for param, want in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(param.grad, want)
        assert scale_weight in optimizer.engine._skipped


def test_a_wrong_registered_rule_is_refused_on_the_first_step(registered: None) -> None:
    register_rule(Scale, doubled_rule)
    model, optimizer = _private(nn.Sequential(nn.Linear(3, 4).double(), Scale(4)))
    model(torch.randn(6, 3, dtype=torch.float64)).pow(2).sum().backward()
    with pytest.raises(DPValueError, match=r"1\.weight"):
        optimizer.step()


def test_registering_twice_needs_overwrite(registered: None) -> None:
    register_rule(Scale, scale_rule)
    with pytest.raises(DPTypeError, match="exists already"):
        register_rule(Scale, doubled_rule)
    register_rule(Scale, doubled_rule, overwrite=True)
    with pytest.raises(DPTypeError, match=r"nn\.Module subclass"):
        register_rule(int, scale_rule)  # type: ignore[arg-type]
