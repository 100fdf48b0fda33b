"""Hypothesis: the per-sample engine against a one-example-at-a-time loop, over shapes.

For random layer shapes, batch sizes (1 upwards) and batch compositions (repeated examples,
all-zero examples), with noise 0 the gradient the optimizer applies must equal
``sum_i clip_C(g_i) / divisor`` where ``g_i`` is plain autograd's gradient of example ``i``
alone, on every norm route.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine

pytestmark = pytest.mark.filterwarnings("ignore::dptorch.DPWarning")

DATASET = 40
LOADER_BATCH = 8  # q N = 8, whatever the realised batch size


@st.composite
def layer_and_input(draw: st.DrawFn) -> tuple[str, nn.Module, Tensor]:
    """A small model and a batch for it: ``(description, model, x)``."""
    kind = draw(st.sampled_from(["linear", "linear-seq", "conv1d", "conv2d", "embedding", "norms"]))
    batch = draw(st.integers(1, 6))
    d_in, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    bias = draw(st.booleans())
    if kind == "linear":
        x = torch.randn(batch, d_in)
        model = nn.Linear(d_in, d_out, bias=bias)
    elif kind == "linear-seq":
        length = draw(st.integers(1, 4))
        x = torch.randn(batch, length, d_in)
        model = nn.Linear(d_in, d_out, bias=bias)
    elif kind == "conv1d":
        kernel, length = draw(st.integers(1, 3)), draw(st.integers(3, 7))
        stride = draw(st.integers(1, 2))
        x = torch.randn(batch, d_in, length)
        model = nn.Conv1d(d_in, d_out, kernel, stride=stride, bias=bias)
    elif kind == "conv2d":
        kernel, side = draw(st.integers(1, 3)), draw(st.integers(3, 5))
        groups = draw(st.sampled_from([1, 2])) if d_in % 2 == 0 and d_out % 2 == 0 else 1
        x = torch.randn(batch, d_in, side, side)
        model = nn.Conv2d(d_in, d_out, kernel, padding=1, groups=groups, bias=bias)
    elif kind == "embedding":
        vocab, length = draw(st.integers(2, 9)), draw(st.integers(1, 4))
        x = torch.randint(0, vocab, (batch, length))
        model = nn.Sequential(
            nn.Embedding(vocab, d_out), nn.Flatten(), nn.Linear(length * d_out, 2)
        )
    else:
        channels = 2 * d_in
        x = torch.randn(batch, channels, 3)
        model = nn.Sequential(
            nn.GroupNorm(2, channels),
            nn.Flatten(),
            nn.LayerNorm(3 * channels),
            nn.Linear(3 * channels, 2),
        )
    # Batch compositions: the same example twice, or an all-zero example.
    composition = draw(st.sampled_from(["random", "repeated", "zero-row"]))
    if composition == "repeated" and batch > 1:
        x[1] = x[0]
    elif composition == "zero-row" and x.is_floating_point():
        x[-1] = 0
    return f"{kind}/{composition}/B={batch}", model, x


def _per_example_grads(model: nn.Module, x: Tensor, target: Tensor) -> dict[str, Tensor]:
    grads: dict[str, list[Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        ((model(x[i : i + 1]) - target[i : i + 1]) ** 2).sum().backward()
        for name, param in model.named_parameters():
            grads[name].append(
                param.grad.clone() if param.grad is not None else torch.zeros_like(param)
            )
    return {name: torch.stack(g) for name, g in grads.items()}


@settings(max_examples=60, deadline=None)
@given(
    case=layer_and_input(),
    route=st.sampled_from(["auto", "ghost", "instantiate"]),
    reduction=st.sampled_from(["mean", "sum"]),
    clip_quantile=st.floats(0.0, 1.0),
)
def test_clipped_sum_matches_the_per_example_loop(
    case: tuple[str, nn.Module, Tensor],
    route: str,
    reduction: str,
    clip_quantile: float,
) -> None:
    name, model, x = case
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        target = torch.randn_like(model(x))
    per_example = _per_example_grads(model, x, target)
    norms = torch.sqrt(sum(g.reshape(len(x), -1).pow(2).sum(1) for g in per_example.values()))
    max_grad_norm = max(float(torch.quantile(norms, clip_quantile)), 1e-3)
    factors = torch.clamp(max_grad_norm / norms, max=1.0)
    divisor = LOADER_BATCH if reduction == "mean" else 1.0
    expected = {
        n: (g * factors.reshape(-1, *[1] * (g.dim() - 1))).sum(0) / divisor
        for n, g in per_example.items()
    }

    model.zero_grad(set_to_none=True)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        loss_reduction=reduction,  # type: ignore[arg-type]
        norm_route=route,  # type: ignore[arg-type]
    )
    losses = ((model(x) - target) ** 2).reshape(len(x), -1).sum(1)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    optimizer.step()
    for pname, param in model.named_parameters():
        torch.testing.assert_close(
            param.grad,
            expected[pname],
            rtol=1e-6,
            atol=1e-9,
            msg=lambda m, p=pname: f"{name} {p}: {m}",
        )
    assert optimizer.last_step_stats is not None
    assert optimizer.last_step_stats.batch_size == len(x)
