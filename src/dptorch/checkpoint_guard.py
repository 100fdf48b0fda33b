"""What keeps a refused :func:`~dptorch.checkpoint.load_checkpoint` from changing anything.

:func:`optimizer_problems` refuses, before anything is loaded, an optimizer state that does
not fit the run's optimizer; :func:`snapshot` records the run's state so that a file that
passes every check but fails half-way through loading (damaged, or edited by hand) can be
undone, part by part.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dptorch.accountants import Accountant
from dptorch.optimizers import DPOptimizer

if TYPE_CHECKING:
    from dptorch.checkpoint import Stateful

__all__ = ["optimizer_problems", "snapshot"]


def optimizer_problems(saved: Any, optimizer: DPOptimizer) -> list[str]:
    """The saved optimizer state must have this optimizer's groups, sizes and settings."""
    wrapped = optimizer.original_optimizer
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    ours = [len(g["params"]) for g in wrapped.param_groups]
    # Every hyperparameter of this optimizer type must be there (schedulers may add more).
    if (
        isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        and [len(g["params"]) for g in groups] == ours
        and all(set(wrapped.defaults) <= g.keys() for g in groups)
    ):
        return []
    return [
        f"optimizer: the saved optimizer state does not fit this {type(wrapped).__name__} "
        "(its parameter groups, their sizes or its hyperparameters differ); build the same "
        "optimizer as the saved run"
    ]


def snapshot(
    module: nn.Module,
    optimizer: DPOptimizer,
    accountant: Accountant,
    extras: Mapping[str, Stateful],
) -> Callable[[], None]:
    """A function that puts back what :func:`load_checkpoint` may change before the loader."""
    module_state = copy.deepcopy(module.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    accountant_state = copy.deepcopy(accountant.state_dict())
    extras_state = {name: copy.deepcopy(obj.state_dict()) for name, obj in extras.items()}
    torch_rng = torch.get_rng_state()
    generator = optimizer.generator if isinstance(optimizer.generator, torch.Generator) else None
    noise_rng = generator.get_state() if generator is not None else None

    def undo() -> None:
        module.load_state_dict(module_state)
        optimizer.load_state_dict(optimizer_state)
        for name, obj in extras.items():
            obj.load_state_dict(extras_state[name])
        accountant.load_state_dict(accountant_state)
        torch.set_rng_state(torch_rng)
        if generator is not None and noise_rng is not None:
            generator.set_state(noise_rng)

    return undo
