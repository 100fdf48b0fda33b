"""Every per-sample route against the one-example-at-a-time oracle.

With noise 0, the gradient the optimizer applies must equal ``sum_i clip_C(g_i) / (q N)``
(``"mean"``) or ``sum_i clip_C(g_i)`` (``"sum"``), where ``g_i`` is the gradient of example
``i``'s own loss computed by plain autograd on that example alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine, UnsupportedModuleError
from tests.per_sample.layer_cases import CASES, LayerCase, Recurrent

pytestmark = pytest.mark.filterwarnings("ignore::dptorch.DPWarning")

BATCH = 6  # realised batch size
DATASET = 40
LOADER_BATCH = 8  # q = 8/40, so the expected batch size q*N = 8 differs from BATCH


def _per_sample_losses(out: Tensor, target: Tensor, batch_dim: int) -> Tensor:
    diff = (out - target).movedim(batch_dim, 0)
    return (diff**2).reshape(diff.shape[0], -1).sum(dim=1)


def _oracle(
    case: LayerCase, model: nn.Module, x: Tensor, target: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients by name, computed one example at a time."""
    in_dim = 0 if case.batch_first else 1
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    for i in range(BATCH):
        model.zero_grad(set_to_none=True)
        out = model(x.narrow(in_dim, i, 1))
        loss = _per_sample_losses(
            out, target.narrow(case.output_batch_dim, i, 1), case.output_batch_dim
        ).sum()
        loss.backward()
        for n, p in named:
            grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    stacked = {n: torch.stack(g) for n, g in grads.items()}
    norms = torch.sqrt(sum(g.reshape(BATCH, -1).pow(2).sum(dim=1) for g in stacked.values()))
    return stacked, norms


def _make(case: LayerCase) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = case.make_model().to(case.dtype)
    x = case.make_input(BATCH)
    x = x.to(case.dtype) if x.is_floating_point() else x
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, x, target


@pytest.mark.parametrize("route", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clip", ["active", "inactive"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_applied_gradient_matches_oracle(
    case: LayerCase, clip: str, reduction: str, route: str
) -> None:
    model, x, target = _make(case)
    per_sample, norms = _oracle(case, model, x, target)
    # "active": about half of the examples are clipped; "inactive": none is.
    max_grad_norm = float(norms.median()) if clip == "active" else float(norms.max()) * 10
    factors = torch.clamp(max_grad_norm / norms, max=1.0)
    divisor = LOADER_BATCH if reduction == "mean" else 1.0
    expected = {
        n: (g * factors.reshape(-1, *[1] * (g.dim() - 1))).sum(dim=0) / divisor
        for n, g in per_sample.items()
    }

    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH)
    engine = PrivacyEngine()
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        loss_reduction=reduction,
        batch_first=case.batch_first,
        norm_route=route,
    )
    losses = _per_sample_losses(model(x), target, case.output_batch_dim)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    optimizer.step()

    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} got a gradient"
            continue
        torch.testing.assert_close(
            param.grad,
            expected[name],
            rtol=1e-5 if case.dtype == torch.float64 else 1e-4,
            atol=1e-10 if case.dtype == torch.float64 else 1e-6,
            msg=lambda m, n=name: f"{case.name}: {n}: {m}",
        )
    stats = optimizer.last_step_stats
    assert stats is not None and stats.batch_size == BATCH
    torch.testing.assert_close(optimizer.engine.capture.records, [])  # cleared after the step


