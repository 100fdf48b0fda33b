"""Checkpoints of FSDP2 (``fully_shard``) runs: full tensors in the file, shards in memory.

A checkpoint of a sharded run is the same file as that of one process (see
:mod:`dptorch.checkpoint`): the module's and the wrapped optimizer's state dicts hold full,
unsharded CPU tensors under their usual keys, so a plain model can load it too.

```
save, every rank:  each sharded tensor, in the same order -> full_tensor() (an all-gather)
                   -> rank 0 keeps the full CPU copy, the others an empty placeholder
                   -> rank 0 writes the one file (GradientSync.one_writer)
load, every rank:  reads the whole file -> cuts its own chunk of each full tensor, as FSDP
                   lays it out (no collective) -> load_state_dict copies it into its shard
```

The privacy state needs nothing sharded: every rank's accountant, Poisson sampler and noise
generator are identical (``make_private`` copies rank 0's to all, and every step draws the
same from each), so rank 0's copy in the file restores every rank, and the per-shard noise
streams, seeded from the common noise generator, continue as if never interrupted.

Why not ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``: it keys the
optimizer state by parameter name (not the one-process format), and when the optimizer has no
state yet it runs one ``step()`` with zero gradients and ``lr = 0`` to create it; for Adam
before its first step, that gives the *live* run a step count of 1, so saving would change
the training. Gathering the optimizer's own ``state_dict()`` has neither effect.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dptorch.errors import DPValueError
from dptorch.fsdp import ShardedGradientSync

if TYPE_CHECKING:
    from dptorch.optimizers.dp_optimizer import DPOptimizer

__all__ = ["full_state", "local_state"]


def full_state(module: nn.Module, optimizer: DPOptimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The module's and the wrapped optimizer's state dicts, as one process would save them.

    For an FSDP2 run every rank must call this (one all-gather per sharded tensor, in the
    same order everywhere); rank 0, the writer, gets full CPU tensors, the other ranks empty
    placeholders in their place (the same structure, so every rank checks the same things).
    Otherwise: ``module.state_dict()`` and ``optimizer.state_dict()`` unchanged.

    Raises:
        DPValueError: (FSDP2, on every rank alike, before any collective) optimizer state
            that is neither a scalar nor sharded like its parameter, which could not be put
            back in place on load.
    """
    sync = optimizer.gradient_sync
    if not isinstance(sync, ShardedGradientSync):
        return module.state_dict(), optimizer.state_dict()
    inner = optimizer.state_dict()
    _check_optimizer_state(inner, optimizer, module)
    keep = sync.is_writer
    module_state = _mapped(module.state_dict(), lambda name, value: _gathered(value, keep))
    state = {
        index: {key: _gathered(value, keep) for key, value in per_param.items()}
        for index, per_param in inner["state"].items()
    }
    return module_state, {**inner, "state": state}


def local_state(
    saved_module: Mapping[str, Any],
    saved_optimizer: Mapping[str, Any],
    module: nn.Module,
    optimizer: DPOptimizer,
) -> tuple[Any, Any]:
    """The saved full state dicts, each sharded tensor cut to this rank's shard.

    A saved tensor becomes a shard when the run's tensor at its place (the module's
    parameter or buffer of that name, or the parameter an optimizer state belongs to) is an
    FSDP2 DTensor of the same full shape; everything else is returned as saved. No
    collective: every rank holds the whole file. Nothing is changed; ``load_state_dict``
    then copies the shards into place.
    """
    if not isinstance(optimizer.gradient_sync, ShardedGradientSync):
        return saved_module, saved_optimizer
    ours = module.state_dict()
    module_state = _mapped(saved_module, lambda name, value: _shard_like(value, ours.get(name)))
    params = _params_by_index(saved_optimizer, optimizer)
    state = {
        index: {key: _shard_like(value, params.get(index)) for key, value in per_param.items()}
        for index, per_param in saved_optimizer["state"].items()
    }
    return module_state, {**saved_optimizer, "state": state}


def _mapped(state: Mapping[str, Any], value_of: Callable[[str, Any], Any]) -> dict[str, Any]:
    """``state`` with each value replaced, keeping ``_metadata`` (module versions) if any."""
    out: Any = OrderedDict((name, value_of(name, value)) for name, value in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out  # type: ignore[no-any-return]


def _gathered(value: Any, keep: bool) -> Any:
    """A DTensor's full value on CPU (a collective), or an empty placeholder if not ``keep``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return value  # replicated: buffers, scalars such as Adam's step, plain values
    full = value.full_tensor().detach()  # [full shape], on every rank for a moment
    return full.cpu() if keep else torch.empty(0, dtype=full.dtype)


def _shard_like(value: Any, like: Any) -> Any:
    """This rank's chunk of the full tensor ``value``, placed as the DTensor ``like``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not (
        isinstance(like, DTensor)
        and isinstance(value, Tensor)
        and not isinstance(value, DTensor)
        and value.dim() > 0
        and value.shape == like.shape
    ):
        return value
    # src_data_rank=None: cut the local chunk (torch.chunk, as FSDP2 does) without a scatter.
    return distribute_tensor(
        value.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )


def _params_by_index(saved_optimizer: Mapping[str, Any], optimizer: DPOptimizer) -> dict[Any, Any]:
    """``{saved parameter id: this run's parameter}``, group by group in order."""
    groups = saved_optimizer.get("param_groups") or []
    saved_ids = chain.from_iterable(group["params"] for group in groups)
    ours = chain.from_iterable(g["params"] for g in optimizer.original_optimizer.param_groups)
    return dict(zip(saved_ids, ours, strict=False))  # sizes were checked before loading


def _check_optimizer_state(
    inner: Mapping[str, Any], optimizer: DPOptimizer, module: nn.Module
) -> None:
    """Refuse state that :func:`local_state` could not put back where it was."""
    from torch.distributed.tensor import DTensor

    names: dict[Any, str] = {p: name for name, p in module.named_parameters()}
    params = _params_by_index(inner, optimizer)
    problems = []
    for index, per_param in inner["state"].items():
        param = params.get(index)
        if not isinstance(param, DTensor):
            continue
        for key, value in per_param.items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue
            if isinstance(value, DTensor):
                sharded_alike = value.shape == param.shape and value.placements == param.placements
                if sharded_alike and value.device_mesh == param.device_mesh:
                    continue
                what = f"a DTensor of shape {tuple(value.shape)} placed as {value.placements}"
            else:
                what = f"a plain tensor of shape {tuple(value.shape)}"
            problems.append(
                f"state {key!r} of parameter {names.get(param, index)} "
                f"(shape {tuple(param.shape)}, {param.placements}) is {what}"
            )
    if problems:
        raise DPValueError(
            "save_checkpoint cannot save this FSDP2 optimizer's state so that it loads back "
            "in place:\n  - "
            + "\n  - ".join(problems)
            + "\nSaved FSDP2 optimizer state must be scalars or sharded like its parameter "
            f"(SGD, Adam, AdamW, RMSprop, Adagrad, ...); {type(optimizer.original_optimizer).__name__}"
            " keeps other state. Use such an optimizer, or save the shards with "
            "torch.distributed.checkpoint yourself (the privacy state is then not saved)."
        )
