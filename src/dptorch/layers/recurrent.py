"""``DPLSTM``, ``DPGRU``, ``DPRNN``: drop-in replacements for ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``
whose per-sample gradients dptorch computes in the one backward pass of training.

Same constructor arguments, forward signature, outputs (also for ``PackedSequence`` inputs)
and ``state_dict`` keys as PyTorch's layers; ``from_module`` converts a stock layer::

    lstm = DPLSTM.from_module(nn.LSTM(32, 64, batch_first=True))
    out, (h_n, c_n) = lstm(x)                       # as nn.LSTM
    nn.LSTM(32, 64).load_state_dict(lstm.state_dict())  # and back

How they are built: :mod:`dptorch.layers.recurrent_base`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from dptorch.errors import DPValueError
from dptorch.layers.recurrent_base import DPRNNBase
from dptorch.layers.recurrent_cells import Scan, gru_scan, lstm_scan, rnn_relu_scan, rnn_tanh_scan

__all__ = ["DPGRU", "DPLSTM", "DPRNN"]


class DPLSTM(DPRNNBase):
    """``nn.LSTM`` (Hochreiter & Schmidhuber 1997) for per-sample clipping.

    Args:
        input_size: features of each input step.
        hidden_size: features of the hidden state ``h`` and cell state ``c``.
        num_layers: stacked layers; each one's output sequence is the next one's input.
        bias: whether the layers have ``b_ih`` and ``b_hh``.
        batch_first: inputs and outputs are ``[B, T, *]`` if ``True``, else ``[T, B, *]``
            (states are always ``[num_layers * num_directions, B, *]``).
        dropout: dropout probability on the outputs of every layer but the last (training
            only).
        bidirectional: add a reverse-direction layer; outputs concatenate both directions.
        proj_size: if positive, project ``h`` to this size after every step (``weight_hr``).
        device: where to create the parameters.
        dtype: their dtype.

    Forward: ``lstm(input, (h0, c0))`` with ``input`` ``[B, T, input_size]`` (or
    ``[T, B, ...]``, unbatched ``[T, input_size]``, or a ``PackedSequence``) returns
    ``(output, (h_n, c_n))`` exactly as ``nn.LSTM``; missing states are zeros.

    Privacy: each example's outputs depend only on its own sequence, and every parameter gets
    gradient only through calls of its own module (``W_hh`` through one call per sequence,
    see :mod:`dptorch.layers.recurrent_linear`), so dptorch's per-sample gradients are exact. The layer's layout need not match
    ``make_private(batch_first=)``: it always feeds its layers batch first.
    """

    _TORCH_TYPE = nn.LSTM
    _GATES = 4

    def forward(  # type: ignore[override]
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        output, (h_n, c_n) = self._run(input, hx)
        return output, (h_n, c_n)

    def _scan(self) -> Scan:
        return lstm_scan

    @classmethod
    def _constructor_kwargs(cls, module: nn.RNNBase) -> dict[str, Any]:
        return super()._constructor_kwargs(module) | {"proj_size": module.proj_size}


class DPGRU(DPRNNBase):
    """``nn.GRU`` (Cho et al. 2014, arXiv 1406.1078) for per-sample clipping.

    Arguments as :class:`DPLSTM` without ``proj_size``. Gates ``r, z, n`` in PyTorch's order
    and formula (``b_hn`` inside the reset product). Forward: ``gru(input, h0)`` returns
    ``(output, h_n)``.

    Privacy: as :class:`DPLSTM`.
    """

    _TORCH_TYPE = nn.GRU
    _GATES = 3
    _PRODUCT_ADDS_TO_GATES = False  # r * (W_hn h + b_hn): the product's gradient is its own

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
        )

    def forward(  # type: ignore[override]
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._run(input, None if hx is None else (hx,))
        return output, h_n

    def _scan(self) -> Scan:
        return gru_scan


class DPRNN(DPRNNBase):
    """``nn.RNN`` (Elman) for per-sample clipping: ``h_t = act(W_ih x_t + W_hh h_{t-1} + b)``.

    Arguments as :class:`DPLSTM` without ``proj_size``, plus ``nonlinearity`` (``"tanh"`` or
    ``"relu"``) in fourth place, as in ``nn.RNN``. Forward: ``rnn(input, h0)`` returns
    ``(output, h_n)``.

    Privacy: as :class:`DPLSTM`.
    """

    _TORCH_TYPE = nn.RNN
    _GATES = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise DPValueError(
                f"DPRNN(nonlinearity={nonlinearity!r}) must be 'tanh' or 'relu', as in nn.RNN."
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
        )
        self.nonlinearity = nonlinearity

    def forward(  # type: ignore[override]
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._run(input, None if hx is None else (hx,))
        return output, h_n

    def _scan(self) -> Scan:
        return rnn_relu_scan if self.nonlinearity == "relu" else rnn_tanh_scan

    @classmethod
    def _constructor_kwargs(cls, module: nn.RNNBase) -> dict[str, Any]:
        return super()._constructor_kwargs(module) | {"nonlinearity": module.nonlinearity}