@pytest.mark.parametrize("kind", [nn.GRU, nn.RNN])
def test_recurrent_layers_torch_func_cannot_batch_are_refused_at_make_private(
    kind: type[nn.RNNBase],
) -> None:
    # Their CPU kernels have no vmap batching rule: refuse up front, naming the layer.
    model = Recurrent(kind)
    loader = DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH)
    with pytest.raises(UnsupportedModuleError, match=rf"rnn \({kind.__name__}\)"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


CONV_CASES = [case for case in CASES if case.name.startswith("conv")]


@pytest.mark.parametrize("method", ["grouped", "unfold", "recompute-grouped", "recompute-unfold"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_every_conv_instantiation_matches_oracle(
    case: LayerCase, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cost rules pick one way to instantiate per layer, and whether to keep the
    per-example gradients or only their norms (the weighted sum then recomputed by one
    batched kernel); each must be exact on its own."""
    from dptorch.per_sample.rules import conv

    unfold, recompute = method.endswith("unfold"), method.startswith("recompute")
    monkeypatch.setattr(conv, "_forward_conv_is_faster", lambda module, positions: False)
    monkeypatch.setattr(conv, "_unfold_is_faster", lambda module, positions: unfold)
    monkeypatch.setattr(conv, "_recompute_saves_memory", lambda module, x, grad: recompute)
    test_applied_gradient_matches_oracle(case, "active", "sum", "instantiate")


def _one_input_channel_per_group(case: LayerCase) -> bool:
    convs = [
        m for m in case.make_model().modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    ]
    return bool(convs) and all(m.in_channels == m.groups for m in convs)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize(
    "case", [c for c in CONV_CASES if _one_input_channel_per_group(c)], ids=str
)
def test_forward_conv_instantiation_matches_oracle(
    case: LayerCase, recompute: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers with one input channel per group may take their per-example gradients from a
    grouped forward convolution (strides and dilations swapped); exact on every such case."""
    from dptorch.per_sample.rules import conv

    calls: list[int] = []
    forward_conv = conv.per_sample_conv_weight_grads_by_forward_conv

    def counted(x: Tensor, grad: Tensor, module: nn.Module) -> Tensor:
        calls.append(1)
        return forward_conv(x, grad, module)

    monkeypatch.setattr(conv, "_forward_conv_is_faster", lambda module, positions: True)
    monkeypatch.setattr(conv, "per_sample_conv_weight_grads_by_forward_conv", counted)
    monkeypatch.setattr(conv, "_recompute_saves_memory", lambda module, x, grad: recompute)
    test_applied_gradient_matches_oracle(case, "active", "sum", "instantiate")
    assert calls, "the forward-convolution route did not run"


def test_conv_instantiation_choice_follows_measured_rule() -> None:
    from dptorch.per_sample.rules.conv import _unfold_is_faster

    assert _unfold_is_faster(nn.Conv2d(3, 16, 3, padding=1), 1024)  # narrow 3x3 stem
    assert not _unfold_is_faster(nn.Conv2d(1, 16, 8, 2, padding=3), 196)  # large kernel
    assert not _unfold_is_faster(nn.Conv2d(16, 16, 3, padding=1), 1024)  # wide groups
    # Few positions for the patch size (4 P <= C_in K): patches; more: the grouped kernel.
    assert _unfold_is_faster(nn.Conv2d(16, 32, 4, 2), 25)  # 100 <= 256
    assert _unfold_is_faster(nn.Conv2d(32, 64, 3, padding=1), 49)  # 196 <= 288
    assert not _unfold_is_faster(nn.Conv2d(16, 32, 3, padding=1), 49)  # 196 > 144
    assert _unfold_is_faster(nn.Conv2d(32, 64, 1, 2), 64)  # 1x1: the patches are the input
    assert _unfold_is_faster(nn.Conv2d(64, 64, 3, padding=1), 64)  # wide, few positions
    assert not _unfold_is_faster(nn.Conv2d(64, 64, 3, padding=1), 256)  # wide, more positions
    assert _unfold_is_faster(nn.Conv2d(32, 32, 3, groups=8), 1024)  # 4 channels per group
    # Depthwise (one channel per group): the grouped kernel, never B * g one-row matmuls.
    assert not _unfold_is_faster(nn.Conv2d(32, 32, 3, padding=1, groups=32), 256)


def test_single_input_channel_layers_take_the_forward_convolution() -> None:
    from dptorch.per_sample.rules.conv import _forward_conv_is_faster

    assert _forward_conv_is_faster(nn.Conv2d(1, 16, 8, 2, padding=3), 196)  # the MNIST CNN's
    assert _forward_conv_is_faster(nn.Conv1d(1, 16, 7, padding=3), 256)
    assert not _forward_conv_is_faster(nn.Conv2d(32, 32, 3, groups=32), 256)  # depthwise
    assert not _forward_conv_is_faster(nn.Conv2d(3, 16, 3, padding=1), 1024)
    # Timed on the CPU only: elsewhere the earlier choice stands.
    assert not _forward_conv_is_faster(nn.Conv2d(1, 16, 8, 2, padding=3, device="meta"), 196)
