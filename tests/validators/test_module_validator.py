"""ModuleValidator: every problem reported by path, and fix() gives a trainable, equal model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import ModuleValidator, PrivacyEngine
from dptorch.errors import DPValueError, UnsupportedModuleError
from dptorch.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


def _resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Block(8),
        Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.BatchNorm1d(4),
    )


def test_every_batch_norm_is_reported_by_path_then_fixed_and_trained() -> None:
    torch.manual_seed(0)
    model = _resnet().double()
    model[1].weight.data.uniform_(0.5, 1.5)  # non-default affine weights must survive fix
    problems = ModuleValidator.validate(model)
    assert {(p.path, p.module_type) for p in problems} == {
        ("1", "BatchNorm2d"),
        ("3.bn", "BatchNorm2d"),
        ("4.bn", "BatchNorm2d"),
        ("8", "BatchNorm1d"),
    }
    assert all("ModuleValidator.fix" in str(p) and "batch" in p.reason for p in problems)
    assert not ModuleValidator.is_valid(model)
    with pytest.raises(UnsupportedModuleError, match=r"3\.bn \(BatchNorm2d\)"):
        ModuleValidator.validate(model, strict=True)

    fixed = ModuleValidator.fix(model)
    assert ModuleValidator.is_valid(fixed)
    assert isinstance(model[1], nn.BatchNorm2d), "fix must not change the original"
    norm = fixed[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 8
    assert norm.weight.dtype == torch.float64
    torch.testing.assert_close(norm.weight, model[1].weight)
    assert isinstance(fixed[8], nn.GroupNorm) and fixed[8].num_groups == 4  # gcd(32, 4)

    optimizer = torch.optim.SGD(fixed.parameters(), lr=0.1)
    loader = DataLoader(
        TensorDataset(torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(4, (32,))),
        batch_size=8,
    )
    engine = PrivacyEngine()
    fixed, optimizer, loader = engine.make_private(
        module=fixed,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    before = [p.detach().clone() for p in fixed.parameters()]
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(fixed(x), y).backward()
        optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, fixed.parameters(), strict=True))
    assert engine.get_epsilon(1e-5) > 0


def test_batch_norm_options_and_bad_group_counts() -> None:
    model = nn.Sequential(nn.Conv1d(2, 6, 1), nn.BatchNorm1d(6))
    instance = ModuleValidator.fix(model, batch_norm="instance_norm")[1]
    assert isinstance(instance, nn.InstanceNorm1d) and instance.affine
    assert ModuleValidator.fix(model, num_groups=3)[1].num_groups == 3
    with pytest.raises(DPValueError, match="num_groups=4 does not divide the 6 channels"):
        ModuleValidator.fix(model, num_groups=4)
    with pytest.raises(DPValueError, match="batch_norm="):
        ModuleValidator.fix(model, batch_norm="layer_norm")  # type: ignore[arg-type]


def test_instance_norm_running_stats_are_dropped() -> None:
    model = nn.Sequential(nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
    assert [p.path for p in ModuleValidator.validate(model)] == ["0"]
    fixed = ModuleValidator.fix(model)
    assert not fixed[0].track_running_stats and fixed[0].running_mean is None


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 5, batch_first=True, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(10, 4, batch_first=True)
        self.rnn = nn.RNN(4, 3, batch_first=True, nonlinearity="relu")
        self.frozen = nn.GRU(3, 3, batch_first=True)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x)
        h, _ = self.lstm(h)
        h, _ = self.gru(h)
        h, _ = self.rnn(h)
        h, _ = self.frozen(h)
        return h


def test_layers_with_slow_or_missing_per_sample_paths_are_swapped_for_equal_drop_ins() -> None:
    torch.manual_seed(0)
    model = Stack()
    reported = {p.path for p in ModuleValidator.validate(model)}
    assert reported == {"gru", "rnn"}  # GRU/RNN cannot be trained at all; the frozen one can
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed.attn, DPMultiheadAttention)
    assert isinstance(fixed.lstm, DPLSTM)
    assert isinstance(fixed.gru, DPGRU)
    assert isinstance(fixed.rnn, DPRNN)
    assert type(fixed.frozen) is nn.GRU  # frozen layers need no per-sample gradients
    assert ModuleValidator.is_valid(fixed)
    recurrent = {k for k in model.state_dict() if not k.startswith("attn.")}
    assert recurrent <= set(fixed.state_dict())  # DPLSTM/DPGRU/DPRNN keep torch's keys
    fixed.load_state_dict(model.state_dict())  # and the drop-ins load stock state dicts
    x = torch.randn(3, 6, 8)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(fixed, mode)()
        torch.testing.assert_close(fixed(x), model(x), rtol=1e-5, atol=1e-6)
    unchanged = ModuleValidator.fix(model, replace_layers=False)
    assert type(unchanged.lstm) is nn.LSTM
