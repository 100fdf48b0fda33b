"""The per-sample engine and a private training loop on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from tests.per_sample.layer_cases import CASES, LayerCase
from tests.per_sample.test_oracle import (
    BATCH,
    DATASET,
    LOADER_BATCH,
    _make,
    _oracle,
    _per_sample_losses,
)

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::dptorch.DPWarning")]

GPU_CASES = [c for c in CASES if c.dtype == torch.float64]


@pytest.mark.parametrize("route", ["ghost", "instantiate"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_oracle_on_cuda(case: LayerCase, route: str) -> None:
    model, x, target = _make(case)
    per_sample, norms = _oracle(case, model, x, target)  # CPU reference
    clip = float(norms.median())
    factors = torch.clamp(clip / norms, max=1.0)
    expected = {
        n: (g * factors.reshape(-1, *[1] * (g.dim() - 1))).sum(dim=0) / LOADER_BATCH
        for n, g in per_sample.items()
    }
    model = model.cuda()
    model.zero_grad(set_to_none=True)
    loader = DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH)
    _, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        batch_first=case.batch_first,
        norm_route=route,
    )
    losses = _per_sample_losses(model(x.cuda()), target.cuda(), case.output_batch_dim)
    losses.mean().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad.device.type == "cuda"
            torch.testing.assert_close(param.grad.cpu(), expected[name], rtol=1e-5, atol=1e-10)
    assert optimizer.last_step_stats is not None
    assert optimizer.last_step_stats.batch_size == BATCH


def test_private_training_on_cuda_with_a_cuda_noise_generator() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    ).to(device)
    data = TensorDataset(torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,)))
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        data_loader=DataLoader(data, batch_size=64),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator(device=device).manual_seed(1),
    )
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(engine.accountant) == len(loader)
    assert 0 < engine.get_epsilon(1e-5) < 100
