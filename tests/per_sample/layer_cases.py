"""The table of layer cases every per-sample route is checked on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Scale(nn.Module):
    """A custom layer owning parameters directly: only the torch.func fallback knows it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.shift = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.weight + self.shift)


class TiedLM(nn.Module):
    """Embedding and output layer share one weight matrix (as in GPT-2)."""

    def __init__(self, vocab: int = 13, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(idx)))


class TwiceCalled(nn.Module):
    """One Linear applied twice in a forward, plus a layer that is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.attn(x, x, x, need_weights=False)[0])


class Recurrent(nn.Module):
    """A stock recurrent layer (torch.func fallback), its whole output sequence used."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0])


class PartlyFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.mixed = nn.Linear(6, 6)
        self.mixed.weight.requires_grad_(False)  # only its bias trains
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.mixed(torch.relu(self.frozen(x)))))


class SeqFirst(nn.Module):
    """Sequence-first ([T, B, ...]) model for batch_first=False."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=1)
        self.norm = nn.RMSNorm(4)
        self.proj = nn.Linear(4, 3)

    def forward(self, idx: Tensor) -> Tensor:  # idx: [T, B]
        return self.proj(self.norm(self.embed(idx))).transpose(0, 1)  # [B, T, 3]


@dataclass(frozen=True)
class LayerCase:
    name: str
    make_model: Callable[[], nn.Module]
    make_input: Callable[[int], Tensor]
    batch_first: bool = True
    output_batch_dim: int = 0
    # Stock LSTM goes through torch.func only in float32 (the float64 CPU kernel has no
    # batching rule); that case runs in float32 with a float32 tolerance.
    dtype: torch.dtype = torch.float64

    def __str__(self) -> str:
        return self.name


def _randn(*shape: int) -> Callable[[int], Tensor]:
    return lambda batch: torch.randn(batch, *shape)


def _tokens(vocab: int, length: int) -> Callable[[int], Tensor]:
    return lambda batch: torch.randint(0, vocab, (batch, length))


def _seq(*layers: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A fresh Sequential of fresh layers on every call."""
    return lambda: nn.Sequential(*(make() for make in layers))


CASES: list[LayerCase] = [
    LayerCase("linear", lambda: nn.Linear(6, 4), _randn(6)),
    LayerCase("linear_seq", lambda: nn.Linear(6, 4), _randn(5, 6)),
    LayerCase("linear_seq_nobias", lambda: nn.Linear(6, 4, bias=False), _randn(5, 6)),
    LayerCase("linear_4d", lambda: nn.Linear(3, 4), _randn(2, 3, 3)),
    LayerCase("linear_wide_seq", lambda: nn.Linear(2, 2), _randn(20, 2)),
    LayerCase("conv1d", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), _randn(3, 11)),
    LayerCase(
        "conv1d_same_dilated", lambda: nn.Conv1d(2, 4, 3, padding="same", dilation=2), _randn(2, 9)
    ),
    LayerCase("conv2d", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), _randn(3, 7, 7)),
    LayerCase(
        "conv2d_groups_nobias",
        lambda: nn.Conv2d(
            4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2, bias=False
        ),
        _randn(4, 8, 7),
    ),
    LayerCase("conv2d_same", lambda: nn.Conv2d(2, 3, 4, padding="same"), _randn(2, 6, 5)),
    LayerCase(
        "conv2d_valid_depthwise",
        lambda: nn.Conv2d(3, 3, 3, padding="valid", groups=3),
        _randn(3, 6, 6),
    ),
    LayerCase(
        "conv2d_reflect",
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        _randn(2, 5, 5),
    ),
    LayerCase(
        "conv2d_circular",
        lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular"),
        _randn(2, 5, 5),
    ),
    LayerCase(
        "conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), _randn(2, 4, 4, 3)
    ),
    LayerCase("embedding", lambda: nn.Embedding(9, 4), _tokens(9, 6)),
    LayerCase("embedding_padding_idx", lambda: nn.Embedding(5, 4, padding_idx=0), _tokens(5, 8)),
    LayerCase(
        "embedding_1d_input", lambda: nn.Embedding(7, 3), lambda b: torch.randint(0, 7, (b,))
    ),
    LayerCase("layernorm", _seq(lambda: nn.Linear(5, 6), lambda: nn.LayerNorm(6)), _randn(3, 5)),
    LayerCase(
        "layernorm_nobias_2d_shape",
        _seq(lambda: nn.Linear(4, 4), lambda: nn.LayerNorm((2, 4), bias=False)),
        _randn(2, 4),
    ),
    LayerCase("rmsnorm", _seq(lambda: nn.Linear(5, 6), lambda: nn.RMSNorm(6)), _randn(3, 5)),
    LayerCase(
        "groupnorm", _seq(lambda: nn.Conv2d(2, 6, 3), lambda: nn.GroupNorm(3, 6)), _randn(2, 6, 6)
    ),
    LayerCase(
        "instancenorm1d",
        _seq(lambda: nn.Conv1d(2, 4, 3), lambda: nn.InstanceNorm1d(4, affine=True)),
        _randn(2, 9),
    ),
    LayerCase(
        "instancenorm2d",
        _seq(lambda: nn.Conv2d(2, 4, 3), lambda: nn.InstanceNorm2d(4, affine=True)),
        _randn(2, 6, 6),
    ),
    LayerCase(
        "instancenorm3d",
        _seq(lambda: nn.Conv3d(2, 3, 2), lambda: nn.InstanceNorm3d(3, affine=True)),
        _randn(2, 4, 4, 4),
    ),
    LayerCase("fallback_custom", _seq(lambda: nn.Linear(4, 5), lambda: Scale(5)), _randn(4)),
    LayerCase("fallback_prelu", _seq(lambda: nn.Linear(4, 5), lambda: nn.PReLU(5)), _randn(4)),
    LayerCase(
        "fallback_conv_transpose", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), _randn(2, 5)
    ),
    LayerCase("multihead_attention", Attention, _randn(4, 8)),
    LayerCase(
        "transformer_encoder_layer",
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        _randn(4, 8),
    ),
    LayerCase("fallback_lstm", lambda: Recurrent(nn.LSTM), _randn(3, 4), dtype=torch.float32),
    LayerCase("tied_embedding", TiedLM, _tokens(13, 5)),
    LayerCase("called_twice_and_unused", TwiceCalled, _randn(5)),
    LayerCase("partly_frozen", PartlyFrozen, _randn(6)),
    LayerCase("batch_second", SeqFirst, lambda b: torch.randint(0, 10, (4, b)), batch_first=False),
    LayerCase(
        "linear_batch_second",
        lambda: nn.Linear(3, 2),
        lambda b: torch.randn(5, b, 3),
        batch_first=False,
        output_batch_dim=1,
    ),
]
