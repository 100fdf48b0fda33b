"""The time loops of ``DPLSTM``, ``DPGRU`` and ``DPRNN``: one direction of one layer.

Each loop gets the input projection ``W_ih x_t + b_ih`` of every step, already computed for
the whole sequence in one batched call, and a function for the recurrent product:

* LSTM and RNN: ``add_recurrent(inputs_t, h) = inputs_t + W_hh h`` (``b_hh`` is already in
  the inputs), the per-step product of a :class:`~dptorch.layers.recurrent_linear.RecurrentLinear`
  whose gradient is taken once for the whole sequence;
* GRU: each step's input is the pair ``(W_ih x_t + b_ih, tap_t)``, and
  ``add_recurrent(tap_t, h) = tap_t + W_hh h`` the same per-step product, on a tap of its own
  (``b_hh``, from the recurrent layer's one call), because the reset gate scales part of it.

All other work is parameter-free tensor arithmetic with PyTorch's gate layout and formulas.

Sequences of different lengths (a ``PackedSequence`` padded to ``[B, T, ...]``) are handled by
masking: at a step past the end of example ``i``'s sequence, its state is carried over
unchanged (``torch.where``), so its later (padding) steps get zero gradient. Run over the
steps in reverse, the same mask makes each example's reverse pass start at its own last valid
step from its initial state, as PyTorch's packed reverse direction does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# (step inputs, initial state, recurrent product (see the module docstring), LSTM output
#  projection or None, step order, per-step validity masks or None)
#  -> (outputs in step order, final state)
Scan = Callable[
    [
        Sequence[Any],
        tuple[Tensor, ...],
        Callable[..., Tensor],
        "nn.Module | None",
        Sequence[int],
        "Sequence[Tensor] | None",
    ],
    tuple[list[Tensor], tuple[Tensor, ...]],
]


def lstm_scan(
    inputs: Sequence[Tensor],
    state: tuple[Tensor, ...],
    add_recurrent: Callable[[Tensor, Tensor], Tensor],
    projection: nn.Module | None,
    order: Sequence[int],
    valid: Sequence[Tensor] | None,
) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """LSTM steps (gate order i, f, g, o as in ``nn.LSTM``); ``state`` is ``(h, c)``.

    ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)``, then ``h_t = W_hr h_t`` with
    ``proj_size``.
    """
    h, c = state  # [B, P or H], [B, H]
    outputs: list[Tensor] = []
    for t in order:
        # chunk, not four slices: its backward writes the four gate gradients into one
        # [B, 4H] buffer instead of zero-filling and adding four.
        i, f, g, o = add_recurrent(inputs[t], h).chunk(4, dim=1)  # each [B, H]
        c_new = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
        h_new = o.sigmoid() * c_new.tanh()
        if projection is not None:
            h_new = projection(h_new)
        if valid is not None:
            h_new = torch.where(valid[t], h_new, h)
            c_new = torch.where(valid[t], c_new, c)
        h, c = h_new, c_new
        outputs.append(h)
    return outputs, (h, c)


def gru_scan(
    inputs: Sequence[tuple[Tensor, Tensor]],
    state: tuple[Tensor, ...],
    add_recurrent: Callable[[Tensor, Tensor], Tensor],
    projection: nn.Module | None,
    order: Sequence[int],
    valid: Sequence[Tensor] | None,
) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """GRU steps (gate order r, z, n as in ``nn.GRU``); ``state`` is ``(h,)``; ``inputs[t]``
    is the pair (input projection, recurrent tap), each ``[B, 3H]`` (see the module docstring).

    ``n = tanh(x_n + r * (W_hn h + b_hn))`` with ``b_hn`` inside the product, exactly as
    PyTorch; ``h_t = (1 - z) * n + z * h_{t-1}``.
    """
    (h,) = state  # [B, H]
    outputs: list[Tensor] = []
    for t in order:
        projected, tap = inputs[t]  # each [B, 3H]
        x_r, x_z, x_n = projected.chunk(3, dim=1)  # each [B, H]
        h_r, h_z, h_n = add_recurrent(tap, h).chunk(3, dim=1)
        n = torch.addcmul(x_n, (x_r + h_r).sigmoid(), h_n).tanh()
        h_new = torch.lerp(n, h, (x_z + h_z).sigmoid())  # (1 - z) * n + z * h
        h = h_new if valid is None else torch.where(valid[t], h_new, h)
        outputs.append(h)
    return outputs, (h,)


def _simple_scan(activation: Callable[[Tensor], Tensor]) -> Scan:
    def scan(
        inputs: Sequence[Tensor],
        state: tuple[Tensor, ...],
        add_recurrent: Callable[[Tensor, Tensor], Tensor],
        projection: nn.Module | None,
        order: Sequence[int],
        valid: Sequence[Tensor] | None,
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        (h,) = state  # [B, H]
        outputs: list[Tensor] = []
        for t in order:
            h_new = activation(add_recurrent(inputs[t], h))
            h = h_new if valid is None else torch.where(valid[t], h_new, h)
            outputs.append(h)
        return outputs, (h,)

    return scan


rnn_tanh_scan: Scan = _simple_scan(torch.tanh)
rnn_relu_scan: Scan = _simple_scan(torch.relu)
