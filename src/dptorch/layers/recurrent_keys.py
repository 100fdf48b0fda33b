"""PyTorch's state-dict keys for ``DPLSTM``, ``DPGRU`` and ``DPRNN``.

The layers keep their weights in ``nn.Linear`` children (``ih_l0.weight``,
``hh_l1_reverse.bias``, ``hr_l0.weight``); PyTorch's recurrent layers name the same tensors
``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``. These hooks translate both ways, so checkpoints
move between the stock and the DP-ready layers, also inside larger models.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["INTERNAL_KEY", "TORCH_KEY", "from_torch_keys", "to_torch_keys"]

# (kind, layer) for the children's keys; (weight|bias, kind, layer) for PyTorch's.
INTERNAL_KEY = re.compile(r"^(ih|hh|hr)_(l\d+(?:_reverse)?)\.(weight|bias)$")
TORCH_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_(l\d+(?:_reverse)?)$")


def to_torch_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict post hook: ``ih_l0.weight`` -> ``weight_ih_l0``, in PyTorch's key order."""
    renamed: dict[str, Any] = {}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = INTERNAL_KEY.match(key[len(prefix) :])
        if match:
            renamed[f"{match[3]}_{match[1]}_{match[2]}"] = state_dict.pop(key)
    # PyTorch's order: per layer and direction w_ih, w_hh, b_ih, b_hh, w_hr.
    for ih, _, _ in module._cells:  # type: ignore[union-attr]
        key = ih.removeprefix("ih_")
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
            if f"{name}_{key}" in renamed:
                state_dict[prefix + f"{name}_{key}"] = renamed.pop(f"{name}_{key}")
    state_dict.update({prefix + key: value for key, value in renamed.items()})  # none expected


def from_torch_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre hook: ``weight_ih_l0`` -> ``ih_l0.weight`` before children load."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = TORCH_KEY.match(key[len(prefix) :])
        if match:
            state_dict[f"{prefix}{match[2]}_{match[3]}.{match[1]}"] = state_dict.pop(key)
