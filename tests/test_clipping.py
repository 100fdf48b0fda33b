"""Clipping policies: factors, sensitivities, and per-layer clipping against an oracle."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.clipping import AdaptiveClipping, AutomaticClipping, FlatClipping, PerLayerClipping
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_flat_clipping_factors_are_min_one_c_over_n_and_zero_where_not_finite(
    dtype: torch.dtype,
) -> None:
    norms = torch.tensor([0.0, 0.5, 2.0, 20.0, float("nan"), float("inf")], dtype=dtype)
    factors = FlatClipping(2.0).factors(norms)
    expected = torch.tensor([1.0, 1.0, 1.0, 0.1, 0.0, 0.0], dtype=dtype)
    assert factors.dtype == dtype
    torch.testing.assert_close(factors, expected)


@pytest.mark.parametrize("policy", [FlatClipping(1.0), AutomaticClipping(1.0)])
def test_clipping_factors_never_read_the_norms_back_to_the_host(
    policy: FlatClipping | AutomaticClipping, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On an accelerator a read-back (float(), .item(), bool()) stalls until the device is
    # done; the engine's own finiteness count is the step's one read-back.
    def refuse(self: Tensor, *args: object) -> None:
        raise AssertionError("the clipping factors read a tensor back to the host")

    norms = torch.tensor([0.5, 3.0, float("nan")])
    for name in ("__float__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(Tensor, name, refuse)
    factors = policy.factors(norms)
    monkeypatch.undo()
    assert factors[2].item() == 0.0 and 0 < factors[1].item() < 1


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


def _private(clipping: object, max_grad_norm: object, sigma: float = 0.0, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    global _reference
    _reference = copy.deepcopy(model)  # un-hooked twin for the oracle
    loader = DataLoader(TensorDataset(torch.zeros(200, 1)), batch_size=40)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,  # type: ignore[arg-type]
        clipping=clipping,  # type: ignore[arg-type]
        loss_reduction="sum",
        noise_generator=torch.Generator().manual_seed(seed),
    )
    return engine, model, optimizer


_reference: nn.Module = nn.Identity()


def _per_example_grads(trained: nn.Module, x: Tensor) -> list[list[Tensor]]:
    model = _reference
    model.load_state_dict(trained.state_dict())
    grads = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        model(x[i : i + 1]).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return grads


def test_make_private_automatic_clipping_matches_the_oracle() -> None:
    _, model, optimizer = _private("automatic", 0.7)
    x = torch.randn(6, 4, dtype=torch.float64)
    grads = _per_example_grads(model, x)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for per in grads:
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in per))
        for k, g in enumerate(per):
            expected[k] += 0.7 / (norm + 0.01) * g
    model(x).pow(2).sum().backward()
    optimizer.step()
    for param, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, want)


def test_make_private_per_layer_splits_one_total_norm_evenly() -> None:
    _, _, optimizer = _private("per_layer", 2.0)
    assert isinstance(optimizer.clipping, PerLayerClipping)
    assert optimizer.clipping.max_grad_norms == pytest.approx([1.0] * 4)  # 2 / sqrt(4)
    assert optimizer.max_grad_norm == pytest.approx(2.0)  # the sensitivity
    with pytest.raises(DPValueError, match="3 norms in max_grad_norm for 4"):
        _private("per_layer", [1.0, 1.0, 1.0])
    with pytest.raises(DPValueError, match="clipping='bogus'"):
        _private("bogus", 1.0)


def test_adaptive_clipping_moves_the_norm_towards_the_median_and_splits_the_noise() -> None:
    engine, model, optimizer = _private("adaptive", 1e-2, sigma=1.0)
    policy = optimizer.clipping
    assert isinstance(policy, AdaptiveClipping)
    count_multiplier = 2 * policy.count_noise  # expected batch 40 -> count noise 2
    assert policy.count_noise == pytest.approx(2.0)
    assert optimizer.gradient_noise_multiplier == pytest.approx(
        (1.0 - count_multiplier**-2) ** -0.5
    )
    x = torch.randn(40, 4, dtype=torch.float64)  # the expected batch size
    norms = []
    for _ in range(80):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
        norms.append(optimizer.max_grad_norm)
    # Every example is far above 1e-2 at first, so the norm grows geometrically (about
    # exp(0.2 * 0.5) per step, up to the count noise) ...
    assert norms[5] > 1e-2 * math.exp(0.05 * 6)
    # ... until about half of the examples are unclipped.
    true_norms = torch.tensor(
        [math.sqrt(sum(float(g.pow(2).sum()) for g in per)) for per in _per_example_grads(model, x)]
    )
    unclipped = float((true_norms <= norms[-1]).double().mean())
    assert 0.2 < unclipped < 0.8, (norms[-1], true_norms)
    # The accountant records the total multiplier, which includes the count's share.
    assert engine.accountant.history[-1][0] == pytest.approx(1.0)


def test_adaptive_clipping_refuses_a_count_noise_too_small_for_the_budget() -> None:
    policy = AdaptiveClipping(1.0, count_noise=0.4)  # count multiplier 0.8 < sigma 1.0
    with pytest.raises(DPValueError, match="count_noise"):
        _private(policy, 1.0, sigma=1.0)
