"""The recurrent weight of ``DPLSTM`` and ``DPRNN``: applied at every step, captured once.

In an LSTM or an Elman RNN the recurrent product enters each step's gates additively::

    gates_t = (W_ih x_t + b_ih) + (W_hh h_{t-1} + b_hh)

so its output gradient at step ``t`` is the gate pre-activation gradient ``g_t``, the same as
the input projection's. The gradient of ``W_hh`` is then ``sum_t g_t h_{t-1}^T``: one
sequence-wide product of ``g`` ``[B, T, G]`` with the previous states ``[B, T, H]``, like an
``nn.Linear`` applied to a whole sequence. :class:`RecurrentLinear` is called once per layer
and direction, before the time loop, as ``hh(previous_states, gate_inputs)``:

* it returns ``gate_inputs + b_hh`` and passes the gradient of that sum straight through to
  ``gate_inputs``, so its output gradient is ``g`` ``[B, T, G]``;
* ``previous_states`` is a buffer the layer fills with ``h_{t-1}`` after the loop (the states
  do not exist yet when the call is made); by the backward pass it holds them, and the
  gradients of ``W_hh`` and ``b_hh`` are computed there from ``g`` in two products;
* the loop itself multiplies by a detached ``W_hh`` (:meth:`RecurrentLinear.add_product`),
  so autograd differentiates it only towards ``h_{t-1}``.

dptorch's hooks therefore see one call with input ``[B, T, H]`` and output gradient
``[B, T, G]`` instead of ``T`` calls whose terms would have to be merged, and training without
DP gets ``W_hh``'s gradient from one matrix product instead of ``T``. The GRU's candidate gate
multiplies ``W_hn h_{t-1}`` by the reset gate, so its recurrent product's gradient differs
from the input projection's: it calls ``hh(previous_states, zeros)`` and adds each step's
product to that output (its *tap*), whose gradient is then the product's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["RecurrentLinear"]


class RecurrentLinear(nn.Linear):
    """``W_hh`` and ``b_hh`` of one layer and direction (``nn.Linear(H, G)``, same parameters).

    Call it as ``hh(previous_states, gate_inputs)`` with ``gate_inputs`` ``[B, T, G]`` and an
    uninitialised ``previous_states`` ``[B, T, H]`` that the caller fills with ``h_{t-1}``
    (``h_0`` at the first step of its direction) before the backward pass; in the loop use
    :meth:`add_product` for ``x_t + W_hh h``.

    Privacy: ``W_hh`` and ``b_hh`` get gradient only through this call (the loop's products use
    a detached weight); the call's output gradient is ``g_t`` at every step, and its recorded
    input is the states ``W_hh`` multiplied, so the per-sample gradient built from the call,
    ``sum_t g_t h_{t-1}^T`` (and ``sum_t g_t`` for the bias), is each example's exact gradient.
    Its rule (``batch_first_linear_rule``) reads the batch from dimension 0.
    """

    def forward(self, previous_states: Tensor, gate_inputs: Tensor) -> Tensor:  # type: ignore[override]
        return _DeferredRecurrentProduct.apply(gate_inputs, previous_states, self.weight, self.bias)

    def add_product(self, inputs: Tensor, state: Tensor) -> Tensor:
        """``inputs + state @ W_hh^T`` ``[B, G]`` (``b_hh`` is already in ``inputs``): one fused
        kernel, differentiable towards ``inputs`` and ``state`` only."""
        return torch.addmm(inputs, state, self.weight.detach().t())


class _DeferredRecurrentProduct(torch.autograd.Function):
    """``gate_inputs + bias`` forward; ``W_hh``/``b_hh`` gradients from the filled states."""

    @staticmethod
    def forward(
        ctx: Any, gate_inputs: Tensor, previous_states: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        # Kept as an attribute, not saved for backward: the layer writes the states into it
        # after this call, which save_for_backward's version check would reject.
        ctx.previous_states = previous_states
        ctx.has_bias = bias is not None
        return gate_inputs + bias if bias is not None else gate_inputs.clone()

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
        grad_weight = grad_bias = None
        rows = grad.reshape(-1, grad.shape[-1])  # [B*T, G]
        if ctx.needs_input_grad[2]:
            states = ctx.previous_states
            grad_weight = rows.t() @ states.reshape(-1, states.shape[-1]).to(rows.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = rows.sum(dim=0)
        return grad, None, grad_weight, grad_bias
