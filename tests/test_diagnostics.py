"""Non-private clipping diagnostics and the max_grad_norm sweep, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPValueError, PrivacyEngine, UnsupportedModuleError
from dptorch.diagnostics import (
    DEFAULT_QUANTILES,
    nonprivate_clipping_stats,
    nonprivate_step_stats,
    sweep_max_grad_norm,
)

pytestmark = pytest.mark.filterwarnings("ignore::dptorch.DPWarning")

BATCH = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _oracle_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Each example's gradient norm, from its own loss, one example at a time."""
    norms = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    model.zero_grad(set_to_none=True)
    return torch.stack(norms).detach()


def test_step_stats_match_the_one_example_at_a_time_oracle() -> None:
    model = _model()
    x, y = torch.randn(BATCH, 5), torch.randint(0, 3, (BATCH,))
    norms = _oracle_norms(model, x, y)
    clip = float(norms.median())  # some clipped, some not
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(40, 5)), batch_size=8)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=clip,
    )  # fmt: skip
    assert nonprivate_step_stats(optimizer) is None  # no step yet
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    stats = nonprivate_step_stats(optimizer)
    assert stats is not None
    assert stats.batch_size == BATCH and stats.nonfinite == 0 and stats.max_grad_norm == clip
    assert stats.clipped_fraction == pytest.approx(
        float((norms > clip * (1 + 1e-5)).double().mean())
    )
    expected = torch.quantile(norms.double(), torch.tensor(DEFAULT_QUANTILES).double())
    assert list(stats.norm_quantiles) == list(DEFAULT_QUANTILES)
    torch.testing.assert_close(
        torch.tensor(list(stats.norm_quantiles.values()), dtype=torch.float64),
        expected,
        rtol=1e-4,
        atol=1e-6,
    )


def test_clipping_stats_by_hand() -> None:
    norms = torch.tensor([0.5, 1.0, 2.0, math.nan])
    stats = nonprivate_clipping_stats(norms, 1.0, quantiles=(0.0, 0.5, 1.0))
    # 2.0 exceeds C; the NaN norm gets factor 0, so it counts as clipped; 1.0 is not clipped.
    assert stats.clipped_fraction == 0.5
    assert stats.nonfinite == 1 and stats.batch_size == 4
    assert stats.norm_quantiles == {0.0: 0.5, 0.5: 1.0, 1.0: 2.0}


def test_clipping_stats_of_an_empty_batch_are_nan() -> None:
    stats = nonprivate_clipping_stats(torch.zeros(0), 1.0)
    assert stats.batch_size == 0 and math.isnan(stats.clipped_fraction)
    assert all(math.isnan(v) for v in stats.norm_quantiles.values())


def _constructed(reduction: str) -> tuple[nn.Module, DataLoader, object]:
    """A model whose per-example gradient norm is exactly |x_i|: 0.05, 0.15, ..., 1.95."""
    model = nn.Linear(1, 1, bias=False)
    magnitudes = torch.arange(20, dtype=torch.float32) / 10 + 0.05
    signs = torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0)
    x = (magnitudes * signs)[torch.randperm(20)].unsqueeze(1)  # [20, 1]
    loader = DataLoader(TensorDataset(x, torch.ones(20, 1)), batch_size=5)

    def criterion(out: Tensor, target: Tensor) -> Tensor:  # d/dw of (w x_i) is x_i
        per_example = (out * target).sum(dim=1)
        return per_example.mean() if reduction == "mean" else per_example.sum()

    return model, loader, criterion


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sweep_recommends_the_candidate_nearest_the_target(reduction: str) -> None:
    model, loader, criterion = _constructed(reduction)
    weight = model.weight.detach().clone()
    stale = torch.full_like(model.weight, 3.0)
    model.weight.grad = stale
    model.eval()

    result = sweep_max_grad_norm(
        model,
        loader,
        criterion,
        batches=4,
        loss_reduction=reduction,  # type: ignore[arg-type]
    )
    assert result.examples == 20
    assert result.nonprivate_clipped_fraction == pytest.approx(
        {0.1: 0.95, 0.5: 0.75, 1.0: 0.5, 1.5: 0.25, 2.0: 0.0}
    )
    # 0.5 (75% clipped) and 1.0 (50%) are both in [0.5, 0.8]; 75% is nearer the middle 65%.
    assert result.recommended == 0.5 and result.in_target
    assert result.nonprivate_norm_quantiles[0.5] == pytest.approx(1.0, abs=1e-6)
    # Nothing trained, nothing left behind.
    assert torch.equal(model.weight, weight)
    assert model.weight.grad is stale and not model.training


def test_sweep_says_when_no_candidate_is_in_target() -> None:
    model, loader, criterion = _constructed("sum")
    result = sweep_max_grad_norm(
        model, loader, criterion, candidates=(2.0, 1.5), batches=4, loss_reduction="sum"
    )
    assert result.recommended == 1.5 and not result.in_target  # 25% clipped is closest


def test_sweep_leaves_parameters_and_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
    rng = torch.get_rng_state()
    result = sweep_max_grad_norm(model, loader, nn.CrossEntropyLoss(), batches=2)
    assert result.examples == 16
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_sweep_refuses_a_private_model_and_bad_arguments() -> None:
    model = _model()
    loader = DataLoader(TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,))), batch_size=4)
    criterion = nn.CrossEntropyLoss()
    with pytest.raises(DPValueError, match="candidates="):
        sweep_max_grad_norm(model, loader, criterion, candidates=(1.0, -1.0))
    with pytest.raises(DPValueError, match="target="):
        sweep_max_grad_norm(model, loader, criterion, target=(0.9, 0.5))
    with pytest.raises(DPValueError, match="loss_reduction='none'"):
        sweep_max_grad_norm(model, loader, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(UnsupportedModuleError):
        sweep_max_grad_norm(nn.Sequential(nn.BatchNorm1d(5)), loader, criterion)
    PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    with pytest.raises(DPValueError, match="before make_private"):
        sweep_max_grad_norm(model, loader, criterion)
