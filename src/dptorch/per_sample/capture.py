"""Capture of layer inputs and output gradients with module hooks.

A forward hook keeps each call's inputs (detached: no copy, autograd keeps them alive anyway)
and registers a tensor hook on its outputs; the tensor hook keeps the output gradient when
the user's ``loss.backward()`` reaches it. Nothing runs a second backward pass, nothing is
stored on modules or parameters, and every hook added is removed by :meth:`detach`.

Each backward pass that reaches a captured output is numbered (an end-of-pass callback on the
autograd engine), so the optimizer can refuse gradients accumulated over several passes:
they would mix examples of different logical batches under one noise draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten, tree_map

# Marks hook functions as ours, so a module can be asked whether dptorch is attached to it
# without keeping state on the module or in a global registry.
HOOK_MARK = "__dptorch_capture_hook__"


@dataclass(eq=False)
class CallRecord:
    """One forward call of one module and, after backward, its output gradients.

    Attributes:
        module: the module that was called.
        path: its dotted path in the root module (for error messages).
        args: positional inputs, tensors detached.
        kwargs: keyword inputs, tensors detached.
        output_positions: positions, in the flattened output, of the tensors that had
            gradient hooks.
        grads: the gradient of each hooked output (``None`` until backward reaches it).
        backward_passes: numbers of the backward passes that produced gradients for it (more
            than one means gradients of several passes; only the last is kept).
        terms: what the capture's ``on_complete`` callback made of the call once all its
            output gradients had arrived (the engine's per-sample terms); the inputs and
            gradients are then dropped, so they are freed as the backward pass goes on,
            exactly as in non-private training.
    """

    module: nn.Module
    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_positions: list[int]
    grads: list[Tensor | None] = field(default_factory=list)
    backward_passes: set[int] = field(default_factory=set)
    terms: list[Any] | None = None

    @property
    def has_grad(self) -> bool:
        return self.terms is not None or any(g is not None for g in self.grads)

    @property
    def complete(self) -> bool:
        return all(g is not None for g in self.grads)

    def release(self, terms: list[Any]) -> None:
        """Keep ``terms`` and drop the inputs and gradients they were computed from."""
        self.terms = terms
        self.args, self.kwargs = (), {}
        self.grads = [None] * len(self.grads)


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _detached_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with every tensor in it detached (nested containers included).

    Flat tuples of tensors and plain values, the common case, skip ``tree_map``: it costs
    ~12 us a call, a visible share of a small layer's forward when called for every layer.
    Anything ``tree_map`` would look into (a registered container, a named tuple) takes it.
    """
    if all(_is_leaf(a) for a in args):
        return tuple(_detach(a) for a in args)
    return tree_map(_detach, tuple(args))


def _is_leaf(value: Any) -> bool:
    return isinstance(value, Tensor) or (
        type(value) not in SUPPORTED_NODES and not isinstance(value, tuple)
    )


def _detached_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return tree_map(_detach, dict(kwargs)) if kwargs else {}


class ActivationCapture:
    """Hooks a set of modules and collects a :class:`CallRecord` per forward call."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        on_complete: Callable[[CallRecord], None] | None = None,
    ) -> None:
        self._modules = modules
        self._on_complete = on_complete
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._enabled = True
        self._pass_counter = 0
        self._end_of_pass_queued = False
        self.records: list[CallRecord] = []

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self) -> None:
        for path, module in self._modules.items():

            def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any, _path: str = path) -> None:
                self._on_forward(mod, _path, args, kwargs, out)

            setattr(hook, HOOK_MARK, True)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.records.clear()

    def clear(self) -> None:
        self.records.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore forward calls inside the block (used when a rule re-runs a forward)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    # -- hooks -----------------------------------------------------------------------------
    def _on_forward(
        self, module: nn.Module, path: str, args: Any, kwargs: Any, output: Any
    ) -> None:
        if not self._enabled or not torch.is_grad_enabled():
            return
        leaves = [output] if isinstance(output, Tensor) else tree_flatten(output)[0]
        positions = [
            i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad
        ]
        if not positions:
            return
        record = CallRecord(
            module=module,
            path=path,
            args=_detached_args(tuple(args)),
            kwargs=_detached_kwargs(kwargs),
            output_positions=positions,
            grads=[None] * len(positions),
        )
        self.records.append(record)
        for slot, position in enumerate(positions):
            leaves[position].register_hook(self._grad_hook(record, slot))

    def _grad_hook(self, record: CallRecord, slot: int) -> Any:
        def on_grad(grad: Tensor) -> None:
            record.backward_passes.add(self._pass_counter)
            if not self._end_of_pass_queued:
                self._end_of_pass_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_pass)
            if record.terms is not None:
                return  # a later pass through a retained graph; the engine refuses the step
            record.grads[slot] = grad.detach()
            if self._on_complete is not None and record.complete:
                self._on_complete(record)

        return on_grad

    def _end_of_pass(self) -> None:
        self._pass_counter += 1
        self._end_of_pass_queued = False

    def backward_passes(self) -> set[int]:
        """The distinct backward passes that produced the records' gradients."""
        return set().union(*(r.backward_passes for r in self.records))


def is_captured(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` carries dptorch capture hooks."""
    return any(
        getattr(hook, HOOK_MARK, False)
        for sub in module.modules()
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks)
        for hook in hooks.values()
    )


def remove_capture_hooks(module: nn.Module) -> int:
    """Remove every dptorch capture hook from ``module``'s tree; returns how many."""
    removed = 0
    for sub in module.modules():
        for key in [k for k, hook in sub._forward_hooks.items() if getattr(hook, HOOK_MARK, False)]:
            del sub._forward_hooks[key]
            sub._forward_hooks_with_kwargs.pop(key, None)
            sub._forward_hooks_always_called.pop(key, None)
            removed += 1
        for key in [
            k for k, hook in sub._forward_pre_hooks.items() if getattr(hook, HOOK_MARK, False)
        ]:
            del sub._forward_pre_hooks[key]
            sub._forward_pre_hooks_with_kwargs.pop(key, None)
            removed += 1
    return removed
