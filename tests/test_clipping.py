"""Clipping policies: factors, sensitivities, and per-layer clipping against an oracle."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dptorch.clipping import AutomaticClipping, FlatClipping, PerLayerClipping
from dptorch.errors import DPValueError
from dptorch.per_sample.engine import PerSampleEngine


def test_automatic_clipping_normalises_every_example_below_the_norm() -> None:
    policy = AutomaticClipping(2.0, stability=0.1)
    norms = torch.tensor([0.0, 0.5, 10.0, float("nan"), float("inf")], dtype=torch.float64)
    factors = policy.factors(norms)
    expected = torch.tensor([2.0 / 0.1, 2.0 / 0.6, 2.0 / 10.1, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(factors, expected)
    contributions = (factors * torch.nan_to_num(norms, posinf=0.0))[:3]
    assert bool((contributions < policy.sensitivity).all())
    assert policy.sensitivity == 2.0


@pytest.mark.parametrize("kwargs", [{"stability": 0.0}, {"stability": -1.0}])
def test_automatic_clipping_refuses_a_non_positive_stability(kwargs: dict[str, float]) -> None:
    with pytest.raises(DPValueError, match="stability"):
        AutomaticClipping(1.0, **kwargs)


def test_per_layer_sensitivity_is_the_root_sum_of_squares() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    policy = PerLayerClipping([[a], [b]], [3.0, 4.0])
    assert math.isclose(policy.sensitivity, 5.0)
    with pytest.raises(DPValueError, match="disjoint"):
        PerLayerClipping([[a], [a, b]], [1.0, 1.0])
    with pytest.raises(DPValueError, match="one max_grad_norm per parameter group"):
        PerLayerClipping([[a], [b]], [1.0])


@pytest.mark.parametrize("route", ["auto", "ghost", "instantiate"])
def test_per_layer_clipped_sum_matches_a_one_example_at_a_time_oracle(route: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    policy = PerLayerClipping(groups, [0.3, 0.2])

    per_example = []
    for i in range(7):
        model.zero_grad()
        ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum().backward()
        per_example.append([p.grad.clone() for p in model.parameters()])
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for grads in per_example:
        for group, limit in ((range(0, 2), 0.3), (range(2, 4), 0.2)):
            norm = math.sqrt(sum(float(grads[k].pow(2).sum()) for k in group))
            factor = min(1.0, limit / norm)
            for k in group:
                expected[k] += factor * grads[k]

    model.zero_grad(set_to_none=True)
    engine = PerSampleEngine(model, model.parameters(), loss_reduction="sum", norm_route=route)
    engine.attach()
    ((model(x) - y) ** 2).sum().backward()
    clipped = engine.clipped_sum(policy)
    engine.detach()
    for param, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(clipped.sums[param], want, rtol=1e-10, atol=1e-12)
    assert clipped.factors.shape == (7,)


def test_flat_clipping_is_per_layer_clipping_with_one_group() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    results = []
    for policy in (FlatClipping(0.5), PerLayerClipping([list(model.parameters())], [0.5])):
        model.zero_grad(set_to_none=True)
        engine = PerSampleEngine(model, model.parameters(), loss_reduction="sum")
        engine.attach()
        model(x).pow(2).sum().backward()
        results.append(engine.clipped_sum(policy))
        engine.detach()
    for param in model.parameters():
        torch.testing.assert_close(results[0].sums[param], results[1].sums[param])
