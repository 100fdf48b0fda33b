"""The table of layer cases every per-sample route is checked on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dptorch.layers import DPGRU, DPLSTM, DPRNN


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


class ConvTwice(nn.Module):
    """One convolution applied twice: its per-example gradient is the sum of two terms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.tanh(self.conv(x)))


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


class DPRecurrent(nn.Module):
    """A dptorch recurrent layer, its whole output sequence used.

    ``learned_state``: ``h0`` (and ``c0``) computed from the first input step, so gradients
    reach the recurrent weights through a non-zero initial state. ``transpose``: the layer is
    time-major inside a batch-first model.
    """

    def __init__(
        self, rnn: nn.Module, learned_state: bool = False, transpose: bool = False
    ) -> None:
        super().__init__()
        self.rnn = rnn
        self.transpose = transpose
        sizes = [rnn.proj_size or rnn.hidden_size] + [rnn.hidden_size] * (rnn.mode == "LSTM")
        self.sizes = sizes
        self.init = nn.Linear(rnn.input_size, sum(sizes)) if learned_state else None
        self.out = nn.Linear(rnn.num_directions * sizes[0], 2)

    def forward(self, x: Tensor) -> Tensor:
        hx = None
        if self.init is not None:  # x: [B, T, d]
            states = torch.tanh(self.init(x[:, 0])).unsqueeze(0).split(self.sizes, dim=2)
            hx = states if len(states) == 2 else states[0]
        out, _ = self.rnn(x.transpose(0, 1) if self.transpose else x, hx)
        return self.out(out.transpose(0, 1) if self.transpose else out)


class PackedDPRecurrent(nn.Module):
    """Embedding -> PackedSequence (token 0 pads the end) -> dptorch recurrent layer -> Linear."""

    def __init__(self, rnn: nn.Module, enforce_sorted: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, rnn.input_size)
        self.rnn = rnn
        self.enforce_sorted = enforce_sorted
        self.out = nn.Linear(rnn.num_directions * rnn.hidden_size, 2)

    def forward(self, tokens: Tensor) -> Tensor:  # [B, T]
        lengths = (tokens != 0).sum(dim=1).cpu()
        packed = pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=self.enforce_sorted
        )
        out, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.out(padded)


def _frozen_input_projection(rnn: nn.Module) -> nn.Module:
    """``rnn`` with ``W_ih``/``b_ih`` frozen: only the recurrent weights (and the head) train,
    and nothing upstream of the recurrent call needs gradients."""
    rnn.ih_l0.requires_grad_(False)
    return DPRecurrent(rnn)


class ScaledDPRecurrent(nn.Module):
    """Owns a parameter itself, so dptorch's torch.func fallback re-runs its whole forward,
    recurrent layer included, on each example."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, rnn.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0] * self.scale


class _First(nn.Module):
    """The output sequence of a recurrent layer's ``(output, state)``."""

    def forward(self, pair: tuple[Tensor, object]) -> Tensor:
        return pair[0]


def _padded_tokens(length: int, sort: bool) -> Callable[[int], Tensor]:
    def make(batch: int) -> Tensor:
        lengths = torch.randint(1, length + 1, (batch,))
        lengths = lengths.sort(descending=True).values if sort else lengths
        tokens = torch.randint(1, 9, (batch, length))
        return tokens * (torch.arange(length) < lengths.unsqueeze(1))

    return make


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
    LayerCase("conv2d_called_twice", ConvTwice, _randn(2, 5, 5)),
    # The first layer's output starts the graph; in-place ops on it must stay allowed.
    LayerCase(
        "conv2d_first_then_inplace_relu",
        _seq(lambda: nn.Conv2d(2, 3, 3), lambda: nn.ReLU(inplace=True), nn.Flatten),
        _randn(2, 5, 5),
    ),
    LayerCase("conv2d_same", lambda: nn.Conv2d(2, 3, 4, padding="same"), _randn(2, 6, 5)),
    LayerCase(
        "conv2d_valid_depthwise",
        lambda: nn.Conv2d(3, 3, 3, padding="valid", groups=3),
        _randn(3, 6, 6),
    ),
    # One input channel per group (dptorch's forward-convolution instantiation applies).
    LayerCase(
        "conv2d_one_channel_strided_dilated",
        lambda: nn.Conv2d(1, 3, 3, stride=2, padding=1, dilation=2),
        _randn(1, 9, 9),
    ),
    LayerCase(
        "conv2d_one_channel_same_even_reflect",
        lambda: nn.Conv2d(1, 2, 4, padding="same", padding_mode="reflect"),
        _randn(1, 6, 5),
    ),
    LayerCase(
        "conv1d_depthwise_multiplier_stride_unread",
        lambda: nn.Conv1d(2, 4, 2, stride=3, groups=2),
        _randn(2, 11),
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
    LayerCase(
        "embedding_then_inplace_tanh",
        _seq(lambda: nn.Embedding(9, 4), lambda: nn.Hardtanh(-0.5, 0.5, inplace=True)),
        _tokens(9, 6),
    ),
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
    LayerCase(
        "dplstm_two_layers_bidirectional",
        lambda: DPRecurrent(DPLSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)),
        _randn(3, 4),
    ),
    LayerCase(
        "dplstm_proj_learned_state",
        lambda: DPRecurrent(DPLSTM(4, 5, proj_size=3, batch_first=True), learned_state=True),
        _randn(4, 4),
    ),
    LayerCase(
        "dpgru_learned_state",
        lambda: DPRecurrent(DPGRU(4, 5, batch_first=True), learned_state=True),
        _randn(4, 4),
    ),
    # Time-major everywhere, with T equal to the batch size (6): read in the wrong layout, the
    # input projection's batch sizes would still agree and only the oracle would notice.
    LayerCase(
        "dpgru_time_major_bidirectional",
        lambda: nn.Sequential(DPGRU(4, 5, bidirectional=True), _First(), nn.Linear(10, 2)),
        lambda b: torch.randn(6, b, 4),
        batch_first=False,
        output_batch_dim=1,
    ),
    LayerCase(
        "dprnn_relu_time_major_in_batch_first_model",
        lambda: DPRecurrent(DPRNN(4, 5, 2, "relu"), transpose=True),
        _randn(6, 4),
    ),
    LayerCase(
        "dplstm_packed_unsorted",
        lambda: PackedDPRecurrent(
            DPLSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True), False
        ),
        _padded_tokens(5, sort=False),
    ),
    LayerCase(
        "dplstm_frozen_input_projection",
        lambda: _frozen_input_projection(DPLSTM(4, 5, batch_first=True)),
        _randn(4, 4),
    ),
    LayerCase(
        "dprnn_tanh_packed_bidirectional",
        lambda: PackedDPRecurrent(DPRNN(3, 4, bidirectional=True, batch_first=True), False),
        _padded_tokens(5, sort=False),
    ),
    LayerCase(
        "dplstm_inside_a_fallback_module",
        lambda: ScaledDPRecurrent(DPLSTM(4, 5, batch_first=True)),
        _randn(3, 4),
    ),
    LayerCase(
        "dpgru_inside_a_fallback_module",
        lambda: ScaledDPRecurrent(DPGRU(4, 5, num_layers=2, batch_first=True)),
        _randn(3, 4),
    ),
    LayerCase(
        "dpgru_packed_sorted",
        lambda: PackedDPRecurrent(DPGRU(3, 4, bidirectional=True), True),
        _padded_tokens(5, sort=True),
    ),
]
