"""Hugging Face ``transformers`` models (GPT-2, BERT, ...) and ``peft`` adapters under DP.

What works without any call from here:

* ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections) has a one-pass rule, looked up
  by class name, so ``import dptorch`` never imports ``transformers``.
* ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm`` (BERT, the rest of GPT-2, LoRA's
  ``lora_A`` / ``lora_B``) have their usual rules; a tied ``lm_head`` / ``wte`` is exact.
* Frozen parameters cost nothing: with a ``peft`` LoRA model only the adapters are hooked.

What the training loop must do:

1. Compute the loss per sequence: :func:`dptorch.losses.sequence_mean_cross_entropy` on the
   logits, never the model's own ``labels=`` loss (it averages over all tokens of the batch,
   which couples examples; see :mod:`dptorch.losses`).
2. Give the model per-example position ids. Left to itself a Hugging Face model looks up
   positions ``[1, T]`` once and broadcasts them over the batch, so the position embedding's
   output gradient arrives already summed over examples and no per-example gradient can be
   recovered (dptorch stops with "Layers saw different batch sizes"). Pass
   ``position_ids=per_example_position_ids(input_ids)``, or call :func:`fill_position_ids`
   once to have it done on every forward.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dptorch.errors import DPTypeError, DPValueError

__all__ = ["fill_position_ids", "per_example_position_ids"]


def per_example_position_ids(input_ids: Tensor, past_length: int = 0) -> Tensor:
    """``[B, T]`` positions ``past_length .. past_length + T - 1`` for every example.

    Privacy: position ids carry no data; they only make each example's position-embedding
    lookup its own, so its per-example gradient can be computed exactly.
    """
    if input_ids.dim() != 2:
        raise DPValueError(
            f"per_example_position_ids(input_ids={tuple(input_ids.shape)}) needs token ids of "
            "shape [B, T]."
        )
    batch, length = input_ids.shape
    positions = torch.arange(past_length, past_length + length, device=input_ids.device)
    return positions.expand(batch, length)


def fill_position_ids(model: nn.Module) -> RemovableHandle:
    """Make ``model`` use per-example position ids whenever the caller gives none.

    Registers a forward pre-hook on ``model`` (a Hugging Face model or a ``peft`` wrapper of
    one) that adds ``position_ids=per_example_position_ids(input_ids)`` to calls that pass
    ``input_ids`` but no ``position_ids``, while gradients are enabled and no cache of past
    keys is given (training; generation is left alone). Returns the hook's handle:
    ``handle.remove()`` undoes it.

    Privacy: see :func:`per_example_position_ids`; the model computes the same outputs.
    """
    if not isinstance(model, nn.Module):
        raise DPTypeError(f"fill_position_ids(model={type(model).__name__}) needs an nn.Module.")
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError) as error:
        raise DPTypeError(
            f"fill_position_ids: cannot read the signature of {type(model).__name__}.forward; "
            "pass position_ids=per_example_position_ids(input_ids) yourself."
        ) from error
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if "position_ids" not in signature.parameters and not accepts_kwargs:
        raise DPTypeError(
            f"{type(model).__name__}.forward takes no position_ids, so fill_position_ids has "
            "nothing to fill; check that the model uses learned position embeddings."
        )

    def add_positions(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not torch.is_grad_enabled():
            return None
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return None  # let the model raise its own error for a bad call
        bound = {**bound, **bound.get("kwargs", {})}
        input_ids = bound.get("input_ids")
        if bound.get("position_ids") is not None or not isinstance(input_ids, Tensor):
            return None
        if bound.get("past_key_values") is not None:
            return None
        return args, {**kwargs, "position_ids": per_example_position_ids(input_ids)}

    return model.register_forward_pre_hook(add_positions, with_kwargs=True)
