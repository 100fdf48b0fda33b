"""Autograd never computes the discarded gradients of hooked layers, and nothing leaks out."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.clipping import FlatClipping
from dptorch.per_sample import is_captured
from dptorch.per_sample.engine import PerSampleEngine
from dptorch.per_sample.grad_skipping import start_graph_at


def _private(
    model: nn.Module, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0
) -> torch.optim.Optimizer:
    data = TensorDataset(torch.zeros(40, 1))
    _, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )
    return optimizer


def test_backward_leaves_no_non_private_gradient_and_step_releases_one() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    optimizer = _private(model)
    model(torch.randint(0, 10, (5, 3))).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # never computed
    optimizer.step()
    assert all(p.grad is not None for p in model.parameters())  # the private gradient


def test_first_layer_output_is_freed_once_the_next_layer_has_read_it() -> None:
    # Plain autograd keeps no reference to a first layer's output that ReLU has read (ReLU
    # saves its result); the private graph must not either (it held 3 MB of the benchmark
    # CNN's step peak through an AccumulateGrad node when the output was made a leaf).
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    optimizer = _private(model)
    outputs: list[weakref.ref[torch.Tensor]] = []
    model[0].register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
    loss = model(torch.randn(5, 1, 8, 8)).sum()
    gc.collect()
    assert outputs[0]() is None
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in model.parameters())


def test_start_graph_at_keeps_the_tensor_and_allows_in_place_ops() -> None:
    tensor = torch.randn(3, 4)
    before = tensor.clone()
    started = start_graph_at(tensor)
    assert started is tensor  # no copy: the same tensor, now with a grad_fn
    assert started.requires_grad and started.grad_fn is not None
    seen: list[torch.Tensor] = []
    started.register_hook(seen.append)
    started.relu_().sum().backward()  # in place on it: refused on a leaf that needs grad
    # A hook registered before the in-place op gets the gradient of the value before it.
    torch.testing.assert_close(seen[0], (before > 0).to(before.dtype))


def test_start_graph_at_copies_a_view_and_leaves_its_base_alone() -> None:
    base = torch.randn(4, 6)
    view = base[:, :3]
    started = start_graph_at(view)
    assert started.requires_grad and not base.requires_grad and base.grad_fn is None
    torch.testing.assert_close(started, view)
    assert started.data_ptr() != view.data_ptr()


def test_parameters_are_restored_when_the_forward_raises() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    weight = model[0].weight
    _private(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width: F.linear raises inside the forward
    assert model[0]._parameters["weight"] is weight
    assert isinstance(model[0].weight, nn.Parameter)


def test_no_grad_forward_and_state_dict_see_the_real_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    params = list(model.parameters())
    _private(model)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert list(model.parameters()) == params
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())
    assert all(model.state_dict()[k] is not None for k in ("0.weight", "1.bias"))


def test_detach_removes_the_pre_hooks_too() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    engine = PrivacyEngine()
    engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.zeros(40, 1)), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert model[0]._forward_pre_hooks
    engine.detach(model)
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks
    assert not is_captured(model)
    model(torch.randn(2, 4)).sum().backward()
    assert model[0].weight.grad is not None  # plain autograd again


def test_attention_with_dropout_trains_through_the_torch_func_fallback() -> None:
    # torch.func redraws dropout masks per example, so its per-sample gradients differ from
    # autograd's by design; the first-step check must not mistake that for a foreign use.
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True))
    optimizer = _private(model)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 3, 8)).pow(2).mean().backward()
        optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


class _ScaledLinear(nn.Module):
    """A custom layer (torch.func fallback) that owns a parameter AND has a ruled child."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.inner = nn.Linear(3, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.inner(x)


def test_fallback_module_with_a_ruled_child_matches_the_oracle() -> None:
    torch.manual_seed(0)
    model = _ScaledLinear()
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        model(x[i : i + 1]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad
    model.zero_grad(set_to_none=True)
    engine = PerSampleEngine(model, model.parameters(), loss_reduction="sum")
    engine.attach()
    model(x).pow(2).sum().backward()
    clipped = engine.clipped_sum(FlatClipping(1e6))  # nothing clipped: the plain sum
    engine.detach()
    for name, param in model.named_parameters():
        torch.testing.assert_close(clipped.sums[param], expected[name], msg=name)


def test_compiled_model_with_an_in_place_op_after_the_first_layer_matches_eager() -> None:
    # Under torch.compile the graph start copies instead of returning its input as is (a
    # compiled graph refuses in-place ops on an input returned as is); same gradients.
    def released(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 36, 2)
        )
        optimizer = _private(model, noise_multiplier=0.0, max_grad_norm=0.5)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        run(x).square().sum().backward()
        optimizer.step()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager, compiled = released(False), released(True)
    assert len(eager) == len(compiled) == 4
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)
