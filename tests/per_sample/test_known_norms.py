"""Norms a rule takes early, and the cheap finiteness checks of the clip.

A ``[B, in]`` Linear call gets its weight's and bias's squared norms inside the backward pass
(one row norm of the output gradient serves both); those must equal the norms the terms would
compute themselves, by either route, and a forced ``instantiate`` route must still
instantiate. The finiteness checks sum the norms instead of testing each: a NaN or inf must
still be found, and a sum that overflows while every norm is finite must not drop anyone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptorch.clipping import FlatClipping
from dptorch.per_sample.engine import PerSampleEngine, _count_nonfinite
from dptorch.per_sample.terms import DenseTerm, OuterTerm, rowwise_sq_norm


def _engine_after_backward(route: str, bias: bool = True) -> tuple[PerSampleEngine, nn.Linear]:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias)
    engine = PerSampleEngine(layer, layer.parameters(), norm_route=route, verify=False)  # type: ignore[arg-type]
    engine.attach()
    x = torch.randn(5, 6)
    layer(x).square().sum().backward()
    return engine, layer


def _terms(engine: PerSampleEngine) -> dict[nn.Parameter, object]:
    return {t.param: t for r in engine.capture.records for t in (r.terms or [])}


def _oracle_norms_sq(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    norms = []
    for row in x:
        layer.zero_grad()
        layer(row.unsqueeze(0)).square().sum().backward()
        norms.append(sum(p.grad.square().sum() for p in layer.parameters()))
    return torch.stack(norms)


@pytest.mark.parametrize("route", ["auto", "ghost"])
def test_early_linear_norms_equal_the_terms_own_norms(route: str) -> None:
    engine, layer = _engine_after_backward(route)
    terms = _terms(engine)
    weight, bias = terms[layer.weight], terms[layer.bias]
    assert isinstance(weight, OuterTerm) and isinstance(bias, DenseTerm)
    assert weight.known_norm_sq is not None and bias.known_norm_sq is not None
    torch.testing.assert_close(weight.known_norm_sq, weight.inner(weight))
    torch.testing.assert_close(
        weight.known_norm_sq, rowwise_sq_norm(weight.instantiate().flatten(1))
    )
    torch.testing.assert_close(bias.known_norm_sq, rowwise_sq_norm(bias.grad_sample))


def test_a_forced_instantiate_route_instantiates_the_weight() -> None:
    engine, layer = _engine_after_backward("instantiate")
    weight = _terms(engine)[layer.weight]
    assert isinstance(weight, OuterTerm) and weight.known_norm_sq is None
    weight.norm_sq("instantiate")
    assert weight._instantiated is not None


@pytest.mark.parametrize("route", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("bias", [True, False])
def test_clipped_norms_match_one_example_at_a_time(route: str, bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias)
    x = torch.randn(5, 6)
    expected = _oracle_norms_sq(layer, x).sqrt()
    layer.zero_grad(set_to_none=True)
    engine = PerSampleEngine(layer, layer.parameters(), norm_route=route, loss_reduction="sum")  # type: ignore[arg-type]
    engine.attach()
    layer(x).square().sum().backward()
    plan = engine.clip(FlatClipping(1.0))
    torch.testing.assert_close(plan.result.norms, expected)


def test_nonfinite_count_finds_nan_and_inf() -> None:
    norms = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.0])
    assert _count_nonfinite(norms) == 2
    assert _count_nonfinite(torch.tensor([1.0, 2.0])) == 0
    assert _count_nonfinite(torch.zeros(0)) == 0


def test_nonfinite_count_is_exact_when_the_sum_overflows() -> None:
    huge = torch.full((4,), 3.0e38)  # each finite in float32, their sum is not
    assert _count_nonfinite(huge) == 0
    huge[2] = float("nan")
    assert _count_nonfinite(huge) == 1


def test_flat_factors_zero_nonfinite_norms_and_clip_the_rest() -> None:
    policy = FlatClipping(1.0)
    norms = torch.tensor([0.5, 2.0, float("nan"), float("inf"), 4.0])
    factors = policy.factors(norms)
    torch.testing.assert_close(factors, torch.tensor([1.0, 0.5, 0.0, 0.0, 0.25]))


def test_flat_factors_clip_finite_norms_whose_sum_overflows() -> None:
    factors = FlatClipping(1.0).factors(torch.full((3,), 2.0e38))
    torch.testing.assert_close(factors, torch.full((3,), 1.0 / 2.0e38))
    assert bool(torch.isfinite(factors).all())
