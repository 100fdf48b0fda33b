"""What ``DPLSTM``, ``DPGRU`` and ``DPRNN`` share: PyTorch's recurrent layers from ``nn.Linear``.

Stock ``nn.LSTM`` runs every step inside one fused kernel, so no layer hook sees a step's
input or output gradient: dptorch can only reach it through the ``torch.func`` fallback
(exact but slow), and ``nn.GRU``/``nn.RNN`` not at all. Here each layer and direction owns

* ``ih_l{k}``: an ``nn.Linear(d_in, G*H)`` applied once to the whole sequence (``W_ih``,
  ``b_ih``), batched over time;
* ``hh_l{k}``: ``W_hh h_{t-1} + b_hh``, ``nn.Linear(H, G*H)`` parameters, a
  :class:`~dptorch.layers.recurrent_linear.RecurrentLinear`: multiplied at every step, but
  called as a module (and differentiated) once per sequence, on all the previous states. In
  the LSTM and the RNN the product enters the gates additively, so its output gradient is the
  gates'; in the GRU the reset gate multiplies part of it, so the call returns a separate
  per-step tap (``b_hh``) that each step's product is added to, and its gradient is the
  product's;
* ``hr_l{k}`` (LSTM with ``proj_size`` only): ``nn.Linear(H, P, bias=False)`` per step,

(``_reverse`` appended for the backward direction), and the gate arithmetic in between has no
parameters (see :mod:`dptorch.layers.recurrent_cells`). Constructor, forward signature,
outputs, ``PackedSequence`` handling and ``state_dict`` keys are PyTorch's: state-dict hooks
rename ``ih_l0.weight`` <-> ``weight_ih_l0``, and ``layer.weight_ih_l0`` reads the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from dptorch.errors import DPTypeError, DPValueError
from dptorch.layers.recurrent_cells import Scan
from dptorch.layers.recurrent_keys import TORCH_KEY, from_torch_keys, to_torch_keys
from dptorch.layers.recurrent_linear import RecurrentLinear
from dptorch.per_sample.grad_skipping import inside_functorch

__all__ = ["DPRNNBase"]


class _SequenceLinear(nn.Linear):
    """``nn.Linear`` that the recurrent layers always call on batch-first ``[B, T, in]``.

    Its rule reads the batch from dimension 0 whatever ``make_private(batch_first=)`` says, so
    a recurrent layer's layout never has to match the engine's: a mismatch could otherwise
    group one example's time steps with other examples when ``T == B``. (Its rule,
    ``batch_first_linear_rule``, is built in: see ``dptorch.per_sample.rules``.)
    """


class DPRNNBase(nn.Module):
    """What ``DPLSTM``, ``DPGRU`` and ``DPRNN`` share; see :class:`DPLSTM` for the arguments.

    Privacy: an example's outputs depend only on its own sequence (the recurrence runs along
    time, never across the batch), and every parameter gets gradient only through calls of
    its own module (``W_hh``'s per-step products use a detached copy; its gradient flows
    through the one call of :class:`~dptorch.layers.recurrent_linear.RecurrentLinear`), so
    dptorch's per-sample gradients, hence the clipping bound, are exact.
    Dropout between layers is drawn once per forward, as in training without DP.
    """

    _TORCH_TYPE: ClassVar[type[nn.RNNBase]]
    _GATES: ClassVar[int]
    # Whether W_hh h_{t-1} enters the gates additively (LSTM, RNN), so the gates' gradient is
    # its output gradient; the GRU's gets a tap of its own (see _run_direction).
    _PRODUCT_ADDS_TO_GATES: ClassVar[bool] = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not (0.0 <= float(dropout) <= 1.0):
            raise DPValueError(f"{name}(dropout={dropout}) must be a probability in [0, 1].")
        if min(input_size, hidden_size, num_layers) <= 0 or proj_size < 0:
            raise DPValueError(
                f"{name}(input_size={input_size}, hidden_size={hidden_size}, num_layers="
                f"{num_layers}, proj_size={proj_size}): sizes and num_layers must be positive "
                "(proj_size may be 0)."
            )
        if proj_size >= hidden_size:
            raise DPValueError(
                f"{name}(proj_size={proj_size}) must be smaller than hidden_size={hidden_size}."
            )
        self.mode = self._TORCH_TYPE.__name__
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        out_size = proj_size or hidden_size
        gates = self._GATES * hidden_size
        # [(ih, hh, hr or None)] per layer and direction, forward direction first.
        self._cells: list[tuple[str, str, str | None]] = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * self.num_directions
            for suffix in ("", "_reverse")[: self.num_directions]:
                key = f"l{layer}{suffix}"
                self.add_module(f"ih_{key}", _SequenceLinear(layer_in, gates, bias, **factory))
                self.add_module(f"hh_{key}", RecurrentLinear(out_size, gates, bias, **factory))
                if proj_size:
                    self.add_module(
                        f"hr_{key}", nn.Linear(hidden_size, proj_size, False, **factory)
                    )
                self._cells.append((f"ih_{key}", f"hh_{key}", f"hr_{key}" if proj_size else None))
        self.register_state_dict_post_hook(to_torch_keys)
        self.register_load_state_dict_pre_hook(from_torch_keys)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """PyTorch's initialisation: every weight and bias ``U(-1/sqrt(H), 1/sqrt(H))``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written for cuDNN's ``nn.LSTM``: there is nothing to flatten."""

    def _scan(self) -> Scan:
        raise NotImplementedError

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {  # PyTorch's order, so reprs of converted models read the same
            "proj_size": 0,
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
        }
        for key, default in defaults.items():
            if getattr(self, key) != default:
                text += f", {key}={getattr(self, key)}"
        return text

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            match = TORCH_KEY.match(name)
            module = self._modules.get(f"{match[2]}_{match[3]}") if match else None
            param = getattr(module, match[1], None) if match and module is not None else None
            if param is None:
                raise
            return param

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def _constructor_kwargs(cls, module: nn.RNNBase) -> dict[str, Any]:
        return {
            "input_size": module.input_size,
            "hidden_size": module.hidden_size,
            "num_layers": module.num_layers,
            "bias": module.bias,
            "batch_first": module.batch_first,
            "dropout": module.dropout,
            "bidirectional": module.bidirectional,
        }

    @classmethod
    def from_module(cls, module: nn.Module) -> DPRNNBase:
        """A copy of a stock PyTorch layer: same weights, device, dtype, training flag and
        ``requires_grad`` flags; equal outputs."""
        if type(module) is not cls._TORCH_TYPE:
            raise DPTypeError(
                f"{cls.__name__}.from_module needs an nn.{cls._TORCH_TYPE.__name__}, got "
                f"{type(module).__name__}."
            )
        assert isinstance(module, nn.RNNBase)
        reference = module.weight_ih_l0
        assert isinstance(reference, Tensor)
        copy = cls(
            **cls._constructor_kwargs(module), device=reference.device, dtype=reference.dtype
        )
        copy.load_state_dict(module.state_dict())
        for name, param in module.named_parameters():
            getattr(copy, name).requires_grad_(param.requires_grad)
        return copy.train(module.training)

    # -- forward ---------------------------------------------------------------------------
    def _run(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, ...] | None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, ...]]:
        """The whole stack; ``hx``/the result's states are ``(h,)`` or ``(h, c)``."""
        mask: Tensor | None = None  # [T, B, 1], False past the end of a padded sequence
        if isinstance(input, PackedSequence):
            x, lengths = pad_packed_sequence(input, batch_first=True)  # [B, T, d], input order
            if int(lengths.min()) < x.shape[1]:
                positions = torch.arange(x.shape[1], device=lengths.device)
                mask = (positions.unsqueeze(1) < lengths.unsqueeze(0)).to(x.device).unsqueeze(2)
            unbatched, time_major = False, False
        else:
            if input.dim() not in (2, 3):
                raise DPValueError(
                    f"{type(self).__name__} expects a 3-d (batched) or 2-d (unbatched) input or "
                    f"a PackedSequence, got shape {tuple(input.shape)}."
                )
            unbatched = input.dim() == 2
            time_major = not (self.batch_first or unbatched)
            x = input.unsqueeze(0) if unbatched else input.transpose(0, 1) if time_major else input
        if x.shape[-1] != self.input_size:
            raise DPValueError(
                f"{type(self).__name__}(input_size={self.input_size}) got inputs with "
                f"{x.shape[-1]} features (shape {tuple(x.shape)}); pass batch_first= matching "
                "your layout or fix input_size."
            )
        states = self._initial_states(x, hx, unbatched)
        finals: list[list[Tensor]] = [[] for _ in states]
        layer_input = x  # [B, T, d] (a view when time_major)
        for layer in range(self.num_layers):
            outputs: list[Tensor] = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                output, final = self._run_direction(
                    index,
                    layer_input,
                    tuple(s[index] for s in states),
                    direction == 1,
                    mask,
                    time_major,
                )
                outputs.append(output)
                for kept, state in zip(finals, final, strict=True):
                    kept.append(state)
            layer_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_output = F.dropout(layer_output, self.dropout, training=True)
            layer_input = layer_output.transpose(0, 1) if time_major else layer_output
        result = tuple(torch.stack(kept) for kept in finals)  # each [L*D, B, H]
        if isinstance(input, PackedSequence):
            return _repack(layer_output, input), result
        if unbatched:
            return layer_output.squeeze(0), tuple(s.squeeze(1) for s in result)
        return layer_output, result

    def _run_direction(
        self,
        index: int,
        layer_input: Tensor,
        initial: tuple[Tensor, ...],
        reverse: bool,
        mask: Tensor | None,
        time_major: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One layer and direction: outputs ``[B, T, H]`` (``[T, B, H]`` if ``time_major``)
        and final states."""
        ih, hh, hr = self._cells[index]
        projected = self._modules[ih](layer_input)  # type: ignore[misc]  # [B, T, G*H]
        recurrent = self._modules[hh]
        assert isinstance(recurrent, RecurrentLinear)
        # The GRU's product is scaled by the reset gate, so its gradient is not the gates':
        # it gets a tap of its own, zero plus b_hh, that each step adds W_hh h to (gru_scan).
        zeros = (
            None if self._PRODUCT_ADDS_TO_GATES else projected.new_zeros(()).expand_as(projected)
        )
        if inside_functorch():
            # A torch.func re-run (the fallback rule of an enclosing module): plain autograd
            # operations only, which its transforms know how to batch.
            def step(inputs: Tensor, state: Tensor) -> Tensor:
                return inputs + F.linear(state, recurrent.weight, recurrent.bias)

            return self._scan_steps(projected, zeros, initial, step, hr, reverse, mask, time_major)
        # One call for the whole sequence; the states it multiplied are written into
        # `previous` once the loop has made them (see dptorch.layers.recurrent_linear).
        previous = projected.new_empty(*projected.shape[:2], initial[0].shape[-1])
        if zeros is None:
            gate_inputs, taps = recurrent(previous, projected), None  # + b_hh
        else:
            gate_inputs, taps = projected, recurrent(previous, zeros)
        output, final = self._scan_steps(
            gate_inputs, taps, initial, recurrent.add_product, hr, reverse, mask, time_major
        )
        _write_previous_states(previous, output, initial[0], time_major, reverse)
        return output, final

    def _scan_steps(
        self,
        gate_inputs: Tensor,
        taps: Tensor | None,
        initial: tuple[Tensor, ...],
        step: Any,
        hr: str | None,
        reverse: bool,
        mask: Tensor | None,
        time_major: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The time loop (autograd through every step), its outputs stacked in time order.

        Each step reads ``gate_inputs[:, t]``, or with ``taps`` (the GRU) the pair
        ``(gate_inputs[:, t], taps[:, t])``.
        """
        total = gate_inputs.shape[1]
        order = range(total - 1, -1, -1) if reverse else range(total)
        valid = None if mask is None else list(mask.unbind(0))  # T x [B, 1]
        projection = self._modules[hr] if hr else None
        per_step: Sequence[Any] = gate_inputs.unbind(1)
        if taps is not None:
            per_step = list(zip(per_step, taps.unbind(1), strict=True))
        steps, final = self._scan()(per_step, initial, step, projection, order, valid)
        if reverse:
            steps.reverse()
        return torch.stack(steps, dim=0 if time_major else 1), final

    def _initial_states(
        self, x: Tensor, hx: tuple[Tensor, ...] | None, unbatched: bool
    ) -> tuple[Tensor, ...]:
        batch = x.shape[0]
        stacked = self.num_layers * self.num_directions
        sizes = [self.proj_size or self.hidden_size]
        if self._TORCH_TYPE is nn.LSTM:
            sizes.append(self.hidden_size)
        if hx is None:
            return tuple(x.new_zeros(stacked, batch, size) for size in sizes)
        states = tuple(h.unsqueeze(1) if unbatched else h for h in hx)
        for i, (state, size) in enumerate(zip(states, sizes, strict=True)):
            if tuple(state.shape) != (stacked, batch, size):
                expected = (stacked, size) if unbatched else (stacked, batch, size)
                raise DPValueError(
                    f"{type(self).__name__}: initial state {('h0', 'c0')[i]} has shape "
                    f"{tuple(hx[i].shape)}, expected {expected} (num_layers * num_directions, "
                    "batch, hidden)."
                )
        return states


def _write_previous_states(
    previous: Tensor, output: Tensor, initial: Tensor, time_major: bool, reverse: bool
) -> None:
    """Fill ``previous`` ``[B, T, H]`` with the state each step started from.

    In time order, a forward direction's step ``t`` starts from the output of step ``t - 1``
    and the first from ``initial``; a reverse direction's from the output of step ``t + 1``
    and its first (the last in time) from ``initial``. Past the end of a padded sequence the
    outputs repeat the carried state, so the same shift holds there (and those steps have zero
    gradient anyway).
    """
    with torch.no_grad():
        states = output.transpose(0, 1) if time_major else output  # [B, T, H]
        if reverse:
            previous[:, :-1].copy_(states[:, 1:])
            previous[:, -1].copy_(initial)
        else:
            previous[:, 1:].copy_(states[:, :-1])
            previous[:, 0].copy_(initial)


def _repack(padded: Tensor, like: PackedSequence) -> PackedSequence:
    """``padded`` ``[B, T, ...]`` (input order) packed like ``like``, sharing its indices."""
    batch = int(like.batch_sizes[0])
    # Sorted lengths: sequence j is alive at every step whose batch size exceeds j.
    lengths = (like.batch_sizes.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(dim=1)
    if like.sorted_indices is not None:
        padded = padded.index_select(0, like.sorted_indices)
    packed = pack_padded_sequence(padded, lengths, batch_first=True)
    return PackedSequence(
        packed.data, packed.batch_sizes, like.sorted_indices, like.unsorted_indices
    )
